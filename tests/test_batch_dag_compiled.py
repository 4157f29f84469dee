"""batch_dag._dag, read from pipeline._compiled, equals the DAG its first version recovered from a unit-time
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
from planner.cost.batch_dag import _Dag, _dag, _inflight, _makespan, _unit_ends


def _dag_by_simulate(schedule: str, p: int, v: int, m: int, nc: int = 1) -> _Dag:
    """The first _dag: levels are the end times of a unit-time simulate, ops and dependencies its events."""
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
    return _Dag(n_ops=n_ops, bounds=tuple(zip(starts.tolist(), stops.tolist())), prev=prev, dep=dep,
                cross=cross[order], durcol=(kind * n + k)[order], last=new[last_old],
                peak_inflight=res.peak_inflight)


def _assert_same(got: _Dag, want: _Dag, case) -> None:
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
]


@pytest.mark.parametrize("case", CASES)
def test_dag_equals_the_simulate_built_dag(case):
    _assert_same(_dag.__wrapped__(*case), _dag_by_simulate(*case), case)


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
    _assert_same(_dag.__wrapped__(*case), _dag_by_simulate(*case), case)


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
    dag = _dag.__wrapped__(*case)
    got = _makespan(dag, rows, p2p)
    for r in range(6):
        res = pipeline.simulate(schedule, fwd[r].tolist(), bwd[r].tolist(), m, v=v, p2p_s=float(p2p[r]),
                                seq_chunks=nc)
        assert got[r] == res.step_time_s, (case, r)
        want_infl = np.array(res.peak_inflight, dtype=float) / (v if v > 1 else 1)
        assert np.array_equal(_inflight(schedule, p, v, m, nc), want_infl), case


def test_dag_refuses_what_simulate_refuses():
    for args in (("interleaved-1f1b", 4, 2, 6, 1), ("zb-h1", 4, 1, 8, 2), ("1f1b", 4, 2, 8, 1), ("nope", 2, 1, 2, 1)):
        with pytest.raises(ValueError):
            _dag_by_simulate(*args)
        with pytest.raises(ValueError):
            _dag.__wrapped__(*args)


def test_unit_ends_is_the_longest_path():
    # two devices: device 0 runs ops 0, 1, 2; device 1 runs 3, 4; op 1 waits for op 4, op 3 for op 0
    dep = np.array([5, 4, 5, 0, 5])
    ends = _unit_ends(dep, [(0, 3), (3, 5)])
    assert ends.tolist() == [1, 4, 5, 2, 3]
