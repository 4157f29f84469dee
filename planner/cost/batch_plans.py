"""Plans as columns for estimate_batch (PlanArrays), and the index tables its integer columns point into.

Separate from planner/cost/batch.py because the search builds and filters these columns (planner/search/space.py)
without evaluating anything: the column layout is its own concept, shared by the search and the batch estimate.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from planner.core.dims import SCHEDULES  # the schedule column indexes it
from planner.core.errors import BadInput
from planner.core.plan import OffloadPolicy, ParallelPlan

POLICIES = ("none", "selective", "full")


@dataclass
class PlanArrays:
    """Plans as columns (one entry per plan). None-able plan fields use a sentinel: etp 0 (= tp),
    num_microbatches 0 (= global_batch / (mbs * dp)), recompute_num_layers -1 (= every block).
    recompute is an index into POLICIES, schedule into SCHEDULES. An explicit partition is not
    representable: pass such plans as ParallelPlan objects."""

    dp: np.ndarray
    tp: np.ndarray
    pp: np.ndarray
    vpp: np.ndarray
    cp: np.ndarray
    ep: np.ndarray
    etp: np.ndarray
    sp: np.ndarray
    zero: np.ndarray
    mbs: np.ndarray
    num_microbatches: np.ndarray
    recompute: np.ndarray
    recompute_num_layers: np.ndarray
    schedule: np.ndarray
    flash_attention: np.ndarray
    overlap_grad_reduce: np.ndarray
    offload_optimizer: np.ndarray
    offload_activations: np.ndarray
    overlap_tp_comm: np.ndarray | None = None  # None: all False (the ParallelPlan default)
    cp_a2a: np.ndarray | None = None  # cp_comm "a2a" (Ulysses); None: all False (the ring)
    moe_tp_slice: np.ndarray | None = None  # moe_dispatch "tp_slice" (Pipeline MoE); None: all False (a2a)
    moe_deepep: np.ndarray | None = None  # moe_dispatch "deepep" (node-deduplicated); None: all False (a2a)
    seq_chunks: np.ndarray | None = None  # ParallelPlan.seq_chunks; None: all 1
    attention_pool: np.ndarray | None = None  # ParallelPlan.attention_pool (DistCA); None: all False

    _INT = ("dp", "tp", "pp", "vpp", "cp", "ep", "etp", "zero", "mbs", "num_microbatches", "recompute",
            "recompute_num_layers", "schedule", "seq_chunks")
    _BOOL = ("sp", "flash_attention", "overlap_grad_reduce", "overlap_tp_comm", "cp_a2a", "moe_tp_slice",
             "moe_deepep", "attention_pool")

    def __post_init__(self):
        if self.overlap_tp_comm is None:
            self.overlap_tp_comm = np.zeros(len(np.atleast_1d(self.dp)), dtype=bool)
        if self.cp_a2a is None:
            self.cp_a2a = np.zeros(len(np.atleast_1d(self.dp)), dtype=bool)
        if self.moe_tp_slice is None:
            self.moe_tp_slice = np.zeros(len(np.atleast_1d(self.dp)), dtype=bool)
        if self.moe_deepep is None:
            self.moe_deepep = np.zeros(len(np.atleast_1d(self.dp)), dtype=bool)
        if self.seq_chunks is None:
            self.seq_chunks = np.ones(len(np.atleast_1d(self.dp)), dtype=np.int64)
        if self.attention_pool is None:
            self.attention_pool = np.zeros(len(np.atleast_1d(self.dp)), dtype=bool)
        for f in fields(self):
            a = np.asarray(getattr(self, f.name))
            if f.name in self._INT:
                a = a.astype(np.int64)
            elif f.name in self._BOOL:
                a = a.astype(bool)
            else:
                a = a.astype(float)
            setattr(self, f.name, np.atleast_1d(a))
        n = len(self.dp)
        if any(len(getattr(self, f.name)) != n for f in fields(self)):
            raise BadInput("PlanArrays columns must all have the same length")

    def __len__(self) -> int:
        return len(self.dp)

    @classmethod
    def from_plans(cls, plans: list[ParallelPlan]) -> PlanArrays:
        if any(p.partition is not None for p in plans):
            raise BadInput("PlanArrays cannot hold an explicit partition; pass the ParallelPlan list instead")
        col = {
            "dp": [p.dp for p in plans], "tp": [p.tp for p in plans], "pp": [p.pp for p in plans],
            "vpp": [p.vpp for p in plans], "cp": [p.cp for p in plans], "ep": [p.ep for p in plans],
            "etp": [p.etp or 0 for p in plans], "sp": [p.sp for p in plans], "zero": [p.zero for p in plans],
            "mbs": [p.mbs for p in plans], "num_microbatches": [p.num_microbatches or 0 for p in plans],
            "recompute": [POLICIES.index(p.recompute) for p in plans],
            "recompute_num_layers": [-1 if p.recompute_num_layers is None else p.recompute_num_layers
                                     for p in plans],
            "schedule": [SCHEDULES.index(p.schedule) for p in plans],
            "flash_attention": [p.flash_attention for p in plans],
            "overlap_grad_reduce": [p.overlap_grad_reduce for p in plans],
            "overlap_tp_comm": [p.overlap_tp_comm for p in plans],
            "cp_a2a": [p.cp_comm == "a2a" for p in plans],
            "moe_tp_slice": [p.moe_dispatch == "tp_slice" for p in plans],
            "moe_deepep": [p.moe_dispatch == "deepep" for p in plans],
            "seq_chunks": [p.seq_chunks for p in plans],
            "attention_pool": [p.attention_pool for p in plans],
            "offload_optimizer": [p.offload.optimizer for p in plans],
            "offload_activations": [p.offload.activations for p in plans],
        }
        return cls(**{k: np.array(v) for k, v in col.items()})

    def take(self, idx) -> PlanArrays:
        return PlanArrays(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def plan(self, i: int) -> ParallelPlan:
        """Row i as a ParallelPlan (validated)."""
        return ParallelPlan(
            dp=int(self.dp[i]), tp=int(self.tp[i]), pp=int(self.pp[i]), vpp=int(self.vpp[i]), cp=int(self.cp[i]),
            ep=int(self.ep[i]), etp=int(self.etp[i]) or None, sp=bool(self.sp[i]), zero=int(self.zero[i]),
            mbs=int(self.mbs[i]), num_microbatches=int(self.num_microbatches[i]) or None,
            recompute=POLICIES[int(self.recompute[i])],
            recompute_num_layers=None if self.recompute_num_layers[i] < 0 else int(self.recompute_num_layers[i]),
            offload=OffloadPolicy(optimizer=float(self.offload_optimizer[i]),
                                  activations=float(self.offload_activations[i])),
            schedule=SCHEDULES[int(self.schedule[i])], flash_attention=bool(self.flash_attention[i]),
            overlap_grad_reduce=bool(self.overlap_grad_reduce[i]), overlap_tp_comm=bool(self.overlap_tp_comm[i]),
            cp_comm="a2a" if self.cp_a2a[i] else "ring",
            moe_dispatch="tp_slice" if self.moe_tp_slice[i] else "deepep" if self.moe_deepep[i] else "a2a",
            seq_chunks=int(self.seq_chunks[i]), attention_pool=bool(self.attention_pool[i]))
