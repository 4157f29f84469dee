"""Pipeline schedules: an op-level dependency simulation and the published closed forms.

Pure functions, no I/O (docs/formulas.md#memory-inflight and docs/formulas.md#pipeline-bubble).

The simulation (`simulate`) takes per-stage forward and backward times of one micro-batch, builds the
order in which every device runs its ops under the chosen schedule, and times the ops: an op starts
when its device has finished the op before it in that order *and* the op it depends on has finished
(plus `p2p_s` when that op ran on another device). With a fixed per-device order this is the longest
path through the op DAG, so it is exact for the model's assumptions (compute and p2p only, sends do not
occupy the compute stream, no optimizer step) and monotone: making any op longer never makes the step
shorter.

Dependencies (virtual stage k = chunk * p + device; p*v virtual stages in all):
  F(k, j) after F(k-1, j)          (+ p2p_s when they sit on different devices)
  B(k, j) after B(k+1, j)          (+ p2p_s), and after F(k, j) on the last virtual stage
  W(k, j) after B(k, j)            (zb-h1 only; same device)

The per-device orders and closed forms of each schedule are in planner/cost/schedules/ (one module each);
this module times them and dispatches the closed forms by schedule name.
"""
from __future__ import annotations

import gc
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
from typing import Literal, NamedTuple, Sequence

import numpy as np

from planner.core.dims import SCHEDULES
from planner.cost.schedule_order import check_schedule_args, order_arrays, schedule_order
from planner.cost.schedules import get_schedule

PipelineSchedule = Literal[SCHEDULES]

__all__ = ["SCHEDULES", "PipelineEvent", "PipelineResult", "PipelineSchedule", "bubble_fraction_closed",
           "bubble_time_closed", "inflight_microbatches", "schedule_order", "schedule_peaks", "simulate",
           "simulate_times"]


class PipelineEvent(NamedTuple):
    """One op on one device. `chunk` is the model chunk on that device (0..v-1); its virtual stage is
    chunk * p + device. kind: 'F' forward, 'B' backward (input + weight grad, or input grad only under
    zb-h1), 'W' weight grad (zb-h1)."""

    device: int
    kind: str
    microbatch: int
    chunk: int
    start_s: float
    end_s: float


@dataclass(frozen=True)
class PipelineResult:
    """What `simulate` returns.

    step_time_s       makespan: end of the last op (first op starts at 0).
    busy_s            per device, summed op durations.
    idle_s            per device, step_time_s - busy_s.
    bubble_s          step_time_s - max(busy_s): the idle time of the busiest device, i.e. what the
                      pipeline adds on top of the slowest device's own work. With equal stages this is
                      Narayanan's t_pb = (p-1)(t_f+t_b) (1F1B/GPipe).
    bubble_fraction   bubble_s / step_time_s: the bubble as a share of the step (docs/formulas.md#pipeline-bubble,
                      "as a share of step time"), e.g. (p-1)/(m+p-1) for 1F1B with equal stages.
    peak_inflight     per device, the most micro-batches whose forward has run and whose backward (B)
                      has not finished: activations held. Under interleaving the unit is one chunk's
                      activations for one micro-batch (divide by v for whole-device micro-batches); with
                      seq_chunks > 1, one sequence chunk's.
    peak_pending_w    per device, the most deferred W's: B's whose W has not run, sampled after every F
                      and W op, so a W that runs straight after its own B does not count (zb-h1 with m >= p:
                      i on rank i; 0 for the other schedules). Each holds the W part of a
                      micro-batch's activations (Qi et al. M_W).
    events            every op, in start order per device.
    """

    schedule: str
    p: int
    v: int
    m: int
    step_time_s: float
    busy_s: tuple[float, ...]
    idle_s: tuple[float, ...]
    bubble_s: float
    bubble_fraction: float
    peak_inflight: tuple[int, ...]
    peak_pending_w: tuple[int, ...]
    events: tuple[PipelineEvent, ...]
    seq_chunks: int = 1  # sequence chunks per micro-batch: m * seq_chunks work items ran


