"""Money and energy per training step: device prices per hour (hardware_profiles/prices.yaml, or the user's
--price-per-hour) and a power model per device, on scalars (one estimate) or arrays (estimate_batch outputs).

Power of one device: idle + u x (TDP - idle), linear in utilisation between the idle floor and TDP (the
utilisation-linear server power model of Fan, Weber and Barroso, "Power Provisioning for a Warehouse-sized
Computer", ISCA 2007, applied per accelerator). u is the busy compute share of the step: the
hardware FLOPs utilisation over the fraction of peak the device's GEMMs reach (Efficiency.matmul), capped at 1
-- a device at its achievable GEMM rate the whole step counts as fully busy; bubbles, exposed communication and
host stalls lower it. Since u <= 1, energy_j_per_step <= TDP x devices x step time, always.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from planner import catalog
from planner.core.hardware import Cluster
from planner.core.plan import Estimate

# ASSUMPTION: an idle accelerator draws 15% of its TDP. No datasheet gives idle power; public nvidia-smi
# readings of idle H100 / H200 SXM boards (700 W TDP) lie around 60-100 W, 9-14% of TDP; 15% rounds that up
# for the memory and fabric a training job keeps awake. Replace it with a measured figure where one exists.
IDLE_FRACTION = 0.15
SECONDS_PER_HOUR = 3600.0


def busy_share(hfu, matmul_efficiency: float):
    """u in [0, 1]: the step's hardware FLOPs utilisation over the device's achievable GEMM fraction."""
    return np.clip(np.asarray(hfu, dtype=float) / matmul_efficiency, 0.0, 1.0)


def device_power_w(tdp_w: float, u):
    """idle + u x (TDP - idle) watts (the module docstring's model)."""
    idle = IDLE_FRACTION * tdp_w
    return idle + u * (tdp_w - idle)


def _device_types(cluster: Cluster) -> list[tuple]:
    """(count, Device) per device type of the cluster, remembered on the cluster (immutable)."""
    key = ("energy_device_types",)
    hit = cluster._collective_cache.get(key)
    if hit is None:
        counts = Counter(slot.device.name for slot in cluster.devices)
        first = {}
        for slot in cluster.devices:
            first.setdefault(slot.device.name, slot.device)
        hit = cluster._collective_cache[key] = [(n, first[name]) for name, n in counts.items()]
    return hit


def price_per_hour_usd(cluster: Cluster, price_per_hour: float | None = None) -> float | None:
    """US dollars per hour for every device of the cluster: price_per_hour (per device-hour) for each device,
    else the catalog's price of each device type; None where a device type has no price."""
    total = 0.0
    for n, dev in _device_types(cluster):
        if price_per_hour is not None:
            total += n * price_per_hour
            continue
        price = catalog.device_price(dev.name)
        if price is None:
            return None
        total += n * price.usd_per_hour
    return total


def energy_j_per_step(cluster: Cluster, step_time_s, hfu):
    """Joules per step over every device (scalars or arrays); None where a device type has no TDP."""
    watts = 0.0
    for n, dev in _device_types(cluster):
        if dev.tdp_w is None:
            return None
        watts = watts + n * device_power_w(dev.tdp_w, busy_share(hfu, dev.efficiency.matmul))
    return watts * step_time_s


def tdp_bound_j(cluster: Cluster, step_time_s):
    """TDP x devices x step time: what no step's energy may exceed (None without TDPs)."""
    tdps = [(n, dev.tdp_w) for n, dev in _device_types(cluster)]
    if any(t is None for _, t in tdps):
        return None
    return sum(n * t for n, t in tdps) * step_time_s


def money_terms(cluster: Cluster, step_time_s, hfu, tokens_per_step: int,
                price_per_hour: float | None = None) -> dict:
    """{cost_usd_per_step, energy_j_per_step, tokens_per_joule}; each None where the cluster lacks the price
    or the TDP it needs. Scalars give floats, arrays give arrays."""
    usd_h = price_per_hour_usd(cluster, price_per_hour)
    energy = energy_j_per_step(cluster, step_time_s, hfu)
    scalar = np.ndim(step_time_s) == 0

    def out(x):
        return None if x is None else (float(x) if scalar else x)
    return {"cost_usd_per_step": out(None if usd_h is None else usd_h * step_time_s / SECONDS_PER_HOUR),
            "energy_j_per_step": out(energy),
            "tokens_per_joule": out(None if energy is None else tokens_per_step / energy)}


def priced(est: Estimate, cluster: Cluster, tokens_per_step: int, price_per_hour: float | None) -> Estimate:
    """The estimate with its money and energy fields set (price_per_hour None: the catalog's prices)."""
    return est.model_copy(update=money_terms(cluster, est.step_time_s, est.hfu, tokens_per_step, price_per_hour))
