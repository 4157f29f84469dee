"""The planning vocabulary declared once: every parallel dimension and knob of a plan (its ParallelPlan field,
its column in PlanArrays, how a value is encoded there, its CLI flag, its bound, its place in the rank order),
the pipeline schedules with the rules each brings, and the cross-dimension rules as named predicates.

Core imports nothing from cost/, so ParallelPlan validates itself here; the batch path (planner/cost/batch.py)
and the search enumeration (planner/search/space.py) apply the same predicates to numpy columns, where an
enum is its index in its choices (a plan's schedule its index in SCHEDULES). Every predicate works on both:
pass Python scalars (one plan) or numpy arrays (plan columns), and get a bool or a bool array back, True where
the plan keeps the rule. How a schedule runs (op orders, closed forms) lives in planner/cost/schedules/.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from planner.core.limits import MAX_DEVICES, MAX_GLOBAL_BATCH, MAX_MICROBATCHES, MAX_SEQ_LEN


@dataclass(frozen=True)
class ScheduleRules:
    """What a pipeline schedule allows a plan (Megatron-LM's argument checks; docs/formulas.md#pipeline-bubble).

    name                        the plan-file and CLI spelling.
    virtual_stages              vpp > 1 model chunks per device (Narayanan et al. 2021 section 2.2.2).
    sequence_chunks             seq_chunks > 1: each micro-batch flows as sequence chunks, backward last
                                chunk first (TeraPipe, Li et al. 2021; Seq1F1B, Sun et al. 2024).
    microbatches_at_least_pp    its op order walks micro-batches in groups of at least pp (Megatron-Core's
                                microbatch_group_size_per_vp_stage: pp <= N <= m), so m >= pp; m need not
                                be a multiple of pp (planner/cost/schedules/interleaved.py chooses N).
    staleness_steps             optimizer steps between the weights a micro-batch's gradient was computed on
                                and the weights it updates: 0 synchronous; 1 for PipeDream-2BW (Narayanan et
                                al. 2021, "Memory-Efficient Pipeline-Parallel DNN Training", section 3.1).
                                An asynchronous schedule changes the optimizer's semantics, so the search
                                enumerates it only when asked (SEARCHED_SCHEDULES).
    weight_versions             copies of a stage's weights held on the device (2BW: 2, the paper's
                                "double-buffered weights").
    """

    name: str
    virtual_stages: bool = False
    sequence_chunks: bool = False
    microbatches_at_least_pp: bool = False
    staleness_steps: int = 0
    weight_versions: int = 1


# The order is the column encoding (PlanArrays.schedule indexes it): append new schedules at the end.
SCHEDULE_RULES: tuple[ScheduleRules, ...] = (
    ScheduleRules("gpipe", sequence_chunks=True),
    ScheduleRules("1f1b", sequence_chunks=True),
    ScheduleRules("interleaved-1f1b", virtual_stages=True, microbatches_at_least_pp=True),
    ScheduleRules("zb-h1"),
    ScheduleRules("async-1f1b", staleness_steps=1, weight_versions=2),
)
SCHEDULES: tuple[str, ...] = tuple(r.name for r in SCHEDULE_RULES)
# what the search tries without --schedule: the synchronous schedules (an asynchronous one is a choice of
# optimizer semantics the user makes, not a speed-up the search may pick silently)
SEARCHED_SCHEDULES: tuple[str, ...] = tuple(r.name for r in SCHEDULE_RULES if r.staleness_steps == 0)
SCHEDULE_INDEX: dict[str, int] = {name: i for i, name in enumerate(SCHEDULES)}

# the traits as bool columns indexed by schedule index: one lookup serves a plan or a million plan rows
_VIRTUAL = np.array([r.virtual_stages for r in SCHEDULE_RULES])
_SEQ_CHUNKS = np.array([r.sequence_chunks for r in SCHEDULE_RULES])
_AT_LEAST_PP = np.array([r.microbatches_at_least_pp for r in SCHEDULE_RULES])
WEIGHT_VERSIONS = np.array([r.weight_versions for r in SCHEDULE_RULES])  # by schedule index


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
    """At least pp micro-batches where the schedule walks them in groups of at least pp. Megatron-Core's
    interleaved schedule (megatron/core/pipeline_parallel/schedules.py, main @ d98e8a64dd) needs
    pp <= microbatch_group_size_per_vp_stage <= m and no last group shorter than pp, which some group size
    meets for every m >= pp; Megatron-LM of 2021 asked m % pp == 0, no longer the rule."""
    return (microbatches >= pp) | ~_AT_LEAST_PP[schedule]


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
        return (f"{schedule} needs at least as many micro-batches ({m}) as pipeline stages ({p}) "
                "(Megatron-Core's microbatch_group_size_per_vp_stage rule); raise the global batch or lower pp")
    if not vpp_fits_schedule(ix, v):
        return f"v={v} virtual stages needs schedule {quoted_names('virtual_stages')}, got {schedule!r}"
    return None


# ---------------------------------------------------------------------------------------------------------
# the plan's dimensions and knobs

# Each tuple's order is its column encoding (an enum column holds the index): append new choices at the end.
RECOMPUTE_POLICIES: tuple[str, ...] = ("none", "selective", "full")
ZERO_STAGES: tuple[int, ...] = (0, 1, 2, 3)
CP_COMMS: tuple[str, ...] = ("ring", "a2a")  # ring attention; DeepSpeed-Ulysses all-to-all
MOE_DISPATCHES: tuple[str, ...] = ("a2a", "tp_slice", "deepep")  # all-to-all; Pipeline MoE; DeepEP


@dataclass(frozen=True)
class Column:
    """One dimension or knob of a plan: its ParallelPlan field and its PlanArrays column.

    name        the PlanArrays attribute (the column).
    field       the ParallelPlan field; "offload.optimizer" reaches into the OffloadPolicy.
    dtype       the column's numpy dtype.
    encoding    how a field value becomes a column value:
                  "value"       as it is;
                  "index"       its index in `choices`;
                  "none_below"  None as lowest - 1 (a value below any the field takes), else as it is;
                  "marks"       True where the field is `marks` (one bool column per non-default choice;
                                the field is choices[0] where none of its columns is set).
    choices     the values the field takes (an "index" or "marks" column: in column order).
    marks       the choice a "marks" column is True for.
    lowest      the smallest value a "none_below" field takes.
    fill        the column value where a caller leaves the column out (the ParallelPlan default); None:
                the column is required.
    flag        the command-line flag that fixes it (None: set by the software stack or a plan file only).
    cap         the largest value a plan may give it (planner/core/limits.py), where it is a size.
    rank_order  for the degrees that split a stage's devices: the position in Megatron's rank order, fastest
                varying first (RANK_ORDER).
    """

    name: str
    field: str
    dtype: type
    encoding: str = "value"
    choices: tuple = ()
    marks: object = None
    lowest: int = 0
    fill: object = None
    flag: str | None = None
    cap: int | None = None
    rank_order: int | None = None

    def encode(self, value):
        """The column value of a ParallelPlan field value."""
        if self.encoding == "index":
            return self.choices.index(value)
        if self.encoding == "none_below":
            return self.lowest - 1 if value is None else value
        if self.encoding == "marks":
            return value == self.marks
        return value


# Every ParallelPlan field but the explicit partition (a list of stages: not a column). The degrees first.
COLUMNS: tuple[Column, ...] = (
    Column("dp", "dp", np.int64, flag="--dp", cap=MAX_DEVICES, rank_order=2),
    Column("tp", "tp", np.int64, flag="--tp", cap=MAX_DEVICES, rank_order=0),
    Column("pp", "pp", np.int64, flag="--pp", cap=MAX_DEVICES, rank_order=3),
    Column("vpp", "vpp", np.int64, flag="--vpp", cap=MAX_DEVICES),
    Column("cp", "cp", np.int64, flag="--cp", cap=MAX_DEVICES, rank_order=1),
    Column("ep", "ep", np.int64, flag="--ep", cap=MAX_DEVICES),
    # etp None: the experts split like attention (etp = tp); column 0
    Column("etp", "etp", np.int64, "none_below", lowest=1, cap=MAX_DEVICES),
    Column("sp", "sp", np.bool_, flag="--sp"),
    Column("zero", "zero", np.int64, choices=ZERO_STAGES, flag="--zero"),
    Column("mbs", "mbs", np.int64, flag="--mbs", cap=MAX_GLOBAL_BATCH),
    # num_microbatches None: global_batch / (mbs * dp); column 0
    Column("num_microbatches", "num_microbatches", np.int64, "none_below", lowest=1, cap=MAX_MICROBATCHES),
    Column("recompute", "recompute", np.int64, "index", RECOMPUTE_POLICIES, flag="--recompute"),
    # recompute_num_layers None: every block of a chunk; column -1
    Column("recompute_num_layers", "recompute_num_layers", np.int64, "none_below", lowest=0,
           flag="--recompute-num-layers"),
    Column("schedule", "schedule", np.int64, "index", SCHEDULES, flag="--schedule"),
    Column("flash_attention", "flash_attention", np.bool_),
    Column("overlap_grad_reduce", "overlap_grad_reduce", np.bool_),
    Column("offload_optimizer", "offload.optimizer", np.float64, flag="--offload"),
    Column("offload_activations", "offload.activations", np.float64, flag="--offload-activations"),
    Column("overlap_tp_comm", "overlap_tp_comm", np.bool_, fill=False, flag="--overlap-tp-comm"),
    Column("cp_a2a", "cp_comm", np.bool_, "marks", CP_COMMS, marks="a2a", fill=False),
    Column("moe_tp_slice", "moe_dispatch", np.bool_, "marks", MOE_DISPATCHES, marks="tp_slice", fill=False,
           flag="--moe-dispatch"),
    Column("moe_deepep", "moe_dispatch", np.bool_, "marks", MOE_DISPATCHES, marks="deepep", fill=False,
           flag="--moe-dispatch"),
    Column("seq_chunks", "seq_chunks", np.int64, fill=1, flag="--seq-chunks", cap=MAX_SEQ_LEN),
    Column("attention_pool", "attention_pool", np.bool_, fill=False, flag="--attention-pool"),
    # low-bandwidth training (planner/cost/step_terms.py#low-bandwidth): DiLoCo's inner steps between
    # pseudo-gradient syncs, the fraction of those bytes sent (SparseLoCo top-k / quantisation), and the
    # fraction of pipeline activation bytes sent (subspace compression); the defaults change nothing
    Column("local_steps", "local_steps", np.int64, fill=1, flag="--local-steps"),
    Column("grad_compression", "grad_compression", np.float64, fill=1.0, flag="--grad-compression"),
    Column("act_compression", "act_compression", np.float64, fill=1.0, flag="--act-compression"),
    # frozen encoders' forward in the pipeline bubbles (planner/cost/frozen_fill.py); False changes nothing
    Column("fill_frozen", "fill_frozen", np.bool_, fill=False, flag="--fill-frozen"),
)
COLUMN: dict[str, Column] = {c.name: c for c in COLUMNS}

# Megatron's rank order (parallel_state.RankGenerator, order "tp-cp-ep-dp-pp"): tp varies fastest, then cp,
# then dp, then pp. The MoE layers refold the same dp*cp*tp ranks of a stage as etp, then ep, then the expert
# data-parallel group edp (MoE Parallel Folding, Liu et al. 2025).
RANK_ORDER: tuple[str, ...] = tuple(sorted((c.name for c in COLUMNS if c.rank_order is not None),
                                           key=lambda name: COLUMN[name].rank_order))
EXPERT_RANK_ORDER: tuple[str, ...] = ("etp", "ep", "edp", "pp")


def rank_stride(dim: str, degrees: dict, order: tuple[str, ...] = RANK_ORDER):
    """How far apart in global rank two neighbours of group `dim` sit: the product of the degrees that vary
    faster (scalars or columns)."""
    stride = 1
    for faster in order[:order.index(dim)]:
        stride = stride * degrees[faster]
    return stride


def plan_fields(row: dict) -> dict:
    """ParallelPlan keyword arguments from one plan's column values (the inverse of Column.encode); the
    offload fractions as an "offload" dict."""
    out: dict = {}
    for col in COLUMNS:
        x = row[col.name]
        if col.encoding == "marks":
            if x:
                out.setdefault(col.field, col.marks)  # the first set column names the choice
            continue
        if col.encoding == "index":
            value = col.choices[int(x)]
        elif col.encoding == "none_below":
            value = None if x < col.lowest else int(x)
        else:
            value = col.dtype(x).item()  # a Python int, bool or float
        owner, _, inner = col.field.partition(".")
        if inner:
            out.setdefault(owner, {})[inner] = value
        else:
            out[owner] = value
    for col in COLUMNS:
        if col.encoding == "marks":
            out.setdefault(col.field, col.choices[0])
    return out


# ---------------------------------------------------------------------------------------------------------
# the cross-dimension rules (Megatron-LM's argument checks; docs/formulas.md): scalars or columns, True
# where the plan keeps the rule. A column holds its encoded values: etp 0 is etp = tp. Plain operators only:
# ParallelPlan validates every plan built with them, where numpy's scalar calls would triple its cost.


def _not(flag):
    """Logical not of a Python bool or a bool array (~True is -2: Python's ~ is bitwise on ints)."""
    return flag ^ True


def expert_tp(etp, tp):
    """The experts' tensor-parallel degree: etp, or tp where etp is left as tp (None, column 0)."""
    return etp + tp * (etp <= 0)


def sp_fits_tp(sp, tp):
    """Sequence parallel splits activations along the tensor-parallel group, so it needs tp > 1."""
    return _not(sp) | (tp > 1)


def recompute_layers_fit_policy(recompute_num_layers, recompute):
    """A partial recompute count (Megatron's block method) only with the full policy; both encoded."""
    return (recompute_num_layers < 0) | (recompute == RECOMPUTE_POLICIES.index("full"))


def ulysses_fits_cp(cp_a2a, cp):
    """Ulysses' all-to-all re-shards along the context-parallel group, so it needs cp > 1."""
    return _not(cp_a2a) | (cp > 1)


def seq_chunks_fit_attention(seq_chunks, flash_attention):
    """Sequence chunks only with a fused attention core: an unfused core's score tensor against a growing
    prefix is not modelled."""
    return (seq_chunks <= 1) | flash_attention


def tp_slice_fits_degrees(moe_tp_slice, tp, ep, etp):
    """Pipeline MoE (Chen et al. 2023 section 3) puts E/tp whole experts on each tensor-parallel rank: tp > 1,
    ep = tp, expert tp 1."""
    return _not(moe_tp_slice) | ((tp > 1) & (ep == tp) & (expert_tp(etp, tp) == 1))


def deepep_fits_ep(moe_deepep, ep):
    """DeepEP exchanges tokens over the expert-parallel group, so it needs ep > 1."""
    return _not(moe_deepep) | (ep > 1)


def experts_fold_into_ranks(ep, etp, dp, cp, tp):
    """MoE Parallel Folding (Liu et al. 2025): the etp x ep x edp expert grid covers a stage's dp*cp*tp
    ranks, so ep * etp divides dp * cp * tp."""
    return (dp * cp * tp) % (ep * expert_tp(etp, tp)) == 0


def local_sgd_fits_zero(local_steps, grad_compression, zero):
    """DiLoCo's replicas take local_steps inner steps apart, each with its own inner optimizer state (Douillard
    et al. 2023, Algorithm 1), and a compressed (top-k) gradient is all-reduced, not reduce-scattered
    (SparseLoCo 2025): either needs unsharded states, ZeRO 0."""
    return ((local_steps <= 1) & (grad_compression >= 1.0)) | (zero == 0)


def experts_nest_in_dp(ep, dp, cp):
    """Without folding Megatron nests the expert group in the data-parallel group: ep divides dp * cp."""
    return (dp * cp) % ep == 0
