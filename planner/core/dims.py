"""The planning vocabulary declared once: the pipeline schedules a plan may name, and the plan-level rules
each one brings, as data and as predicates.

Core imports nothing from cost/, so ParallelPlan validates its schedule here; the batch path
(planner/cost/batch.py) and the search enumeration (planner/search/space.py) apply the same predicates to
numpy columns, where a plan's schedule is its index in SCHEDULES. Every predicate works on both: pass
Python ints (one plan) or numpy int arrays (plan columns), and get a bool or a bool array back, True where
the plan keeps the rule (plain operators on a table lookup). How a schedule runs (op orders, closed
forms) lives in planner/cost/schedules/.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class ScheduleRules:
    """What a pipeline schedule allows a plan (Megatron-LM's argument checks; docs/formulas.md#pipeline-bubble).

    name                        the plan-file and CLI spelling.
    virtual_stages              vpp > 1 model chunks per device (Narayanan et al. 2021 section 2.2.2).
    sequence_chunks             seq_chunks > 1: each micro-batch flows as sequence chunks, backward last
                                chunk first (TeraPipe, Li et al. 2021; Seq1F1B, Sun et al. 2024).
    microbatches_multiple_of_pp its op order walks micro-batches in groups of pp (Megatron's
                                microbatch_group_size_per_vp_stage = pp), so m % pp == 0.
    """

    name: str
    virtual_stages: bool = False
    sequence_chunks: bool = False
    microbatches_multiple_of_pp: bool = False


# The order is the column encoding (PlanArrays.schedule indexes it): append new schedules at the end.
SCHEDULE_RULES: tuple[ScheduleRules, ...] = (
    ScheduleRules("gpipe", sequence_chunks=True),
    ScheduleRules("1f1b", sequence_chunks=True),
    ScheduleRules("interleaved-1f1b", virtual_stages=True, microbatches_multiple_of_pp=True),
    ScheduleRules("zb-h1"),
)
SCHEDULES: tuple[str, ...] = tuple(r.name for r in SCHEDULE_RULES)
SCHEDULE_INDEX: dict[str, int] = {name: i for i, name in enumerate(SCHEDULES)}

# the traits as bool columns indexed by schedule index: one lookup serves a plan or a million plan rows
_VIRTUAL = np.array([r.virtual_stages for r in SCHEDULE_RULES])
_SEQ_CHUNKS = np.array([r.sequence_chunks for r in SCHEDULE_RULES])
_MULTIPLE_OF_PP = np.array([r.microbatches_multiple_of_pp for r in SCHEDULE_RULES])


def schedules_with(trait: str) -> tuple[str, ...]:
    """The schedule names whose ScheduleRules field `trait` is true, in SCHEDULES order."""
    return tuple(r.name for r in SCHEDULE_RULES if getattr(r, trait))


def quoted_names(trait: str) -> str:
    """"'gpipe' or '1f1b'": the schedules with a trait, for error messages."""
    return " or ".join(f"'{name}'" for name in schedules_with(trait))


def vpp_fits_schedule(schedule, vpp):
    """vpp > 1 only under a schedule with virtual stages."""
    return (vpp <= 1) | _VIRTUAL[schedule]


def seq_chunks_fit_schedule(schedule, seq_chunks):
    """seq_chunks > 1 only under a schedule with sequence-chunk orders."""
    return (seq_chunks <= 1) | _SEQ_CHUNKS[schedule]


def microbatches_fit_schedule(schedule, microbatches, pp):
    """The micro-batch count a multiple of pp where the schedule walks micro-batches in groups of pp."""
    return (microbatches % pp == 0) | ~_MULTIPLE_OF_PP[schedule]


# the simulator, the closed forms and the search's bounds ask about the same few shapes many thousands of
# times: a cache hit costs a twentieth of the numpy scalar operations below
@lru_cache(maxsize=4096)
def schedule_problem(schedule: str, p: int, m: int, v: int = 1, n: int = 1) -> str | None:
    """Why a pipeline of p devices, m micro-batches, v chunks per device and n sequence chunks cannot run
    under `schedule`, or None when it can: the rules above in the order the simulator checks them."""
    if schedule not in SCHEDULE_INDEX:
        return f"unknown pipeline schedule {schedule!r}; expected one of {SCHEDULES}"
    if p < 1 or m < 1 or v < 1 or n < 1:
        return f"p, m, v and seq_chunks must be >= 1 (got p={p}, m={m}, v={v}, seq_chunks={n})"
    ix = SCHEDULE_INDEX[schedule]
    if not seq_chunks_fit_schedule(ix, n):
        return (f"seq_chunks={n} needs schedule {quoted_names('sequence_chunks')} (TeraPipe, Seq1F1B), "
                f"got {schedule!r}")
    if not microbatches_fit_schedule(ix, m, p):
        return (f"{schedule} needs the number of micro-batches ({m}) to be a multiple of the pipeline size "
                f"({p}) (Narayanan et al. 2021 section 2.2.2)")
    if not vpp_fits_schedule(ix, v):
        return f"v={v} virtual stages needs schedule {quoted_names('virtual_stages')}, got {schedule!r}"
    return None
