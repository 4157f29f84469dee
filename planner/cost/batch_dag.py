"""The pipeline op DAG of estimate_batch, evaluated by max-plus over topological levels.

Per (schedule, pp, vpp, micro-batches, seq_chunks) the DAG is built once from the op list pipeline.simulate
runs on (pipeline._compiled) and then times every pipeline problem of that group together (arrays over
problems): the same float operations, in the same order, as simulate. Separate from planner/cost/batch.py
because it depends only on the schedule, not on any layer, link or plan column.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from planner.cost import pipeline
from planner.cost.pipeline import unit_ends


@dataclass(frozen=True)
class Dag:
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
def dag_of(schedule: str, p: int, v: int, m: int, nc: int = 1) -> Dag:
    """The op DAG of pipeline.simulate for (schedule, p, v, m, seq_chunks nc): m * nc work items.

    Read from pipeline._compiled, the op list simulate itself times: ops device by device in
    pipeline.schedule_order's order, each with its dependency (simulate's `ready`: F(k, j) after F(k-1, j);
    B(k, j) after B(k+1, j), or F(k, j) on the last virtual stage; W(k, j) after B(k, j)) and whether p2p is
    added (the two virtual stages sit on different devices, k % p). An op's level is its end - 1 with unit
    durations (F = B = W = 1, no p2p): what the first version read off a unit-time simulate's events.
    """
    comp = pipeline._compiled(schedule, p, m, v, nc)
    at = comp.where.astype(np.int64)  # device order -> sweep order
    n_ops = len(at)
    seq = np.empty(n_ops + 1, dtype=np.int64)  # sweep order -> device order; the sentinel -1 -> n_ops
    seq[at] = np.arange(n_ops)
    seq[n_ops] = n_ops
    sdep = np.frombuffer(comp.dep, dtype=np.int32).astype(np.int64) - 1  # sweep index of the dep, -1 none
    dep = seq[sdep[at]]
    cross = np.frombuffer(comp.cross, dtype=np.uint8)[at].astype(bool)
    durcol = np.frombuffer(comp.slot, dtype=np.int32)[at].astype(np.int64)  # kind * n + virtual stage
    dev = np.frombuffer(comp.e_dev, dtype=np.int32)
    stops = np.append(np.flatnonzero(dev[1:] != dev[:-1]) + 1, n_ops)
    starts = np.concatenate([[0], stops[:-1]])
    level = unit_ends(dep, list(zip(starts.tolist(), stops.tolist()))) - 1
    prev = np.arange(n_ops, dtype=np.int64) - 1
    prev[starts] = n_ops
    # sort by level, device order within a level; remap indices (n_ops stays the sentinel)
    order = np.argsort(level, kind="stable")
    new = np.empty(n_ops + 1, dtype=np.int64)
    new[order] = np.arange(n_ops)
    new[n_ops] = n_ops
    lv = level[order]
    edges = np.flatnonzero(np.diff(lv)) + 1
    lo = np.concatenate([[0], edges])
    hi = np.concatenate([edges, [n_ops]])
    return Dag(n_ops=n_ops, bounds=tuple(zip(lo.tolist(), hi.tolist())), prev=new[prev][order],
                dep=new[dep][order], cross=cross[order], durcol=durcol[order], last=new[stops - 1],
                peak_inflight=comp.peak_inflight)


def dag_levels(dag: Dag) -> list:
    """Per level: (start, stop, prev ops, dependency ops, whether any op there waits on a p2p transfer)."""
    return [(lo, hi, dag.prev[lo:hi], dag.dep[lo:hi], bool(dag.cross[lo:hi].any())) for lo, hi in dag.bounds]


_LEVELS: dict = {}


_INFL: dict = {}


def inflight_items(schedule: str, pp: int, vpp: int, m: int, nc: int = 1) -> np.ndarray:
    """estimate._stage_memory's in-flight micro-batches (work items) per stage: the DAG's simulate peak, over vpp
    chunks."""
    key = (schedule, pp, vpp, m, nc)
    hit = _INFL.get(key)
    if hit is None:
        hit = np.array(dag_of(schedule, pp, vpp, m, nc).peak_inflight, dtype=float)
        if vpp > 1:
            hit = hit / vpp
        if len(_INFL) > 4096:
            _INFL.clear()
        _INFL[key] = hit
    return hit


def makespans(dag: Dag, dur_rows: np.ndarray, p2p: np.ndarray, block: int = 4_000_000) -> np.ndarray:
    """pipeline.simulate's step_time_s for every row of dur_rows (problems x 3n durations) and p2p:
    start = max(free, dep_end + p2p), stop = start + duration (simulate's loop), level by level."""
    levels = _LEVELS.get(id(dag))
    if levels is None or levels[0] is not dag:
        if len(_LEVELS) > 4096:
            _LEVELS.clear()
        levels = _LEVELS[id(dag)] = (dag, dag_levels(dag))
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
