"""Per-device op orders of the pipeline schedules: which forward (F), backward (B) and weight-gradient (W)
ops each device runs, in which order, as lists of (kind, work item, chunk) or as flat arrays. What
pipeline.simulate times and batch_dag turns into DAGs (docs/formulas.md#pipeline-bubble). Each schedule's
order is defined in its own module under planner/cost/schedules/; this module checks the arguments and
dispatches by name.
"""
from __future__ import annotations

import numpy as np

from planner.core.dims import SCHEDULES, schedule_problem
from planner.cost.schedules import get_schedule

__all__ = ["SCHEDULES", "order_arrays", "schedule_order"]


def check_schedule_args(schedule: str, p: int, m: int, v: int, n: int = 1) -> None:
    """ValueError when (p, m, v, seq_chunks n) cannot run under `schedule` (planner/core/dims.py rules)."""
    problem = schedule_problem(schedule, p, m, v, n)
    if problem is not None:
        raise ValueError(problem)


def schedule_order(schedule: str, p: int, m: int, v: int = 1, n: int = 1) -> list[list[tuple[str, int, int]]]:
    """The op order of every device: per device a list of (kind, item, chunk). n > 1 (gpipe, 1f1b): each
    micro-batch's sequence runs as n chunks, items q*n + c (schedules.backward_items)."""
    check_schedule_args(schedule, p, m, v, n)
    spec = get_schedule(schedule)
    return [spec.device_order(p, i, m, v, n) for i in range(p)]


def order_arrays(schedule: str, p: int, m: int, v: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """schedule_order as flat arrays, device after device: kind (0 F, 1 B, 2 W), item, chunk, and the op
    count per device; tests/test_batch_dag_compiled.py checks them against schedule_order op for op."""
    return get_schedule(schedule).order_arrays(p, m, v, n)