# ----------------------------------------------------------------------------------------------
# simulation
#
# Both `simulate` and `simulate_times` time the ops of a `_compiled` op list: the schedule's op order and
# dependencies resolved once per (schedule, p, m, v, seq_chunks) into integer indices, durations left out.
# The first version of `simulate` re-derived every dependency per call through a tuple-keyed dict; with
# thousands of micro-batches (Llama 3.1 405B at 512 GPUs: pp 32, m 2048, ~200k ops) that Python loop,
# run once per pipeline shape by cost.batch's DAG builder and once per plan by the partition refinement,
# dominated `bench_search.py speed` (cProfile: 41 of 59 s). An op's end time depends only on its own
# dependency and the op before it on its device, so any order that times every dependency first gives the
# same floats; tests/test_simulate_fast.py checks the result against that first version, field for field.


@contextmanager
def _gc_paused():
    """Pause CPython's cyclic garbage collector while building long lists of tuples. The collector runs a
    young-generation pass every 700 net container allocations (gc.get_threshold(), Python docs "gc") and
    older passes that walk every live tracked object; the 10^5-10^6 event or order tuples of a long pipeline
    are all reachable, so those passes free nothing and tripled the time to build them. Tuples of numbers
    and strings cannot form cycles, so nothing is left for the collector once it runs again."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _check_times(fwd: list, bwd: list, v: int, p2p_s: float) -> int:
    """simulate's argument checks on the stage times; returns p."""
    if len(fwd) != len(bwd) or not fwd:
        raise ValueError(f"fwd_s and bwd_s must be non-empty and the same length "
                         f"(got {len(fwd)} and {len(bwd)})")
    if len(fwd) % v != 0:
        raise ValueError(f"{len(fwd)} stage times do not split into v={v} chunks per device")
    if any(x < 0 for x in fwd + bwd) or p2p_s < 0:
        raise ValueError("stage and p2p times must be >= 0")
    return len(fwd) // v


def backward_split(schedule: str, bwd: list, wgrad_s, n_stages: int) -> tuple[list, list | None]:
    """(B op durations, W op durations or None) per stage: under a schedule that splits the backward (zb-h1)
    it runs as the input gradient (B) and the weight gradient (W, default half of it; Qi et al. 2023);
    otherwise B is all of it."""
    if get_schedule(schedule).splits_backward:
        w = [x / 2 for x in bwd] if wgrad_s is None else [float(x) for x in wgrad_s]
        if len(w) != n_stages or any(x < 0 or x > b for x, b in zip(w, bwd)):
            raise ValueError("wgrad_s must have one entry per stage, each within [0, bwd_s]")
        return [b - x for b, x in zip(bwd, w)], w
    if wgrad_s is not None:
        raise ValueError(f"wgrad_s only applies to schedule {' or '.join(map(repr, schedules_with_split()))}")
    return bwd, None


def simulate(schedule: str, fwd_s: Sequence[float], bwd_s: Sequence[float], m: int, v: int = 1,
             p2p_s: float = 0.0, wgrad_s: Sequence[float] | None = None, seq_chunks: int = 1) -> PipelineResult:
    """Time one training step of a pipeline by dependency simulation.

    fwd_s, bwd_s: per virtual stage (length p*v; virtual stage k runs on device k % p as chunk k // p),
    one micro-batch's forward and full backward time. m: micro-batches per step. p2p_s: time to send
    an activation (or its gradient) between adjacent stages on different devices. wgrad_s (zb-h1
    only): per stage, the weight-gradient part of bwd_s; default bwd_s / 2. Under zb-h1 the B op
    takes bwd_s - wgrad_s and the W op wgrad_s. seq_chunks n: each micro-batch runs as n sequence chunks
    (fwd_s, bwd_s: one chunk's), m * n work items; events and peak_inflight count items.

    Every op starts at max(end of the op before it on its device, end of its dependency + p2p_s when that
    ran on another device) and ends its duration later; busy_s sums each device's op durations in its order.
    """
    fwd = [float(x) for x in fwd_s]
    bwd = [float(x) for x in bwd_s]
    p = _check_times(fwd, bwd, v, p2p_s)
    check_schedule_args(schedule, p, m, v, seq_chunks)
    n_stages = p * v

    b_dur, w = backward_split(schedule, bwd, wgrad_s, n_stages)
    dur = fwd + b_dur + (w or [])

    comp = _compiled(schedule, p, m, v, seq_chunks)
    spec = get_schedule(schedule)
    if spec.steady_state:  # the events: one step's op order from an empty pipeline, timed as 1F1B's
        return _steady(schedule, fwd, bwd, m, p2p_s,
                       simulate(spec.timeline_schedule, fwd, bwd, m, v, p2p_s, None, seq_chunks).events)
    end = [0.0]
    append = end.append
    starts = []
    sappend = starts.append
    free = [0.0] * p
    busy = [0] * p  # the first version summed each device's event durations with sum(), from the int 0
    for d, slot, dep, cross in zip(comp.dev, comp.slot, comp.dep, comp.cross):
        r = end[dep] + (p2p_s if cross else 0.0)
        f = free[d]
        start = f if f >= r else r  # max(free, r): Python's max keeps the first on ties
        stop = start + dur[slot]
        append(stop)
        sappend(start)
        free[d] = stop
        busy[d] += stop - start

    step = max(free)
    busy_t = tuple(busy)
    # events device by device in each device's order: the ops' start and end by their sweep index
    at = comp.where
    ev_start = np.asarray(starts)[at].tolist()
    ev_end = np.asarray(end)[at + 1].tolist()
    # tuple.__new__(PipelineEvent, fields) is what PipelineEvent._make does (collections.namedtuple), here
    # mapped in C: the generated per-event __new__ took a third of simulate's time on long pipelines
    fields = zip(comp.e_dev, map("FBW".__getitem__, comp.e_kind), comp.e_item, comp.e_chunk, ev_start, ev_end)
    with _gc_paused():
        events = tuple(map(tuple.__new__, repeat(PipelineEvent), fields))
    bubble = step - max(busy_t)
    return PipelineResult(
        schedule=schedule, p=p, v=v, m=m, step_time_s=step, busy_s=busy_t,
        idle_s=tuple(step - b for b in busy_t), bubble_s=bubble,
        bubble_fraction=bubble / step if step > 0 else 0.0,
        peak_inflight=comp.peak_inflight, peak_pending_w=comp.peak_pending_w,
        events=events, seq_chunks=seq_chunks,
    )


