"""What the search minimises (`plan --objective time|cost|energy`) and the Pareto front of the plans it costed.

Every plan of one search runs the same workload on the same cluster, so per step and per token rank alike:
time is step_time_s, cost is cost_usd_per_step, energy is energy_j_per_step (planner/cost/energy.py). Each
has a lower bound from the search's step-time bound: cost = step x the cluster's dollars per second exactly,
energy >= step x every device's idle watts (power never falls below idle), so the bound still prunes.
"""
from __future__ import annotations

import numpy as np

from planner.core.errors import BadInput
from planner.core.hardware import Cluster
from planner.cost import energy

OBJECTIVES = ("time", "cost", "energy")
PARETO_MAX = 20  # front points `plan --json` lists, fastest first


class Objective:
    """One objective on one cluster: its values from estimate_batch outputs and its step-time bound factor."""

    def __init__(self, name: str, cluster: Cluster, tokens_per_step: int, price_per_hour: float | None = None):
        if name not in OBJECTIVES:
            raise BadInput(f"--objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
        if price_per_hour is not None and not (isinstance(price_per_hour, (int, float)) and 0 < price_per_hour
                                               <= 10_000):
            raise BadInput(f"--price-per-hour must be US dollars per device-hour in (0, 10000], got {price_per_hour}")
        self.name, self.cluster, self.tokens, self.price = name, cluster, tokens_per_step, price_per_hour
        self.bound_factor = 1.0
        if name == "cost":
            usd_h = energy.price_per_hour_usd(cluster, price_per_hour)
            if usd_h is None:
                missing = sorted({s.device.name for s in cluster.devices})
                raise BadInput(f"--objective cost: no catalog price for {', '.join(missing)} "
                               "(hardware_profiles/prices.yaml); give --price-per-hour USD")
            self.bound_factor = usd_h / energy.SECONDS_PER_HOUR
        elif name == "energy":
            idle = energy.energy_j_per_step(cluster, 1.0, 0.0)  # watts at u = 0: every device idle
            if idle is None:
                raise BadInput(f"--objective energy: a device of {cluster.name} has no tdp_w in its profile; "
                               "use --objective time")
            self.bound_factor = float(idle)

    def values(self, out: dict) -> np.ndarray:
        """The objective of every plan of an estimate_batch output."""
        if self.name == "time":
            return out["step_time_s"]
        terms = energy.money_terms(self.cluster, out["step_time_s"], out["hfu"], self.tokens, self.price)
        return terms["cost_usd_per_step" if self.name == "cost" else "energy_j_per_step"]

    def of_estimate(self, est) -> float:
        return {"time": est.step_time_s, "cost": est.cost_usd_per_step, "energy": est.energy_j_per_step}[self.name]


def pareto_front(step_s: np.ndarray, cost: np.ndarray | None, joules: np.ndarray | None) -> np.ndarray:
    """Indices of the plans no other plan beats on every one of time, cost and energy (the ones given),
    fastest first; of equal points the first."""
    cols = [np.asarray(step_s, dtype=float)] + [np.asarray(x, dtype=float) for x in (cost, joules) if x is not None]
    pts = np.stack(cols, axis=1)
    order = np.lexsort(tuple(pts[:, k] for k in range(pts.shape[1] - 1, -1, -1)))
    front: list[int] = []
    for i in order.tolist():
        if front:
            f = pts[front]
            if np.any(np.all(f <= pts[i], axis=1)):  # an earlier (no slower) point is no worse anywhere
                continue
        front.append(i)
    return np.array(front, dtype=np.int64)
