"""Goodput: the share of wall-clock time a training job spends on steps that count, once device failures,
restarts and checkpoints are paid for (docs/guide/elastic_and_async.md).

Failures arrive at random at a rate of devices / device MTBF (independent devices: the cluster's MTBF is the
device MTBF over the device count). The job writes a checkpoint every tau seconds of work, which takes delta
seconds; a failure costs the restart R plus, on average, half an interval of lost work (tau + delta) / 2.
Expected goodput to first order in 1/M (Young 1974, "A first order approximation to the optimum checkpoint
interval", CACM 17(9); Daly 2006, "A higher order estimate of the optimum checkpoint interval for restart
dumps", FGCS 22(3), section 3):

    goodput = tau / (tau + delta) x (1 - (R + (tau + delta) / 2) / M),   clamped to [0, 1],

maximised near Young's tau = sqrt(2 delta M); Daly's first-order correction tau = sqrt(2 delta M) - delta
(for delta < M / 2; tau = M beyond) is what this module uses.

Checkpoint time: the model states (weights and optimizer states, model_state_parts per parameter) written at
the storage's aggregate bandwidth. Assumption: CKPT_BYTES_PER_S_PER_NODE = 1 GB/s of sustained write per node,
from Llama 3's cluster (Dubey et al. 2024, "The Llama 3 Herd of Models", section 3.3.1: Tectonic sustains
2 TB/s for 16K H100s, 2K nodes of 8). Faster (local NVMe, asynchronous) checkpoints lower delta; pass it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from planner.core import dtypes
from planner.core.errors import BadInput
from planner.cost.memory import model_state_parts

CKPT_BYTES_PER_S_PER_NODE = 1e9
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class Goodput:
    """One job's expected goodput (seconds and fractions; see the module docstring)."""

    devices: int
    cluster_mtbf_s: float  # M = device MTBF / devices
    checkpoint_bytes: float
    checkpoint_s: float  # delta
    interval_s: float  # tau, Young/Daly
    restart_s: float  # R
    fraction: float  # goodput in [0, 1]
    tokens_per_s: float  # the estimate's throughput x fraction

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def checkpoint_bytes(params: int, dtype: str = "bf16", optimizer: str = "adamw") -> float:
    """Bytes of one full checkpoint: every parameter's weights and optimizer states (fp32 master and moments
    for mixed-precision Adam: 2 + 12 B), not the gradients (memory.model_state_parts with no sharding)."""
    w, _, opt = model_state_parts(params, 1, 0, weight_dtype_bytes=dtypes.weight_bytes(dtype), optimizer=optimizer)
    return float(w + opt)


def optimal_interval_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Daly 2006's first-order optimum: sqrt(2 delta M) - delta for delta < M / 2, else M (Young 1974's
    sqrt(2 delta M) less the checkpoint's own time)."""
    if checkpoint_s >= mtbf_s / 2:
        return mtbf_s
    return math.sqrt(2 * checkpoint_s * mtbf_s) - checkpoint_s


def goodput_fraction(interval_s: float, checkpoint_s: float, restart_s: float, mtbf_s: float) -> float:
    """tau / (tau + delta) x (1 - (R + (tau + delta) / 2) / M), clamped to [0, 1]."""
    period = interval_s + checkpoint_s
    lost = (restart_s + period / 2) / mtbf_s
    return min(1.0, max(0.0, interval_s / period * (1 - lost)))


def goodput(tokens_per_s: float, devices: int, nodes: int, params: int, mtbf_hours: float, restart_s: float,
            dtype: str = "bf16", optimizer: str = "adamw", ckpt_bytes_per_s: float | None = None) -> Goodput:
    """Expected goodput of a job of `devices` devices on `nodes` nodes (module docstring). ckpt_bytes_per_s:
    the storage's aggregate write bandwidth (None: CKPT_BYTES_PER_S_PER_NODE x nodes)."""
    if not mtbf_hours > 0 or not math.isfinite(mtbf_hours):
        raise BadInput(f"--mtbf-hours must be a positive number of hours per device, got {mtbf_hours}")
    if not restart_s >= 0 or not math.isfinite(restart_s):
        raise BadInput(f"--restart-s must be >= 0 seconds, got {restart_s}")
    mtbf_s = mtbf_hours * SECONDS_PER_HOUR / devices
    nbytes = checkpoint_bytes(params, dtype, optimizer)
    bw = CKPT_BYTES_PER_S_PER_NODE * max(1, nodes) if ckpt_bytes_per_s is None else ckpt_bytes_per_s
    delta = nbytes / bw
    tau = optimal_interval_s(delta, mtbf_s)
    frac = goodput_fraction(tau, delta, restart_s, mtbf_s)
    return Goodput(devices=devices, cluster_mtbf_s=mtbf_s, checkpoint_bytes=nbytes, checkpoint_s=delta,
                   interval_s=tau, restart_s=restart_s, fraction=frac, tokens_per_s=tokens_per_s * frac)


def scaling_table(tokens_per_s: float, devices: int, nodes: int, params: int, mtbf_hours: float, restart_s: float,
                  dtype: str = "bf16", optimizer: str = "adamw", factors=(1, 8, 64, 512, 2048)) -> list[Goodput]:
    """Goodput as the cluster grows by each factor, throughput scaled linearly with it (weak scaling, the
    failure side alone): how goodput falls with cluster size."""
    return [goodput(tokens_per_s * f, devices * f, nodes * f, params, mtbf_hours, restart_s, dtype, optimizer)
            for f in factors]
