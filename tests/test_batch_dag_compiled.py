"""batch_dag.dag_of, read from pipeline._compiled, equals the DAG its first version recovered from a unit-time
pipeline.simulate's events, array for array (dtypes included): same op order, levels, dependencies, p2p flags,
duration columns, last ops and in-flight peaks; and the DAG's makespans equal simulate's step times.

`_dag_by_simulate` below is that first version, kept as the oracle.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.cost import pipeline
from planner.cost.batch_dag import Dag, dag_of, inflight_items, makespans, unit_ends


def _dag_by_simulate(schedule: str, p: int, v: int, m: int, nc: int = 1) -> Dag:
    """The first dag_of: levels are the end times of a unit-time simulate, ops and dependencies its events."""
    n = p * v
    zb = schedule == "zb-h1"
    res = pipeline.simulate(schedule, [1.0] * n, [2.0 if zb else 1.0] * n, m, v=v, p2p_s=0.0, seq_chunks=nc)
    kinds = {"F": 0, "B": 1, "W": 2}
    ev = np.array([(e.device, kinds[e.kind], e.microbatch, e.chunk, e.end_s) for e in res.events], dtype=float)
    dev, kind, mb, chunk = (ev[:, i].astype(np.int64) for i in range(4))
    level = ev[:, 4].astype(np.int64) - 1
    n_ops = len(ev)
    k = chunk * p + dev
    table = np.full((3, n, m * nc), -1, dtype=np.int64)
    table[kind, k, mb] = np.arange(n_ops)
    prev = np.arange(n_ops) - 1
    first = np.ones(n_ops, dtype=bool)
    first[1:] = dev[1:] != dev[:-1]
    prev[first] = -1
    dep = np.full(n_ops, -1, dtype=np.int64)
    dk = k.copy()
    f = (kind == 0) & (k > 0)
    dep[f] = table[0, k[f] - 1, mb[f]]
    dk[f] = k[f] - 1
    b_last = (kind == 1) & (k == n - 1)
    dep[b_last] = table[0, k[b_last], mb[b_last]]
    b_mid = (kind == 1) & (k < n - 1)
    dep[b_mid] = table[1, k[b_mid] + 1, mb[b_mid]]
    dk[b_mid] = k[b_mid] + 1
    w = kind == 2
    dep[w] = table[1, k[w], mb[w]]
    assert not np.any(dep[(kind != 0) | (k > 0)] < 0)
    cross = (dep >= 0) & (dk % p != k % p)
    order = np.argsort(level, kind="stable")
    new = np.empty(n_ops + 1, dtype=np.int64)
    new[order] = np.arange(n_ops)
    new[n_ops] = n_ops
    prev = new[np.where(prev < 0, n_ops, prev)][order]
    dep = new[np.where(dep < 0, n_ops, dep)][order]
    lv = level[order]
    edges = np.flatnonzero(np.diff(lv)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [n_ops]])
    last_old = np.flatnonzero(np.append(dev[1:] != dev[:-1], True))
    return Dag(n_ops=n_ops, bounds=tuple(zip(starts.tolist(), stops.tolist())), prev=prev, dep=dep,
                cross=cross[order], durcol=(kind * n + k)[order], last=new[last_old],
                peak_inflight=res.peak_inflight)


def _assert_same(got: Dag, want: Dag, case) -> None:
    assert got.n_ops == want.n_ops, case
    assert got.bounds == want.bounds, case
    assert got.peak_inflight == want.peak_inflight, case
    for field in ("prev", "dep", "cross", "durcol", "last"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype, (case, field, a.dtype, b.dtype)
        assert np.array_equal(a, b), (case, field)


# (schedule, p, v, m, seq_chunks): one device, m < p, m not a multiple of p, m = 1, sequence chunks, deep
# interleaving, and one bench_search-sized pipeline per schedule
CASES = [
    ("gpipe", 1, 1, 1, 1), ("gpipe", 4, 1, 3, 1), ("gpipe", 4, 1, 7, 1), ("gpipe", 3, 1, 5, 4),
    ("gpipe", 8, 1, 2, 3),
    ("1f1b", 1, 1, 4, 1), ("1f1b", 4, 1, 1, 1), ("1f1b", 4, 1, 3, 1), ("1f1b", 4, 1, 10, 1),
    ("1f1b", 5, 1, 13, 2), ("1f1b", 8, 1, 3, 4), ("1f1b", 2, 1, 1, 8), ("1f1b", 16, 1, 512, 1),
    ("zb-h1", 1, 1, 3, 1), ("zb-h1", 4, 1, 2, 1), ("zb-h1", 4, 1, 9, 1), ("zb-h1", 7, 1, 20, 1),
    ("zb-h1", 16, 1, 512, 1),
    ("interleaved-1f1b", 1, 3, 2, 1), ("interleaved-1f1b", 2, 2, 2, 1), ("interleaved-1f1b", 4, 2, 4, 1),
    ("interleaved-1f1b", 4, 3, 12, 1), ("interleaved-1f1b", 3, 5, 9, 1), ("interleaved-1f1b", 8, 6, 256, 1),
    ("interleaved-1f1b", 4, 2, 6, 1), ("interleaved-1f1b", 3, 4, 7, 1),  # m not a multiple of p (Megatron-Core)
]


@pytest.mark.parametrize("case", CASES)
def test_dag_equals_the_simulate_built_dag(case):
    _assert_same(dag_of.__wrapped__(*case), _dag_by_simulate(*case), case)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.sampled_from(pipeline.SCHEDULES), p=st.integers(1, 9), v=st.integers(1, 4),
       m=st.integers(1, 24), nc=st.integers(1, 4))
def test_dag_equals_the_simulate_built_dag_random(schedule, p, v, m, nc):
    if schedule != "interleaved-1f1b":
        v = 1
    else:
        m = p * max(1, m // p)
    if schedule not in ("gpipe", "1f1b"):
        nc = 1
    case = (schedule, p, v, m, nc)
    _assert_same(dag_of.__wrapped__(*case), _dag_by_simulate(*case), case)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] * c[3] <= 64])
def test_makespan_and_inflight_equal_simulate(case):
    schedule, p, v, m, nc = case
    n = p * v
    rng = np.random.default_rng(p * 1000 + m)
    fwd = rng.uniform(0.1, 2.0, size=(6, n))
    bwd = fwd * rng.uniform(1.0, 3.0, size=(6, n))
    p2p = rng.uniform(0.0, 0.5, size=6)
    p2p[0] = 0.0
    cols = [fwd, bwd - bwd / 2, bwd / 2] if schedule == "zb-h1" else [fwd, bwd, np.zeros((6, n))]
    rows = np.concatenate(cols, axis=1)
    dag = dag_of.__wrapped__(*case)
    got = makespans(dag, rows, p2p)
    for r in range(6):
        res = pipeline.simulate(schedule, fwd[r].tolist(), bwd[r].tolist(), m, v=v, p2p_s=float(p2p[r]),
                                seq_chunks=nc)
        assert got[r] == res.step_time_s, (case, r)
        want_infl = np.array(res.peak_inflight, dtype=float) / (v if v > 1 else 1)
        assert np.array_equal(inflight_items(schedule, p, v, m, nc), want_infl), case


def test_dag_refuses_what_simulate_refuses():
    for args in (("interleaved-1f1b", 4, 2, 3, 1), ("zb-h1", 4, 1, 8, 2), ("1f1b", 4, 2, 8, 1), ("nope", 2, 1, 2, 1)):
        with pytest.raises(ValueError):
            _dag_by_simulate(*args)
        with pytest.raises(ValueError):
            dag_of.__wrapped__(*args)


def test_unit_ends_is_the_longest_path():
    # two devices: device 0 runs ops 0, 1, 2; device 1 runs 3, 4; op 1 waits for op 4, op 3 for op 0
    dep = np.array([5, 4, 5, 0, 5])
    ends = unit_ends(dep, [(0, 3), (3, 5)])
    assert ends.tolist() == [1, 4, 5, 2, 3]


# ----------------------------------------------------------------------------------------------
# pipeline._compiled against its first construction: op arrays unpacked from schedule_order's tuples and a
# device-by-device sweep in pure Python. The sweep order itself may differ (any order that times each op after
# its dependency and its device predecessor gives the same floats), so the device-order views are compared
# array for array and the timings of simulate and simulate_times value for value.

def _compiled_by_sweep(schedule: str, p: int, m: int, v: int, n: int = 1) -> pipeline._Compiled:
    orders = pipeline.schedule_order(schedule, p, m, v, n)
    n_stages = p * v
    total = m * n
    lens = [len(o) for o in orders]
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    n_ops = int(offs[-1])
    bounds = list(zip(offs[:-1].tolist(), offs[1:].tolist()))
    kind = np.empty(n_ops, dtype=np.int64)
    item = np.empty(n_ops, dtype=np.int64)
    chunk = np.empty(n_ops, dtype=np.int64)
    code = {"F": 0, "B": 1, "W": 2}
    for (lo, hi), order in zip(bounds, orders):
        kind[lo:hi] = [code[o[0]] for o in order]
        item[lo:hi] = [o[1] for o in order]
        chunk[lo:hi] = [o[2] for o in order]
    dev = np.repeat(np.arange(p, dtype=np.int64), lens)
    # the dependencies themselves did not change: what this oracle checks is the op arrays and the order
    k, slot, dep, cross = pipeline._dependencies(kind, item, chunk, dev, p, n_stages, total)
    assert not np.any(dep < 0)
    placed = bytearray(n_ops + 1)
    placed[n_ops] = 1
    dg = dep.tolist()
    pos, stops = offs[:-1].tolist(), offs[1:].tolist()
    seq: list[int] = []
    while len(seq) < n_ops:
        before = len(seq)
        for d in range(p):
            i = pos[d]
            while i < stops[d] and placed[dg[i]]:
                placed[i] = 1
                seq.append(i)
                i += 1
            pos[d] = i
        assert len(seq) > before, "deadlock"
    seq_a = np.asarray(seq, dtype=np.int64)
    where = np.empty(n_ops + 1, dtype=np.int64)
    where[seq_a] = np.arange(n_ops)
    where[n_ops] = -1
    inflight, pending = pipeline._peaks(schedule, kind, bounds)

    def i32(x: np.ndarray) -> pipeline.array:
        return pipeline.array("i", x.astype(np.int32).tobytes())

    return pipeline._Compiled(dev=i32(dev[seq_a]), slot=i32(slot[seq_a]), dep=i32(where[dep[seq_a]] + 1),
                              cross=cross[seq_a].astype(np.uint8).tobytes(), where=where[:n_ops].astype(np.int32),
                              e_dev=i32(dev), e_kind=kind.astype(np.uint8).tobytes(), e_item=i32(item),
                              e_chunk=i32(chunk), peak_inflight=inflight, peak_pending_w=pending)


def _device_view(c: pipeline._Compiled) -> dict:
    """The sweep-order fields read in device order, the dependency as a device-order op id (-1: none)."""
    at = c.where.astype(np.int64)
    sdep = np.frombuffer(c.dep, dtype=np.int32).astype(np.int64) - 1
    dep = np.where(sdep[at] < 0, -1, np.argsort(at)[np.maximum(sdep[at], 0)])
    return {"dev": np.frombuffer(c.dev, dtype=np.int32)[at], "slot": np.frombuffer(c.slot, dtype=np.int32)[at],
            "cross": np.frombuffer(c.cross, dtype=np.uint8)[at], "dep": dep}


COMPILED_CASES = CASES + [
    ("gpipe", 2, 1, 9, 3), ("1f1b", 6, 1, 11, 3), ("1f1b", 32, 1, 64, 1), ("zb-h1", 32, 1, 40, 1),
    ("zb-h1", 6, 1, 4, 1), ("interleaved-1f1b", 5, 2, 15, 1), ("interleaved-1f1b", 16, 4, 64, 1),
]


@pytest.mark.parametrize("case", COMPILED_CASES)
def test_compiled_equals_the_sweep_built_op_list(case, monkeypatch):
    schedule, p, v, m, nc = case
    got, want = pipeline._compiled.__wrapped__(schedule, p, m, v, nc), _compiled_by_sweep(schedule, p, m, v, nc)
    for field in ("e_dev", "e_kind", "e_item", "e_chunk", "peak_inflight", "peak_pending_w"):
        assert getattr(got, field) == getattr(want, field), (case, field)
    assert got.where.dtype == want.where.dtype and sorted(got.where.tolist()) == list(range(len(got.where)))
    gv, wv = _device_view(got), _device_view(want)
    for field in gv:
        assert np.array_equal(gv[field], wv[field]), (case, field)
    # the sweep order times each op after its dependency and after the op before it on its device
    sdep = np.frombuffer(got.dep, dtype=np.int32)
    assert np.all(sdep - 1 < np.arange(len(sdep)))
    dev_at = np.frombuffer(got.e_dev, dtype=np.int32)
    same_dev = dev_at[1:] == dev_at[:-1]
    assert np.all(got.where[1:][same_dev] > got.where[:-1][same_dev])
    # timings: simulate and simulate_times on either op list, bit for bit
    n = p * v
    rng = np.random.default_rng(p * 7919 + m * 31 + nc)
    for r in range(3):
        fwd = rng.uniform(0.1, 2.0, size=n).tolist()
        bwd = (np.asarray(fwd) * rng.uniform(1.0, 3.0, size=n)).tolist()
        p2p = 0.0 if r == 0 else float(rng.uniform(0.0, 0.5))
        wgrad = (np.asarray(bwd) * rng.uniform(0.2, 0.8, size=n)).tolist() if schedule == "zb-h1" else None
        new_t = pipeline.simulate_times(schedule, fwd, bwd, m, v=v, p2p_s=p2p, seq_chunks=nc)
        new_s = pipeline.simulate(schedule, fwd, bwd, m, v=v, p2p_s=p2p, wgrad_s=wgrad, seq_chunks=nc)
        with monkeypatch.context() as mp:
            mp.setattr(pipeline, "_compiled", _compiled_by_sweep)
            old_t = pipeline.simulate_times(schedule, fwd, bwd, m, v=v, p2p_s=p2p, seq_chunks=nc)
            old_s = pipeline.simulate(schedule, fwd, bwd, m, v=v, p2p_s=p2p, wgrad_s=wgrad, seq_chunks=nc)
        assert new_t == old_t, (case, r)
        assert new_s == old_s, (case, r)
        assert new_t.step_time_s == old_t.step_time_s and new_t.busy_s == old_t.busy_s
