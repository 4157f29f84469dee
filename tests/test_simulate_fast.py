"""pipeline.simulate (timing a cached, integer-indexed op list) equals the first version of simulate it
replaced, field for field and bit for bit, events included, on random schedules, stage counts, micro-batch
counts, sequence chunks, uneven stage times, p2p and zb-h1 weight-grad splits; pipeline.schedule_peaks
equals its peaks; partition.chunk_inflight equals what it computed from that first simulate.

`simulate_reference` below is the first version's timing loop, kept from planner/cost/pipeline.py as the
oracle (its argument checks are pipeline._check_times, unchanged).
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.core.plan import ParallelPlan, Workload
from planner.cost import pipeline
from planner.cost.pipeline import (  # noqa: F401
    SCHEDULES,
    PipelineEvent,
    PipelineResult,
    Sequence,
    check_schedule_args,
    schedule_order,
    schedule_peaks,
    simulate,
)
from planner.cost.schedules import get_schedule
from planner.search.partition import chunk_inflight


def simulate_reference(schedule: str, fwd_s: Sequence[float], bwd_s: Sequence[float], m: int, v: int = 1,
             p2p_s: float = 0.0, wgrad_s: Sequence[float] | None = None, seq_chunks: int = 1) -> PipelineResult:
    """The first simulate: a tuple-keyed dict of end times and a `ready` closure per op."""
    fwd = [float(x) for x in fwd_s]
    bwd = [float(x) for x in bwd_s]
    p = pipeline._check_times(fwd, bwd, v, p2p_s)  # the argument checks did not change
    check_schedule_args(schedule, p, m, v, seq_chunks)
    n_stages = p * v

    b_dur, w = pipeline.backward_split(schedule, bwd, wgrad_s, n_stages)  # unchanged checks and split
    dur = {"F": fwd, "B": b_dur, **({"W": w} if w is not None else {})}

    orders = schedule_order(schedule, p, m, v, seq_chunks)
    end: dict[tuple[str, int, int], float] = {}  # (kind, virtual stage, microbatch) -> end time

    def ready(kind: str, k: int, j: int) -> float | None:
        """When op (kind, k, j) may start as far as its cross-op dependency goes; None: not yet."""
        if kind == "F":
            if k == 0:
                return 0.0
            dep, dk = ("F", k - 1, j), k - 1
        elif kind == "B":
            if k == n_stages - 1:
                dep, dk = ("F", k, j), k
            else:
                dep, dk = ("B", k + 1, j), k + 1
        else:
            dep, dk = ("B", k, j), k
        t = end.get(dep)
        if t is None:
            return None
        return t + (p2p_s if dk % p != k % p else 0.0)

    pos = [0] * p
    free = [0.0] * p
    events: list[list[PipelineEvent]] = [[] for _ in range(p)]
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for d in range(p):
            while pos[d] < len(orders[d]):
                kind, j, c = orders[d][pos[d]]
                k = c * p + d
                r = ready(kind, k, j)
                if r is None:
                    break
                start = max(free[d], r)
                stop = start + dur[kind][k]
                end[(kind, k, j)] = stop
                free[d] = stop
                events[d].append(PipelineEvent(d, kind, j, c, start, stop))
                pos[d] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # cannot happen for the orders above; guards future schedules
            raise RuntimeError(f"schedule {schedule!r} deadlocks (p={p}, m={m}, v={v})")

    step = max(free)
    busy = tuple(sum(e.end_s - e.start_s for e in evs) for evs in events)
    inflight, pending = [], []
    for order in orders:
        held = peak = wait_w = peak_w = 0
        for kind, _, _ in order:
            if kind == "F":
                held += 1
                peak = max(peak, held)
            elif kind == "B":
                held -= 1
                wait_w += schedule == "zb-h1"
            else:
                wait_w -= 1
            if kind != "B":  # a W run straight after its own B never counts as pending
                peak_w = max(peak_w, wait_w)
        inflight.append(peak)
        pending.append(peak_w)
    bubble = step - max(busy)
    return PipelineResult(
        schedule=schedule, p=p, v=v, m=m, step_time_s=step, busy_s=busy,
        idle_s=tuple(step - b for b in busy), bubble_s=bubble,
        bubble_fraction=bubble / step if step > 0 else 0.0,
        peak_inflight=tuple(inflight), peak_pending_w=tuple(pending),
        events=tuple(e for evs in events for e in evs), seq_chunks=seq_chunks,
    )




@st.composite
def _case(draw):
    schedule = draw(st.sampled_from([s for s in SCHEDULES if not get_schedule(s).steady_state]))  # no flush: closed form
    p = draw(st.integers(1, 9))
    v = draw(st.integers(1, 3)) if schedule == "interleaved-1f1b" else 1
    m = p * draw(st.integers(1, 5)) if schedule == "interleaved-1f1b" else draw(st.integers(1, 20))
    n = draw(st.integers(1, 3)) if schedule in ("gpipe", "1f1b") else 1
    k = p * v
    time = st.one_of(st.just(0.0), st.just(1.0), st.floats(1e-6, 10.0, allow_nan=False, allow_infinity=False))
    fwd = draw(st.lists(time, min_size=k, max_size=k))
    bwd = draw(st.lists(time, min_size=k, max_size=k))
    p2p = draw(st.one_of(st.just(0.0), st.floats(0.0, 2.0, allow_nan=False)))
    wgrad = None
    if schedule == "zb-h1" and draw(st.booleans()):
        wgrad = [b * draw(st.floats(0.0, 1.0)) for b in bwd]
    return schedule, fwd, bwd, m, v, p2p, wgrad, n


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_simulate_equals_first_version(case):
    schedule, fwd, bwd, m, v, p2p, wgrad, n = case
    want = simulate_reference(schedule, fwd, bwd, m, v=v, p2p_s=p2p, wgrad_s=wgrad, seq_chunks=n)
    got = simulate(schedule, fwd, bwd, m, v=v, p2p_s=p2p, wgrad_s=wgrad, seq_chunks=n)
    assert got == want  # dataclass equality: every field, events included, floats exactly
    assert schedule_peaks(schedule, len(fwd) // v, m, v, n) == (want.peak_inflight, want.peak_pending_w)
    if wgrad is None:
        fast = pipeline.simulate_times(schedule, fwd, bwd, m, v=v, p2p_s=p2p, seq_chunks=n)
        assert fast == PipelineResult(**{**want.__dict__, "events": ()})


def test_simulate_equals_first_version_long_pipelines():
    """Shapes of the 512-GPU search (many micro-batches), with uneven stages and p2p."""
    rng = np.random.default_rng(0)
    for schedule, p, v, m in (("1f1b", 16, 1, 256), ("zb-h1", 32, 1, 128), ("interleaved-1f1b", 8, 4, 64),
                              ("gpipe", 4, 1, 100)):
        fwd = rng.uniform(0.5, 2.0, p * v).tolist()
        bwd = rng.uniform(1.0, 4.0, p * v).tolist()
        assert simulate(schedule, fwd, bwd, m, v=v, p2p_s=0.01) == \
            simulate_reference(schedule, fwd, bwd, m, v=v, p2p_s=0.01)


def test_simulate_refuses_what_first_version_refuses():
    for args, kw in ((("interleaved-1f1b", [1.0] * 4, [1.0] * 4, 1), {"v": 2}),  # m < pp
                     (("1f1b", [1.0, -1.0], [1.0, 1.0], 2), {}),
                     (("nope", [1.0], [1.0], 1), {}),
                     (("1f1b", [1.0], [1.0], 2), {"wgrad_s": [0.5]}),
                     (("zb-h1", [1.0], [1.0], 2), {"wgrad_s": [2.0]}),
                     (("zb-h1", [1.0], [1.0], 2), {"seq_chunks": 2}),
                     (("1f1b", [1.0, 1.0], [1.0], 2), {})):
        for fn in (simulate, simulate_reference):
            try:
                fn(*args, **kw)
            except ValueError:
                continue
            raise AssertionError(f"{fn.__name__} accepted {args} {kw}")


def test_chunk_inflight_equals_first_version():
    """partition.chunk_inflight now reads the peaks from schedule_peaks instead of running simulate."""
    w = Workload(global_batch=64, seq_len=4096)
    for kw in ({"pp": 4, "schedule": "1f1b"}, {"pp": 4, "schedule": "zb-h1"}, {"pp": 4, "schedule": "gpipe"},
               {"pp": 4, "vpp": 2, "schedule": "interleaved-1f1b"}, {"pp": 2, "schedule": "1f1b", "seq_chunks": 2}):
        plan = ParallelPlan(dp=1, mbs=1, **kw)
        k, m = plan.pp * plan.vpp, plan.microbatches(w)
        pipe = simulate_reference(plan.schedule, [1.0] * k, [2.0] * k, m, v=plan.vpp, seq_chunks=plan.seq_chunks)
        want = np.asarray(pipe.peak_inflight, dtype=float) / (plan.vpp if plan.vpp > 1 else 1)
        want = want[np.arange(k) % plan.pp] * (1 - plan.offload.activations)
        assert np.array_equal(chunk_inflight(w, plan), want)
