"""Plans as columns for estimate_batch (PlanArrays), and the index tables its integer columns point into.

Separate from planner/cost/batch.py because the search builds and filters these columns (planner/search/space.py)
without evaluating anything: the column layout is its own concept, shared by the search and the batch estimate.
"""
from __future__ import annotations

from operator import attrgetter

import numpy as np

from planner.core.dims import COLUMN, COLUMNS, RECOMPUTE_POLICIES, SCHEDULES, plan_fields
from planner.core.errors import BadInput
from planner.core.plan import ParallelPlan

POLICIES = RECOMPUTE_POLICIES  # the recompute column indexes it; SCHEDULES (re-exported) the schedule column
__all__ = ["POLICIES", "SCHEDULES", "PlanArrays"]


class PlanArrays:
    """Plans as columns (one entry per plan): one attribute per planner.core.dims.COLUMNS entry, named and
    typed there (dp, tp, ... as int64; sp, flash_attention, ... as bool; the offload fractions as float64),
    a value encoded as Column.encode says. None-able plan fields use a sentinel: etp 0 (= tp),
    num_microbatches 0 (= global_batch / (mbs * dp)), recompute_num_layers -1 (= every block). recompute is
    an index into POLICIES, schedule into SCHEDULES; cp_comm and moe_dispatch are bool columns, one per
    non-default choice (cp_a2a; moe_tp_slice, moe_deepep).

    Built from keyword columns: a column with a fill (the ParallelPlan default) may be left out, and a
    scalar stands for the same value in every row. An explicit partition is not representable: pass such
    plans as ParallelPlan objects."""

    __slots__ = tuple(COLUMN)

    def __init__(self, **columns):
        unknown = sorted(set(columns) - set(COLUMN))
        if unknown:
            raise TypeError(f"PlanArrays has no column {unknown[0]!r}")
        given = {}
        for col in COLUMNS:
            value = columns.get(col.name)
            if value is None:
                if col.fill is None:
                    raise TypeError(f"PlanArrays needs the column {col.name!r}")
                continue
            given[col.name] = np.asarray(value).astype(col.dtype)
        rows = next((len(a) for a in given.values() if a.ndim), 1)
        for col in COLUMNS:  # left out: the fill; a scalar: repeated
            a = given.get(col.name, col.fill)
            setattr(self, col.name, np.full(rows, a, dtype=col.dtype) if np.ndim(a) == 0 else a)
        if any(len(getattr(self, name)) != rows for name in COLUMN):
            raise BadInput("PlanArrays columns must all have the same length")

    def __len__(self) -> int:
        return len(self.dp)

    def columns(self) -> dict[str, np.ndarray]:
        """Column name -> array, in COLUMNS order."""
        return {name: getattr(self, name) for name in COLUMN}

    @classmethod
    def from_plans(cls, plans: list[ParallelPlan], partitions: bool = False) -> PlanArrays:
        """The plans' columns; partitions=True leaves their explicit partitions out (the caller keeps them)
        instead of refusing them."""
        if not partitions and any(p.partition is not None for p in plans):
            raise BadInput("PlanArrays cannot hold an explicit partition; pass the ParallelPlan list instead")
        cols = {}
        for col in COLUMNS:
            field, encode = attrgetter(col.field), col.encode
            cols[col.name] = np.array([encode(field(p)) for p in plans], dtype=col.dtype)
        return cls(**cols)

    def take(self, idx) -> PlanArrays:
        return PlanArrays(**{name: a[idx] for name, a in self.columns().items()})

    def plan(self, i: int) -> ParallelPlan:
        """Row i as a ParallelPlan (validated)."""
        return ParallelPlan(**plan_fields({name: a[i] for name, a in self.columns().items()}))
