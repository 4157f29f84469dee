"""The pipeline op DAG of estimate_batch, evaluated by max-plus over topological levels.

Per (schedule, pp, vpp, micro-batches, seq_chunks) the DAG is built once from one pipeline.simulate call and
then times every pipeline problem of that group together (arrays over problems): the same float operations, in
the same order, as simulate. Separate from planner/cost/batch.py because it depends only on the schedule, not
on any layer, link or plan column.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from planner.cost import pipeline


@dataclass(frozen=True)
class _Dag:
    """A pipeline's op DAG with ops sorted by topological level. prev/dep index ops (n_ops: the zero
    sentinel); durcol indexes the duration row [F_0..F_{n-1}, B_0.., W_0..] of virtual stages."""

    n_ops: int
    bounds: tuple  # (start, stop) of each level
    prev: np.ndarray
    dep: np.ndarray
    cross: np.ndarray
    durcol: np.ndarray
    last: np.ndarray  # last op of every device
    peak_inflight: tuple


@lru_cache(maxsize=2048)
def _dag(schedule: str, p: int, v: int, m: int, nc: int = 1) -> _Dag:
    """The op DAG of pipeline.simulate for (schedule, p, v, m, seq_chunks nc): m * nc work items.

    simulate's events list every device's ops in pipeline.schedule_order's per-device order. Timed with
    unit durations (F = B = W = 1, no p2p) an op's end is 1 + max(end of the previous op on its device, end
    of its dependency), i.e. its topological level + 1. The dependencies are simulate's `ready`:
    F(k, j) after F(k-1, j); B(k, j) after B(k+1, j), or F(k, j) on the last virtual stage; W(k, j) after
    B(k, j); p2p is added when the two virtual stages sit on different devices (k % p).
    """
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
    if np.any(dep[(kind != 0) | (k > 0)] < 0):
        raise AssertionError("pipeline DAG: a dependency is missing")
    cross = (dep >= 0) & (dk % p != k % p)
    # sort by level; remap indices, -1 -> sentinel n_ops
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


def _levels(dag: _Dag) -> list:
    """Per level: (start, stop, prev ops, dependency ops, whether any op there waits on a p2p transfer)."""
    return [(lo, hi, dag.prev[lo:hi], dag.dep[lo:hi], bool(dag.cross[lo:hi].any())) for lo, hi in dag.bounds]


_LEVELS: dict = {}


_INFL: dict = {}


def _inflight(schedule: str, pp: int, vpp: int, m: int, nc: int = 1) -> np.ndarray:
    """estimate._memory's in-flight micro-batches (work items) per stage: the DAG's simulate peak, over vpp
    chunks."""
    key = (schedule, pp, vpp, m, nc)
    hit = _INFL.get(key)
    if hit is None:
        hit = np.array(_dag(schedule, pp, vpp, m, nc).peak_inflight, dtype=float)
        if vpp > 1:
            hit = hit / vpp
        if len(_INFL) > 4096:
            _INFL.clear()
        _INFL[key] = hit
    return hit


def _makespan(dag: _Dag, dur_rows: np.ndarray, p2p: np.ndarray, block: int = 4_000_000) -> np.ndarray:
    """pipeline.simulate's step_time_s for every row of dur_rows (problems x 3n durations) and p2p:
    start = max(free, dep_end + p2p), stop = start + duration (simulate's loop), level by level."""
    levels = _LEVELS.get(id(dag))
    if levels is None or levels[0] is not dag:
        if len(_LEVELS) > 4096:
            _LEVELS.clear()
        levels = _LEVELS[id(dag)] = (dag, _levels(dag))
    levels = levels[1]
    out = np.empty(len(dur_rows))
    step = max(1, block // max(dag.n_ops, 1))
    for a in range(0, len(dur_rows), step):
        d = dur_rows[a:a + step]
        dur = np.ascontiguousarray(d[:, dag.durcol].T)
        add = dag.cross[:, None] * p2p[None, a:a + step]
        end = np.zeros((dag.n_ops + 1, len(d)))
        take = end.take
        for lo, hi, prev, dep, cross in levels:
            x = take(dep, axis=0)
            if cross:
                x += add[lo:hi]
            np.maximum(take(prev, axis=0), x, out=x)
            x += dur[lo:hi]
            end[lo:hi] = x
        out[a:a + step] = end[dag.last].max(axis=0)
    return out