def _steady(schedule: str, fwd: list, bwd: list, m: int, p2p_s: float, events: tuple) -> PipelineResult:
    """A schedule that never flushes (schedules/base.py steady_state, v = seq_chunks = 1): the step is its
    closed form, each device busy m (F + B), the bubble what the step adds to the busiest device; peaks from
    the op order. events (simulate only): the first step's ops from an empty pipeline, which end later than
    the steady step (the fill, paid once per job)."""
    spec, p = get_schedule(schedule), len(fwd)
    fb = np.add(fwd, bwd)
    step = float(spec.steady_step_s(fb[None, :], np.array([p2p_s]), m)[0])
    busy = tuple((m * fb).tolist())
    comp = _compiled(schedule, p, m, 1, 1)
    bubble = step - max(busy)
    return PipelineResult(schedule=schedule, p=p, v=1, m=m, step_time_s=step, busy_s=busy,
                          idle_s=tuple(step - b for b in busy), bubble_s=bubble,
                          bubble_fraction=bubble / step if step > 0 else 0.0, peak_inflight=comp.peak_inflight,
                          peak_pending_w=comp.peak_pending_w, events=events)


@dataclass(frozen=True)
class _Compiled:
    """The op processing of one (schedule, p, m, v, seq_chunks), durations left out.

    In sweep order (every op after its dependency and after the op before it on its device): dev (device),
    slot (index into the duration list fwd + B + W: virtual stage k of kind F/B/W at k, n + k, 2n + k),
    dep (1 + the index of the op it waits for, 0 for none: a sentinel end time of 0.0, the start of F on
    virtual stage 0), cross (the dependency ran on another device, so p2p_s is added).
    In device order (device by device, each in schedule_order's order: simulate's event order): where (the
    op's index in sweep order), and the event fields e_dev, e_kind (0 F, 1 B, 2 W), e_item, e_chunk.
    Compact arrays: a pp-32 pipeline of 2048 micro-batches has ~200k ops."""

    dev: array
    slot: array
    dep: array
    cross: bytes
    where: np.ndarray
    e_dev: array
    e_kind: bytes
    e_item: array
    e_chunk: array
    peak_inflight: tuple
    peak_pending_w: tuple


def _peaks(schedule: str, kind: np.ndarray, bounds: list) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per device, the most micro-batches (items) in flight (F run, B not: the running count after each F)
    and the most deferred W's (B adds one under zb-h1, W takes one; counted after every F and W op, so a W
    run straight after its own B never counts as pending). kind: 0 F, 1 B, 2 W in device order."""
    held = np.where(kind == 0, 1, np.where(kind == 1, -1, 0))
    wait = np.where(kind == 1, int(get_schedule(schedule).splits_backward), np.where(kind == 2, -1, 0))
    inflight, pending = [], []
    for lo, hi in bounds:
        kd = kind[lo:hi]
        h = np.cumsum(held[lo:hi])[kd == 0]
        w = np.cumsum(wait[lo:hi])[kd != 1]
        inflight.append(max(0, int(h.max())) if len(h) else 0)
        pending.append(max(0, int(w.max())) if len(w) else 0)
    return tuple(inflight), tuple(pending)


def unit_ends(dep: np.ndarray, bounds: list) -> np.ndarray:
    """Every op's end time with unit durations and no p2p (device order; dep: the op each waits for, n_ops:
    none), i.e. its topological level + 1: the longest path E = 1 + max(E[op before on the device], E[dep]).

    Along one device that recurrence is a running maximum (E[i] - i = max over j <= i of E[dep j] - j, with
    i, j places in the device's order), so a whole device is one np.maximum.accumulate given its deps' ends.
    Sweeping the devices with the latest ends of the others (Gauss-Seidel), alternately first to last, which
    carries forwards down the pipeline in one sweep, and last to first, which carries backwards up it, meets
    the fixed point in 3-4 sweeps on the pipelines of bench_search.py at 512 GPUs (p up to 64), where updating
    all ops at once (Jacobi) needed 2p - 1.
    The DAG makes the fixed point unique and the sweeps only ever raise ends towards it from below, so
    stopping when a whole sweep changes nothing gives the exact longest paths."""
    n_ops = len(dep)
    end = np.zeros(n_ops + 1, dtype=np.int64)  # end[n_ops] = 0: the sentinel of ops with no dependency
    segs = []
    for lo, hi in bounds:
        place = np.arange(hi - lo, dtype=np.int64)
        end[lo:hi] = place + 1  # the device's own chain: a lower bound
        segs.append((lo, hi, dep[lo:hi], place))
    back = segs[::-1]
    # a sweep does at least what a Jacobi step does, and Jacobi settles within longest path + 1 steps (<= n_ops)
    for sweep in range(n_ops + 2):
        changed = False
        for lo, hi, d, place in segs if sweep % 2 == 0 else back:
            e = np.maximum.accumulate(end[d] - place)
            e += place + 1
            if not changed and not np.array_equal(e, end[lo:hi]):
                changed = True
            end[lo:hi] = e
        if not changed:
            return end[:n_ops]
    raise AssertionError("pipeline DAG: the unit-time longest paths did not converge (a cycle?)")


def _dependencies(kind: np.ndarray, item: np.ndarray, chunk: np.ndarray, dev: np.ndarray, p: int, n_stages: int,
                  total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(virtual stage, slot, dependency op id, dependency on another device) of every op listed by kind /
    item / chunk / device; the dependency is len(kind) for ops without one."""
    n_ops = len(kind)
    k = chunk * p + dev
    slot = kind * n_stages + k
    # the dependency's slot (module docstring): F(k) after F(k-1) (none on virtual stage 0); B(k) after
    # B(k+1), or F(k) on the last virtual stage; W(k) after B(k)
    dslot = np.where(kind == 0, k - 1, np.where(kind == 2, n_stages + k,
                                                 np.where(k == n_stages - 1, k, n_stages + k + 1)))
    has = dslot >= 0
    op_of = np.full(3 * n_stages * total, -1, dtype=np.int64)  # (slot, item) -> op id
    op_of[slot * total + item] = np.arange(n_ops)
    dep = np.full(n_ops, n_ops, dtype=np.int64)  # n_ops: no dependency (always placed)
    dep[has] = op_of[dslot[has] * total + item[has]]
    cross = has & ((dslot % n_stages) % p != dev)
    return k, slot, dep, cross


@lru_cache(maxsize=128)
def _compiled(schedule: str, p: int, m: int, v: int, n: int = 1) -> _Compiled:
    check_schedule_args(schedule, p, m, v, n)
    n_stages = p * v
    total = m * n  # work items
    # every op in device order (op id g = d * per_dev + its place in device d's order)
    kind, item, chunk, per_dev = order_arrays(schedule, p, m, v, n)
    n_ops = p * per_dev
    bounds = [(d * per_dev, (d + 1) * per_dev) for d in range(p)]
    dev = np.repeat(np.arange(p, dtype=np.int64), per_dev)
    k, slot, dep, cross = _dependencies(kind, item, chunk, dev, p, n_stages, total)
    if np.any(dep < 0):  # cannot happen for the orders above; guards future schedules
        raise RuntimeError(f"schedule {schedule!r} deadlocks (p={p}, m={m}, v={v})")
    # sweep order: by unit-time level, device order within a level. Both an op's dependency and the op
    # before it on its device sit on a lower level, so this times every op after both (the section comment
    # above: the same floats as any such order); the first version's device-by-device sweep was a Python
    # loop over every op
    try:
        level = unit_ends(dep, bounds)
    except AssertionError:  # a cycle: cannot happen for the orders above; guards future schedules
        raise RuntimeError(f"schedule {schedule!r} deadlocks (p={p}, m={m}, v={v})") from None
    seq = np.argsort(level, kind="stable")
    where = np.empty(n_ops + 1, dtype=np.int64)  # op id -> index in sweep order; n_ops -> -1 (sentinel)
    where[seq] = np.arange(n_ops)
    where[n_ops] = -1
    inflight, pending = _peaks(schedule, kind, bounds)

    def i32(x: np.ndarray) -> array:
        return array("i", x.astype(np.int32).tobytes())

    return _Compiled(dev=i32(dev[seq]), slot=i32(slot[seq]), dep=i32(where[dep[seq]] + 1),
                     cross=cross[seq].astype(np.uint8).tobytes(), where=where[:n_ops].astype(np.int32),
                     e_dev=i32(dev), e_kind=kind.astype(np.uint8).tobytes(), e_item=i32(item), e_chunk=i32(chunk),
                     peak_inflight=inflight, peak_pending_w=pending)


def schedule_peaks(schedule: str, p: int, m: int, v: int = 1, seq_chunks: int = 1) -> tuple[tuple[int, ...],
                                                                                             tuple[int, ...]]:
    """simulate's peak_inflight and peak_pending_w: they depend on the op order only, not on op times."""
    check_schedule_args(schedule, p, m, v, seq_chunks)
    comp = _compiled(schedule, p, m, v, seq_chunks)
    return comp.peak_inflight, comp.peak_pending_w


def simulate_times(schedule: str, fwd_s: Sequence[float], bwd_s: Sequence[float], m: int, v: int = 1,
                   p2p_s: float = 0.0, seq_chunks: int = 1) -> PipelineResult:
    """`simulate` without the event list (events is empty), for the cost model's hot path.

    The same loop over the compiled ops as simulate, doing the same float operations in the same order:
    start = max(free, dependency end + (p2p_s or 0.0)), stop = start + duration, busy += stop - start.
    Every field but `events` is equal to simulate's, bit for bit (tests/test_perf_equivalence.py). No
    wgrad_s: zb-h1 takes simulate's default W = bwd / 2.
    """
    fwd = [float(x) for x in fwd_s]
    bwd = [float(x) for x in bwd_s]
    p = _check_times(fwd, bwd, v, p2p_s)
    check_schedule_args(schedule, p, m, v, seq_chunks)
    if get_schedule(schedule).steady_state:
        return _steady(schedule, fwd, bwd, m, p2p_s, ())
    if get_schedule(schedule).splits_backward:
        w = [x / 2 for x in bwd]
        dur = fwd + [b - x for b, x in zip(bwd, w)] + w
    else:
        dur = fwd + bwd
    comp = _compiled(schedule, p, m, v, seq_chunks)
    end = [0.0]
    append = end.append
    free = [0.0] * p
    busy = [0] * p  # simulate sums from the int 0
    for d, slot, dep, cross in zip(comp.dev, comp.slot, comp.dep, comp.cross):
        r = end[dep] + (p2p_s if cross else 0.0)
        f = free[d]
        start = f if f >= r else r  # max(free, r), which keeps the first on ties
        stop = start + dur[slot]
        append(stop)
        free[d] = stop
        busy[d] += stop - start
    step = max(free)
    busy_t = tuple(busy)
    bubble = step - max(busy_t)
    return PipelineResult(
        schedule=schedule, p=p, v=v, m=m, step_time_s=step, busy_s=busy_t,
        idle_s=tuple(step - b for b in busy_t), bubble_s=bubble,
        bubble_fraction=bubble / step if step > 0 else 0.0,
        peak_inflight=comp.peak_inflight, peak_pending_w=comp.peak_pending_w, events=(), seq_chunks=seq_chunks)


# ----------------------------------------------------------------------------------------------
# closed forms (equal stages)

def bubble_time_closed(schedule: str, p: int, m: int, v: int = 1, tf: float = 1.0, tb: float = 2.0,
                       tw: float | None = None) -> float:
    """Bubble time for equal stages, no p2p: t_f, t_b are one stage's (whole device's) forward and
    full backward times per micro-batch; tw the weight-grad part of t_b (zb-h1; default t_b/2).

    GPipe, 1F1B: (p-1)(t_f+t_b) (Narayanan 2021 section 2.2.1). Interleaved: (p-1)(t_f+t_b)/v
    (section 2.2.2). ZB-H1: (p-1)(T_F+T_B-T_W) with T_B = t_b - tw the input-grad part (Qi et al.
    2023, Table 2). For ZB-H1 this equals the simulated schedule exactly when m >= p and
    T_W <= min(T_F, T_B) (the paper's handcrafted regime; checked in tests); outside it the simulated
    bubble is larger.
    """
    check_schedule_args(schedule, p, m, v)
    return get_schedule(schedule).bubble_time(p, m, v, tf, tb, tw)


def bubble_fraction_closed(schedule: str, p: int, m: int, v: int = 1, tf: float = 1.0, tb: float = 2.0,
                           tw: float | None = None, of: Literal["step", "ideal"] = "step",
                           seq_chunks: int = 1) -> float:
    """Bubble for equal stages as a fraction.

    of="step" (default): bubble / step time, the share of the step spent idle; the same quantity as
    `PipelineResult.bubble_fraction`. GPipe/1F1B (p-1)/(m+p-1); interleaved (p-1)/(v*m+p-1);
    ZB-H1 (p-1)(T_F+T_B-T_W) / (m(T_F+T_B+T_W) + (p-1)(T_F+T_B-T_W)), which is (p-1)/(3m+p-1) for
    T_F = T_B = T_W (docs/formulas.md#pipeline-bubble; the step-time denominators are marked Δ there).
    of="ideal": bubble / ideal time m(t_f+t_b), Narayanan's t_pb/t_id: (p-1)/m, (1/v)(p-1)/m for
    interleaving. seq_chunks n (gpipe, 1f1b): tf, tb are one chunk's and m * n items fill the pipeline,
    (p-1)/(m n + p-1) (TeraPipe, Li et al. 2021 section 3; Seq1F1B, Sun et al. 2024).
    """
    check_schedule_args(schedule, p, m, v, seq_chunks)
    bubble = bubble_time_closed(schedule, p, m, v, tf, tb, tw)
    ideal = m * seq_chunks * (tf + tb)
    if of == "ideal":
        return bubble / ideal
    if of != "step":
        raise ValueError(f"of must be 'step' or 'ideal', got {of!r}")
    return bubble / (ideal + bubble)


def inflight_microbatches(schedule: str, p: int, m: int, stage: int = 0, v: int = 1, seq_chunks: int = 1) -> float:
    """Micro-batches' worth of activations a device holds at its peak (docs/formulas.md#memory-inflight).

    The unit is one micro-batch's activations for *all* layers on the device (for interleaving, all
    v chunks), so peak activation memory = this x per-micro-batch activation of the device.
    GPipe: m. 1F1B: min(p - stage, m) (stage 0-based; Narayanan 2.2.1, Korthikanti Eq. 5).
    ZB-H1: as 1F1B for the B activations (Qi et al. Table 2; W-only tensors of up to `stage` deferred
    micro-batches come on top, see PipelineResult.peak_pending_w). Interleaved: Megatron's warm-up
    2(p-i-1)+(v-1)p plus one, in chunk units, capped at m*v, divided by v; on the first stage with
    enough micro-batches that is p + (p-1)/v, i.e. L(1 + (p-1)/(pv)) layers' worth (Korthikanti
    section 4.2.3).
    seq_chunks n > 1: in units of one chunk's activations; GPipe m n, 1F1B min(p - stage + n - 1, m n): a
    stage holds every chunk of the micro-batch whose backward (last chunk first) it waits for, plus the
    warm-up (schedules/one_f_one_b.py).
    """
    check_schedule_args(schedule, p, m, v, seq_chunks)
    if not 0 <= stage < p:
        raise ValueError(f"stage {stage} outside 0..{p - 1}")
    return get_schedule(schedule).inflight_microbatches(p, m, stage, v, seq_chunks)


def schedules_with_split() -> tuple[str, ...]:
    """The schedules whose backward runs as separate B and W ops."""
    return tuple(name for name in SCHEDULES if get_schedule(name).splits_backward)
