"""estimate_batch: the formulas of estimate() evaluated for many plans at once, with numpy arrays over plans.

DESIGN.md: "A vectorized form of the same formulas may evaluate many plans at once, but a test holds it equal
to the scalar form" (tests/test_batch.py holds every output equal to `estimate` within rel 1e-9, `fits`
exactly). Nothing here re-derives a cost formula: per-layer costs call compute.py / comm.py / memory.py with
arrays, and the logic that estimate.py writes inline is mirrored line by line, each block citing the
function it mirrors. When estimate.py changes, the equality test fails until this file follows.

How the work is shared between plans (the scalar estimate redoes all of it per plan):

  1. Per layer: layers with the same `Layer.shape_key` cost the same. The layer terms depend on a plan only
     through (mbs, tp, cp, sp, flash_attention, ep, etp, overlap_tp_comm, cp_comm, moe_dispatch) -- the "layer
     tuple". Distinct tuples are few
     (hundreds in a batch of 100k plans); each distinct shape is evaluated once per policy (none,
     selective, full) with arrays over the distinct tuples. Collective links depend only on (tp, cp, dp,
     ep): Cluster.collective is called once per distinct group, cached per cluster.
  2. Per chunk: which layers a pipeline chunk holds depends on pp * vpp, and their recompute policies on
     (recompute, recompute_num_layers) -- a "count group". Per count group a matrix of layer counts
     (chunk x shape x policy) turns the per-shape values into per-chunk and per-stage sums by a matmul.
  3. Pipeline: per (schedule, pp, vpp, m) the op DAG is built once (cached) from the per-device orders of
     pipeline.schedule_order, as pipeline.simulate times them, and the makespan of every distinct
     pipeline problem of the group (chunk times + p2p time) is evaluated together by max-plus over the
     DAG's topological levels: end(op) = max(end(prev op on device), end(dependency) + p2p) + duration,
     with arrays over problems -- the same float operations, in the same order, as simulate.
     Peak in-flight micro-batches per stage are the same for every plan of a group: taken from the one
     simulate call that also yields the levels.
  4. Per plan: DP exposure, optimizer step and the outputs, vectorized over plans. Memory per distinct
     (problem, ZeRO stage, offload fractions), in one block per (pp, ZeRO stage): (rows x stages) arrays
     gathered from the count groups' per-stage tables stacked together, one model_state_parts call each.
  5. Between calls (_Ctx, per model, cluster, seq_len, dtype, grad_dtype): layer values per layer tuple,
     count group sums over every tuple seen, makespans per pipeline problem (packed int64 keys, sorted). A
     later call evaluates only what is new to it (a search calls estimate_batch again and again).

Falls back to calling the scalar `estimate` (one call per plan) for plans with an explicit
`plan.partition` or with optimizer offload (`plan.offload.optimizer > 0`), and for every plan on a cluster of
several device types (each stage timed on its own devices), for activation offload (its per-layer
host-transfer time is modelled in estimate._layer_step only), and for workloads with documents of varying
length and plans with the DistCA attention pool (estimate._attention_factors and the pool's all-to-all).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

from planner.cost import comm, longctx, memory, moe, pipeline
from planner.cost.compute import (
    ATTENTION_BWD_FACTOR, DTYPE_BYTES, chunk_attention_factor, floored, layer_time, recompute_time_s,
)
from planner.cost.estimate import (
    EXPOSED_TAIL_FRACTION, _check_expert_parallel, _check_seq_chunks, _group, _overlapped_tp_s, _policies, estimate,
    pipeline_p2p_s, shard_copy_s, split_chunks,
)
from planner.errors import BadInput
from planner.hardware import Cluster
from planner.hetero.stages import _homogeneous
from planner.model import ModelGraph
from planner.plan import OffloadPolicy, ParallelPlan, Workload

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")
POLICIES = ("none", "selective", "full")
OUTPUTS = ("step_time_s", "tokens_per_s", "mfu", "hfu", "peak_memory_bytes", "fits", "pipeline_s",
           "pp_comm_s", "dp_comm_exposed_s", "optimizer_s", "offload_s")


# ----------------------------------------------------------------------------------------------------------
# plans as columns


@dataclass
class PlanArrays:
    """Plans as columns (one entry per plan). None-able plan fields use a sentinel: etp 0 (= tp),
    num_microbatches 0 (= global_batch / (mbs * dp)), recompute_num_layers -1 (= every block).
    recompute is an index into POLICIES, schedule into SCHEDULES. An explicit partition is not
    representable: pass such plans as ParallelPlan objects."""

    dp: np.ndarray
    tp: np.ndarray
    pp: np.ndarray
    vpp: np.ndarray
    cp: np.ndarray
    ep: np.ndarray
    etp: np.ndarray
    sp: np.ndarray
    zero: np.ndarray
    mbs: np.ndarray
    num_microbatches: np.ndarray
    recompute: np.ndarray
    recompute_num_layers: np.ndarray
    schedule: np.ndarray
    flash_attention: np.ndarray
    overlap_grad_reduce: np.ndarray
    offload_optimizer: np.ndarray
    offload_activations: np.ndarray
    overlap_tp_comm: np.ndarray | None = None  # None: all False (the ParallelPlan default)
    cp_a2a: np.ndarray | None = None  # cp_comm "a2a" (Ulysses); None: all False (the ring)
    moe_tp_slice: np.ndarray | None = None  # moe_dispatch "tp_slice" (Pipeline MoE); None: all False (a2a)
    seq_chunks: np.ndarray | None = None  # ParallelPlan.seq_chunks; None: all 1
    attention_pool: np.ndarray | None = None  # ParallelPlan.attention_pool (DistCA); None: all False

    _INT = ("dp", "tp", "pp", "vpp", "cp", "ep", "etp", "zero", "mbs", "num_microbatches", "recompute",
            "recompute_num_layers", "schedule", "seq_chunks")
    _BOOL = ("sp", "flash_attention", "overlap_grad_reduce", "overlap_tp_comm", "cp_a2a", "moe_tp_slice",
             "attention_pool")

    def __post_init__(self):
        if self.overlap_tp_comm is None:
            self.overlap_tp_comm = np.zeros(len(np.atleast_1d(self.dp)), dtype=bool)
        if self.cp_a2a is None:
            self.cp_a2a = np.zeros(len(np.atleast_1d(self.dp)), dtype=bool)
        if self.moe_tp_slice is None:
            self.moe_tp_slice = np.zeros(len(np.atleast_1d(self.dp)), dtype=bool)
        if self.seq_chunks is None:
            self.seq_chunks = np.ones(len(np.atleast_1d(self.dp)), dtype=np.int64)
        if self.attention_pool is None:
            self.attention_pool = np.zeros(len(np.atleast_1d(self.dp)), dtype=bool)
        for f in fields(self):
            a = np.asarray(getattr(self, f.name))
            if f.name in self._INT:
                a = a.astype(np.int64)
            elif f.name in self._BOOL:
                a = a.astype(bool)
            else:
                a = a.astype(float)
            setattr(self, f.name, np.atleast_1d(a))
        n = len(self.dp)
        if any(len(getattr(self, f.name)) != n for f in fields(self)):
            raise BadInput("PlanArrays columns must all have the same length")

    def __len__(self) -> int:
        return len(self.dp)

    @classmethod
    def from_plans(cls, plans: list[ParallelPlan]) -> PlanArrays:
        if any(p.partition is not None for p in plans):
            raise BadInput("PlanArrays cannot hold an explicit partition; pass the ParallelPlan list instead")
        col = {
            "dp": [p.dp for p in plans], "tp": [p.tp for p in plans], "pp": [p.pp for p in plans],
            "vpp": [p.vpp for p in plans], "cp": [p.cp for p in plans], "ep": [p.ep for p in plans],
            "etp": [p.etp or 0 for p in plans], "sp": [p.sp for p in plans], "zero": [p.zero for p in plans],
            "mbs": [p.mbs for p in plans], "num_microbatches": [p.num_microbatches or 0 for p in plans],
            "recompute": [POLICIES.index(p.recompute) for p in plans],
            "recompute_num_layers": [-1 if p.recompute_num_layers is None else p.recompute_num_layers
                                     for p in plans],
            "schedule": [SCHEDULES.index(p.schedule) for p in plans],
            "flash_attention": [p.flash_attention for p in plans],
            "overlap_grad_reduce": [p.overlap_grad_reduce for p in plans],
            "overlap_tp_comm": [p.overlap_tp_comm for p in plans],
            "cp_a2a": [p.cp_comm == "a2a" for p in plans],
            "moe_tp_slice": [p.moe_dispatch == "tp_slice" for p in plans],
            "seq_chunks": [p.seq_chunks for p in plans],
            "attention_pool": [p.attention_pool for p in plans],
            "offload_optimizer": [p.offload.optimizer for p in plans],
            "offload_activations": [p.offload.activations for p in plans],
        }
        return cls(**{k: np.array(v) for k, v in col.items()})

    def take(self, idx) -> PlanArrays:
        return PlanArrays(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def plan(self, i: int) -> ParallelPlan:
        """Row i as a ParallelPlan (validated)."""
        return ParallelPlan(
            dp=int(self.dp[i]), tp=int(self.tp[i]), pp=int(self.pp[i]), vpp=int(self.vpp[i]), cp=int(self.cp[i]),
            ep=int(self.ep[i]), etp=int(self.etp[i]) or None, sp=bool(self.sp[i]), zero=int(self.zero[i]),
            mbs=int(self.mbs[i]), num_microbatches=int(self.num_microbatches[i]) or None,
            recompute=POLICIES[int(self.recompute[i])],
            recompute_num_layers=None if self.recompute_num_layers[i] < 0 else int(self.recompute_num_layers[i]),
            offload=OffloadPolicy(optimizer=float(self.offload_optimizer[i]),
                                  activations=float(self.offload_activations[i])),
            schedule=SCHEDULES[int(self.schedule[i])], flash_attention=bool(self.flash_attention[i]),
            overlap_grad_reduce=bool(self.overlap_grad_reduce[i]), overlap_tp_comm=bool(self.overlap_tp_comm[i]),
            cp_comm="a2a" if self.cp_a2a[i] else "ring", moe_dispatch="tp_slice" if self.moe_tp_slice[i] else "a2a",
            seq_chunks=int(self.seq_chunks[i]), attention_pool=bool(self.attention_pool[i]))


# ----------------------------------------------------------------------------------------------------------
# caches: links per cluster, chunk structure per model, pipeline DAG per (schedule, p, v, m)

_LINKS: dict[int, tuple[Cluster, dict]] = {}


def _links(cluster: Cluster) -> dict:
    hit = _LINKS.get(id(cluster))
    if hit is None or hit[0] is not cluster:
        if len(_LINKS) > 16:
            _LINKS.clear()
        hit = _LINKS[id(cluster)] = (cluster, {})
    return hit[1]


def _collective(cluster: Cluster, base: int, stride: int, size: int):
    """cluster.collective(_group(base, stride, size)), cached per cluster (estimate.py builds its groups
    with _group(0, ...): tp (0, 1, tp), cp (0, tp, cp), dp (0, tp*cp, dp), ep (0, tp, ep))."""
    cache = _links(cluster)
    key = ("c", base, stride, size)
    if key not in cache:
        cache[key] = cluster.collective(_group(base, stride, size))
    return cache[key]


def _p2p(cluster: Cluster, src: int, dst: int):
    cache = _links(cluster)
    key = ("p", src, dst)
    if key not in cache:
        cache[key] = cluster.p2p(src, dst)
    return cache[key]


_CHUNKS: dict[tuple[int, int], tuple[ModelGraph, list]] = {}


def _split(model: ModelGraph, chunks_n: int) -> list:
    """split_chunks for pp * vpp = chunks_n and no explicit partition (it depends on nothing else)."""
    key = (id(model), chunks_n)
    hit = _CHUNKS.get(key)
    if hit is None or hit[0] is not model:
        if len(_CHUNKS) > 256:
            _CHUNKS.clear()
        hit = _CHUNKS[key] = (model, split_chunks(model, ParallelPlan.model_construct(pp=chunks_n, vpp=1,
                                                                                       partition=None)))
    return hit[1]


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

# What estimate_batch keeps between calls, per (model, cluster, seq_len, dtype, grad_dtype): see _Ctx.
_CTX: dict = {}
_PIPE_MEMO_MAX = 500_000
_IDS_MAX = 1 << 20  # columns, pipeline groups and count groups get ids below 2**21: packed in one int64


class _Ctx:
    """What estimate_batch computed for one (model, cluster, seq_len, dtype, grad_dtype) that a later call on
    them reuses; each piece is fixed by its key once those five are.

    - columns: one per distinct layer tuple seen (`col`, `tuples`), holding _layer_values' per-shape values
      for it (`lv`, arrays whose last axis is the column). A column's values are computed from its tuple
      alone (elementwise), so they do not depend on which other tuples a batch holds.
    - count groups (`groups`): per (pp, vpp, recompute, recompute_num_layers) its chunk and stage sums, worst
      stage, DP traffic and p2p time for every column (_group_entry). New columns drop them all (they are
      recomputed over every column when next needed), and any new entry drops `stages`, the per-stage tables
      of all entries stacked for the memory phase.
    - makespans per pipeline problem (pipeline group, count group, column): a sorted array of packed int64
      keys (`pipe_keys`) and their values; pipeline and count groups get small ids (`pg_id`, `cg_id`).

    Held by identity: it keeps its model and cluster alive, so their id() cannot be reused while cached."""

    def __init__(self, model: ModelGraph, cluster: Cluster):
        self.model, self.cluster = model, cluster
        self.shape_of: dict = {}  # distinct shapes (estimate.estimate memoizes by shape_key)
        self.shapes: list = []
        for layer in model.layers:
            if layer.shape_key not in self.shape_of:
                self.shape_of[layer.shape_key] = len(self.shapes)
                self.shapes.append(layer)
        self.col: dict = {}
        self.tuples = np.zeros((0, 11), dtype=np.int64)
        self.lv: dict | None = None
        self.groups: dict = {}
        self.stages = None
        self.pg_id: dict = {}
        self.cg_id: dict = {}
        self.pipe_keys = np.zeros(0, dtype=np.int64)
        self.pipe_vals = np.zeros(0)

    def columns(self, tuples: np.ndarray, layer_args: tuple) -> np.ndarray:
        """The column of each layer tuple (rows of `tuples`), evaluating the layer values of new ones."""
        ids = [self.col.get(t) for t in map(tuple, tuples.tolist())]
        new = [i for i, c in enumerate(ids) if c is None]
        if new:
            nt = tuples[new]
            vals = _layer_values(self.shapes, nt, *layer_args)
            self.lv = vals if self.lv is None else {k: np.concatenate([self.lv[k], v], axis=-1)
                                                     for k, v in vals.items()}
            for i, t in zip(new, map(tuple, nt.tolist())):
                ids[i] = self.col[t] = len(self.col)
            self.tuples = np.concatenate([self.tuples, nt])
            self.groups.clear()
            self.stages = None
        return np.array(ids, dtype=np.int64)

    def ids(self, table: dict, keys: np.ndarray) -> np.ndarray:
        return np.array([table.setdefault(k, len(table)) for k in map(tuple, keys.tolist())], dtype=np.int64)

    def stage_tables(self):
        """(row offset of each count group entry, per-stage params, frozen bytes, activation bytes, routed
        params, backward working bytes and logits bytes of every entry stacked as flat arrays: entry row
        r + stage, column c at (r + stage) * columns + c)."""
        if self.stages is None:
            ents = list(self.groups.values())
            rows = np.cumsum([0] + [len(x["par_st"]) for x in ents])
            for x, r in zip(ents, rows.tolist()):
                x["row"] = r
            self.stages = tuple(np.concatenate([x[k] for x in ents]).ravel()
                                for k in ("par_st", "froz_st", "act_st", "parx_st", "work_st", "logit_st", "kvf_st",
                                          "kva_st", "ring_st"))
        return self.stages


def _ctx(model: ModelGraph, cluster: Cluster, workload: Workload) -> _Ctx:
    key = (id(model), id(cluster), workload.seq_len, workload.dtype, workload.grad_dtype, workload.moe_imbalance,
           workload.moe_capacity_factor)
    hit = _CTX.get(key)
    if (hit is None or hit.model is not model or hit.cluster is not cluster
            or max(len(hit.col), len(hit.pg_id), len(hit.cg_id)) > _IDS_MAX):
        if len(_CTX) > 16:
            _CTX.clear()
        hit = _CTX[key] = _Ctx(model, cluster)
    return hit


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


# ----------------------------------------------------------------------------------------------------------
# per-layer values over distinct layer tuples


def _layer_values(shapes, tuples, cluster, dev, dtype, e, e_act, e_w, seq_len, routing=(1.0, None)):
    """Per distinct shape (rows) and policy, with arrays over the distinct layer tuples (columns):
    forward and backward time of one micro-batch, model and hardware FLOPs, activation bytes; and
    trainable / frozen parameters per device. Mirrors estimate._layer_step (time, FLOPs), the activation
    sum of estimate._memory, and the params_per_device calls of estimate.estimate and estimate._memory.

    compute.py takes sp, flash and ep as scalars (they select branches), so the tuples are evaluated per
    distinct (sp, flash, ep), with arrays over (mbs, tp, cp, etp)."""
    nu, ns = len(tuples), len(shapes)
    out = {k: np.zeros((ns, 3, nu)) for k in ("fwd", "bwd", "fhw", "act", "kvf")}
    for k in ("fmodel", "par", "froz", "parx", "logit", "kv", "ring"):
        out[k] = np.zeros((ns, nu))
    sub_keys = tuples[:, [3, 4, 5, 7, 8, 9]]
    for key in np.unique(sub_keys, axis=0):
        idx = np.flatnonzero(np.all(sub_keys == key, axis=1))
        sp, flash, ep, tp_overlap, a2a = bool(key[0]), bool(key[1]), int(key[2]), bool(key[3]), bool(key[4])
        tp_slice = bool(key[5])
        tpi, cpi = tuples[idx, 1], tuples[idx, 2]
        b, tp, cp = tuples[idx, 0].astype(float), tpi.astype(float), cpi.astype(float)
        n = len(idx)
        # estimate.estimate: every term is one work item's, a chunk of s/n tokens (ParallelPlan.seq_chunks)
        nck = tuples[idx, 10]
        s = seq_len // nck

        def arr(x):
            return np.broadcast_to(np.asarray(x, dtype=float), (n,)).copy()

        # link properties per distinct group (estimate.estimate: cp_link = collective(_group(0, tp, cp)))
        cp_bw = np.empty(n)
        cp_lat = np.empty(n)
        for t, c in {(int(x), int(y)) for x, y in zip(tpi, cpi)}:
            mk = (tpi == t) & (cpi == c)
            link = _collective(cluster, 0, t, c)
            cp_bw[mk], cp_lat[mk] = link.bus_bytes_per_s, link.latency_s
        etp_c = tuples[idx, 6]
        for si, layer in enumerate(shapes):
            load = 1.0
            if layer.kind == "moe":  # estimate._layer_step: the busiest expert-parallel rank
                load = moe.rank_load_factor(routing[0], routing[1], max(1, layer.experts // ep))
            sp_l = moe.layer_sp(layer.kind, sp, tp_slice)  # estimate._layer_step: tp_slice runs MoE without SP
            lt = layer_time(layer, b, s, dev, dtype, tp=tp, cp=cp, sp=sp_l, ep=ep, flash=flash,
                            etp=etp_c.astype(float), expert_load=load, seq_chunks=nck)
            lt_fwd, lt_bwd, lt_attn = arr(lt.fwd_s), arr(lt.bwd_s), arr(lt.attention_fwd_s)
            lt_flops = arr(lt.fwd_flops)
            host = float(lt.host_fwd_s)
            # --- mirrors estimate._layer_step ---
            one = np.zeros(n)
            if layer.kind in ("attention", "mlp", "moe", "encoder"):
                nbytes = layer.tokens(b, s) / cp * layer.hidden * e
                for t in np.unique(tpi[tpi > 1]).tolist():
                    mk = tpi == t
                    one[mk] = comm.all_reduce_time_s(nbytes[mk], _collective(cluster, 0, 1, t))
            tp_on = tpi > 1
            if layer.kind == "moe" and sp_l and not layer.shared_experts:
                tp_on = tp_on & (etp_c != 1)  # estimate._layer_step: folded experts skip the TP group
            cp_f = cp_b = 0.0
            if layer.kind == "attention" and a2a:
                width = layer.head_dim or (layer.mla.qk_nope_head_dim + layer.mla.qk_rope_head_dim
                                           if layer.mla else 0)
                nb = longctx.ulysses_a2a_bytes(b, s, layer.heads, layer.kv_heads or layer.heads, width, cp, tp, e)
                cp_f = np.zeros(n)
                for t, c in {(int(x), int(y)) for x, y in zip(tpi, cpi)}:
                    mk = (tpi == t) & (cpi == c)
                    link = _collective(cluster, 0, t, c)
                    cp_f[mk] = comm.all_to_all_time_s(nb[mk], link, inter_node_bytes_per_s=link.rank_inter_bytes_per_s)
                cp_f = np.where(cpi > 1, cp_f, 0.0)
                cp_b = cp_f
            elif layer.kind == "attention":
                kv = comm.cp_kv_bytes_per_layer(b, s, layer.kv_heads, layer.head_dim, cp, e)
                kv = np.where(nck > 1, kv * longctx.ring_chunk_factor(nck), kv)  # estimate._layer_step
                ring = comm.p2p_time_s(kv, cp_bw, cp_lat)
                cp_on = cpi > 1
                cp_f = np.where(cp_on, np.maximum(0.0, ring / 3 - lt_attn), 0.0)
                cp_b = np.where(cp_on, np.maximum(0.0, 2 * ring / 3 - ATTENTION_BWD_FACTOR * lt_attn), 0.0)
            ep_s = 0.0
            if ep > 1 and layer.kind == "moe" and not tp_slice:  # estimate._layer_step: tp_slice has no a2a
                tokens = layer.tokens(b, s) / cp / (tp if sp else 1)
                nbytes = tokens * layer.topk * layer.hidden * e * load
                ep_s = np.zeros(n)
                etpi = tuples[idx, 6]  # estimate: ep_link = collective(_group(0, etp or tp, ep))
                for t in np.unique(etpi).tolist():
                    mk = etpi == t
                    link = _collective(cluster, 0, t, ep)
                    ep_s[mk] = 4 * comm.all_to_all_time_s(nbytes[mk], link,
                                                          inter_node_bytes_per_s=link.rank_inter_bytes_per_s)
            mult = 3 if layer.trainable else 1
            out["fmodel"][si, idx] = mult * lt_flops
            for pi, policy in enumerate(POLICIES):
                rc = arr(recompute_time_s(lt, layer, policy))
                full = policy == "full" and layer.trainable
                tp_s = np.where(tp_on, one * (2 + (1 if full else 0)), 0.0)
                if tp_overlap:
                    tp_s = _overlapped_tp_s(tp_s, lt, rc)
                host_b = 2 * host + (host if full else 0.0)
                out["fwd"][si, pi, idx] = floored(lt_fwd + (tp_s + ep_s) / 2 + cp_f, host)
                x = lt_bwd + rc + (tp_s + ep_s) / 2 + cp_b
                out["bwd"][si, pi, idx] = floored(x, host_b) if layer.trainable else lt_bwd
                rflops = lt_flops if full else 0.0
                if policy == "selective" and layer.trainable:
                    rflops = arr(layer.attention_core_flops(b, s, tp, cp) * chunk_attention_factor(layer, nck))
                out["fhw"][si, pi, idx] = mult * lt_flops + rflops
                # --- mirrors the activation sum of estimate._memory ---
                out["act"][si, pi, idx] = layer.activation_bytes(b, s, tp, cp, sp_l, policy, e_act, flash=flash)
            # --- estimate._memory: the loss's 16-bit logits copy (LM head only) ---
            out["logit"][si, idx] = layer.logits_transient_bytes(b, s, tp, cp, e_act)
            # --- estimate._memory: one chunk's K/V (longctx.seq_chunk_kv_bytes; kept in full when the policy
            # saves only the block input, the plans here offload nothing) ---
            kv_one = np.where(nck > 1, arr(longctx.chunk_kv_bytes(layer, b, s, tp, cp, e_act)), 0.0)
            out["kv"][si, idx] = kv_one
            out["kvf"][si, POLICIES.index("full"), idx] = kv_one
            # --- estimate._memory: the ring forward's retained step buffers (a chunk's pass: its prefix's K/V) ---
            if not a2a:
                out["ring"][si, idx] = longctx.ring_forward_buffers_bytes(layer, b, s, seq_len, tp, cp, e_act)
            # --- params: estimate.estimate (stage_params) and estimate._memory (frozen) ---
            if layer.trainable:
                etp = tuples[idx, 6].astype(float)
                out["par"][si, idx] = layer.params_per_device(tp=tp, ep=ep, etp=etp)
                # estimate.estimate: stage_expert, the routed parameters per device
                out["parx"][si, idx] = float(layer.routed_params()) / (ep * etp)
            else:
                out["froz"][si, idx] = arr(layer.params_per_device(tp=tp)) * e_w
    return out


# ----------------------------------------------------------------------------------------------------------
# the batch estimate


def estimate_batch(model: ModelGraph, cluster: Cluster, workload: Workload,
                   plans: list[ParallelPlan] | PlanArrays, timings: dict | None = None) -> dict[str, np.ndarray]:
    """estimate() for every plan, as arrays in the order of `plans`.

    Returns {name: ndarray}: step_time_s, tokens_per_s, mfu, hfu, peak_memory_bytes, fits (bool), and from the
    breakdown pipeline_s (the pipeline's makespan), pp_comm_s, dp_comm_exposed_s, optimizer_s, offload_s.
    Equal to estimate() within floating-point rounding (tests/test_batch.py: rel 1e-9, fits exactly).

    Plans with an explicit partition or optimizer offload are handed to the scalar estimate, one call each.
    Raises BadInput, as estimate() would, for the first plan whose degrees do not match the cluster or the
    batch. `timings`, when given, receives seconds per phase.
    """
    t_start = time.perf_counter()
    tm = timings if timings is not None else {}
    for k in ("prepare", "layers", "chunks", "pipeline", "step+memory", "fallback"):
        tm.setdefault(k, 0.0)
    n_all = len(plans)
    # Several device types: every stage is timed on its own devices (planner/hetero/stages.py), which only
    # the scalar estimate does; every plan takes the scalar path there.
    mixed = not _homogeneous(cluster)
    # Documents of varying length (Workload.documents) and the DistCA attention pool (plan.attention_pool) are
    # modelled in estimate() only (attention_balance's per-replica work and the pool's all-to-all): every such
    # plan takes the scalar path, one estimate() call each, which the search then pays for these workloads.
    mixed = mixed or workload.documents is not None
    if isinstance(plans, PlanArrays):
        # activation offload adds per-layer transfer time only estimate._layer_step models: scalar path
        slow = np.flatnonzero((plans.offload_optimizer > 0) | (plans.offload_activations > 0) | plans.attention_pool
                              | mixed)
        slow_plans = [plans.plan(int(i)) for i in slow]
        fast_rows = np.flatnonzero((plans.offload_optimizer <= 0) & (plans.offload_activations <= 0)
                                   & ~plans.attention_pool & (not mixed))
        pa = plans.take(fast_rows) if len(slow) else plans
    else:
        is_slow = [mixed or p.partition is not None or p.offload.optimizer > 0 or p.offload.activations > 0
                   or p.attention_pool for p in plans]
        slow = np.flatnonzero(np.array(is_slow, dtype=bool))
        slow_plans = [plans[int(i)] for i in slow]
        fast_rows = np.flatnonzero(~np.array(is_slow, dtype=bool))
        pa = PlanArrays.from_plans([plans[int(i)] for i in fast_rows])
    out = {k: np.zeros(n_all, dtype=bool if k == "fits" else float) for k in OUTPUTS}
    tm["prepare"] += time.perf_counter() - t_start

    t0 = time.perf_counter()
    for i, plan in zip(slow.tolist(), slow_plans):
        est = estimate(model, cluster, workload, plan)
        out["step_time_s"][i] = est.step_time_s
        out["tokens_per_s"][i] = est.tokens_per_s
        out["mfu"][i] = est.mfu
        out["hfu"][i] = est.hfu
        out["peak_memory_bytes"][i] = est.peak_memory_bytes
        out["fits"][i] = est.fits
        # not in Estimate: estimate() adds the exposed DP traffic, optimizer step and offload to the pipeline's
        # makespan; taken back off (to rounding), it stays usable for the search's step-time bound
        bd = est.breakdown
        out["pipeline_s"][i] = est.step_time_s - bd["dp_comm_exposed_s"] - bd["optimizer_s"] - bd["offload_s"]
        for k in ("pp_comm_s", "dp_comm_exposed_s", "optimizer_s", "offload_s"):
            out[k][i] = est.breakdown[k]
    tm["fallback"] += time.perf_counter() - t0
    if len(pa):
        res = _estimate_arrays(model, cluster, workload, pa, tm)
        for k in OUTPUTS:
            out[k][fast_rows] = res[k]
    return out


def _check(pa: PlanArrays, cluster: Cluster, workload: Workload, model: ModelGraph, m: np.ndarray) -> None:
    """The refusals of estimate.estimate, split_chunks, ParallelPlan and pipeline._check_args."""
    n = pa.dp * pa.tp * pa.pp * pa.cp

    def first(mask, msg):
        bad = np.flatnonzero(mask)
        if len(bad):
            i = int(bad[0])
            raise BadInput(f"plan {i}: {msg(i)}")

    first(n != cluster.device_count, lambda i: f"plan uses dp*tp*pp*cp = {pa.dp[i]}*{pa.tp[i]}*{pa.pp[i]}*"
          f"{pa.cp[i]} = {n[i]} devices, cluster {cluster.name} has {cluster.device_count}")
    first(workload.global_batch % (pa.mbs * pa.dp) != 0,
          lambda i: f"global batch {workload.global_batch} is not divisible by mbs*dp = {pa.mbs[i]}*{pa.dp[i]}")
    first((pa.vpp > 1) & (pa.schedule != SCHEDULES.index("interleaved-1f1b")),
          lambda i: f"vpp={pa.vpp[i]} needs schedule 'interleaved-1f1b'")
    first(pa.sp & (pa.tp == 1), lambda i: "sequence parallel (sp) needs tp > 1")
    # ParallelPlan._check and estimate._check_seq_chunks: chunked sequences
    chunked = pa.seq_chunks > 1
    first(chunked & (((pa.schedule != SCHEDULES.index("gpipe")) & (pa.schedule != SCHEDULES.index("1f1b")))
                     | ~pa.flash_attention),
          lambda i: f"seq_chunks={pa.seq_chunks[i]} needs schedule 'gpipe' or '1f1b' and flash attention")
    first(chunked & (workload.seq_len % (pa.seq_chunks * np.where(pa.cp > 1, 2 * pa.cp, 1)) != 0),
          lambda i: f"seq_chunks {pa.seq_chunks[i]}: sequence {workload.seq_len} must divide into {pa.seq_chunks[i]} "
                    f"chunks" + (f" of 2*cp = {2 * pa.cp[i]} parts" if pa.cp[i] > 1 else ""))
    if chunked.any():
        _check_seq_chunks(model, pa.plan(int(np.flatnonzero(chunked)[0])), workload.seq_len)
    # ParallelPlan._check: Pipeline MoE puts E/tp whole experts on each TP rank
    first(pa.moe_tp_slice & ((pa.tp == 1) | (pa.ep != pa.tp) | (pa.etp != 1)),
          lambda i: f"moe_dispatch 'tp_slice' needs tp > 1, ep = tp and etp = 1; got tp={pa.tp[i]}, ep={pa.ep[i]}, "
                    f"etp={pa.etp[i] or None}")
    # estimate._check_expert_parallel, once per distinct (ep, etp, dp, cp, tp); it accepts ep = 1 without
    # looking further, so only plans with ep > 1 are checked. _row_ids lists the distinct rows in the
    # lexicographic order np.unique(axis=...) would, without its argsort of a structured view (which took
    # most of a hot 100k-plan call).
    moe_rows = np.flatnonzero(pa.ep != 1)
    firsts = _row_ids([pa.ep[moe_rows], pa.etp[moe_rows], pa.dp[moe_rows], pa.cp[moe_rows], pa.tp[moe_rows]])[0]
    for i in moe_rows[firsts]:
        try:
            _check_expert_parallel(model, pa.plan(int(i)))
        except BadInput as e:
            raise BadInput(f"plan {int(i)}: {e}") from None
    first((pa.schedule == SCHEDULES.index("interleaved-1f1b")) & (m % pa.pp != 0),
          lambda i: f"interleaved-1f1b needs the number of micro-batches ({m[i]}) to be a multiple of pp")
    blocks = model.num_blocks
    if blocks:
        first(pa.pp * pa.vpp > blocks,
              lambda i: f"pp*vpp = {pa.pp[i] * pa.vpp[i]} pipeline chunks but the model has only {blocks} blocks")
    for name in ("dp", "tp", "pp", "vpp", "cp", "ep", "mbs"):
        first(getattr(pa, name) < 1, lambda i, name=name: f"{name} must be >= 1")
    first((pa.zero < 0) | (pa.zero > 3), lambda i: "zero must be 0-3")


def _row_ids(cols: list) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each distinct row, id of every row's distinct row) for integer columns >= 0, with the
    distinct rows in lexicographic order (the first column most significant)."""
    cols = [np.asarray(c, dtype=np.int64) for c in cols]
    bits = [max(1, int(c.max()).bit_length()) if len(c) else 1 for c in cols]
    if sum(bits) <= 62 and all(int(c.min()) >= 0 for c in cols if len(c)):
        key = np.zeros(len(cols[0]), dtype=np.int64)
        for c, nb in zip(cols, bits):
            key = (key << nb) | c
        space = 1 << sum(bits)
        if space <= 1 << 22:  # dense lookup table: no sort
            present = np.zeros(space, dtype=bool)
            present[key] = True
            uniq = np.flatnonzero(present)
            lut = np.empty(space, dtype=np.int64)
            lut[uniq] = np.arange(len(uniq))
            inv = lut[key]
            first = np.empty(len(uniq), dtype=np.int64)
            first[inv[::-1]] = np.arange(len(key))[::-1]
            return first, inv
        _, first, inv = np.unique(key, return_index=True, return_inverse=True)
        return first, inv.reshape(-1)
    _, first, inv = np.unique(np.stack(cols, axis=1), axis=0, return_index=True, return_inverse=True)
    return first, inv.reshape(-1)


def _float_ids(a: np.ndarray) -> np.ndarray:
    """Id of each value among the distinct values of a float column (np.unique's inverse). A column that holds
    one value (offload fractions are usually all 0) skips np.unique's sort."""
    if len(a) == 0 or bool(np.all(a == a[0])):
        return np.zeros(len(a), dtype=np.int64)
    return np.unique(a, return_inverse=True)[1].reshape(-1)


def _ranges(sorted_ids: np.ndarray, n: int) -> list[tuple[int, int]]:
    """(start, stop) of each id 0..n-1 in an array of ids in ascending order."""
    edges = np.searchsorted(sorted_ids, np.arange(n + 1))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


_COUNTS: dict = {}


def _counts(model: ModelGraph, shape_of: dict, pp: int, vpp: int, rc: int, rnl: int):
    """Layer counts of a count group: per chunk (chunk, shape x policy) and per stage (estimate.estimate:
    chunk c runs on stage c % pp; estimate._policies gives each layer's policy; trainable layers count
    toward stage_params, frozen ones toward estimate._memory's `frozen`)."""
    key = (id(model), pp, vpp, rc, rnl)
    hit = _COUNTS.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    S = len(shape_of)
    chunks = _split(model, pp * vpp)
    C = len(chunks)
    mode_plan = ParallelPlan.model_construct(recompute=POLICIES[rc], recompute_num_layers=None if rnl < 0 else rnl)
    K = np.zeros((C, S, 3))
    T = np.zeros((C, S))
    Fz = np.zeros((C, S))
    # estimate._memory's backward working set: per stage, the distinct blocks (their trainable layers'
    # (shape, policy) in layer order), of which the largest counts
    sigs: list = [[] for _ in range(pp)]
    for c, layers in enumerate(chunks):
        pol = _policies(layers, mode_plan)
        blocks: dict = {}
        for layer in layers:
            si = shape_of[layer.shape_key]
            K[c, si, POLICIES.index(pol[layer.name])] += 1
            if layer.trainable:
                T[c, si] += 1
                if layer.block is not None:
                    blocks.setdefault(layer.block, []).append((si, POLICIES.index(pol[layer.name])))
            else:
                Fz[c, si] += 1
        for sig in map(tuple, blocks.values()):
            if sig not in sigs[c % pp]:
                sigs[c % pp].append(sig)
    stage_of = np.arange(C) % pp
    onehot = np.zeros((pp, C))
    onehot[stage_of, np.arange(C)] = 1.0
    Kf = K.reshape(C, S * 3)
    res = dict(C=C, K=Kf, Kst=onehot @ Kf, Tst=onehot @ T, Fst=onehot @ Fz, onehot=onehot,
               Kall=K.sum(axis=(0, 2)), Ktot=Kf.sum(axis=0), Lst=onehot @ K.sum(axis=2), sigs=sigs)
    if len(_COUNTS) > 4096:
        _COUNTS.clear()
    _COUNTS[key] = (model, res)
    return res


def _group_entry(ctx: _Ctx, pp: int, vpp: int, rc: int, rnl: int, n_dev: int, e: int, g_bytes: int, s: int) -> dict:
    """A count group's sums for every column of ctx (cached in ctx.groups until new columns appear): per chunk
    forward / backward time, per stage params / frozen / activation bytes; the worst stage's params, busy time
    and last backward; model and hardware FLOPs; the DP gradient reduction and ZeRO traffic over the dp
    group (dp = n / (tp cp pp), so the group and column fix every DP term); the pipeline p2p time."""
    key = (pp, vpp, rc, rnl)
    ent = ctx.groups.get(key)
    if ent is not None:
        return ent
    model, cluster, lv, tuples = ctx.model, ctx.cluster, ctx.lv, ctx.tuples
    S, G = len(ctx.shapes), len(tuples)
    k = _counts(model, ctx.shape_of, pp, vpp, rc, rnl)
    Fc = k["K"] @ lv["fwd"].reshape(S * 3, G)  # (C, G): estimate.estimate's fwd_s per chunk
    Bc = k["K"] @ lv["bwd"].reshape(S * 3, G)
    par_st = k["Tst"] @ lv["par"]  # (pp, G): stage_params
    # estimate.estimate: worst = argmax(stage_params); exact ties (equal stages) go to the first,
    # robust to last-bit differences between a matmul and a sequential sum.
    near = par_st >= par_st.max(axis=0) * (1 - 1e-12)
    worst = np.argmax(near, axis=0)
    # the worst stage's chunks (c % pp == worst) summed in chunk order, as estimate.estimate sums them;
    # gathering just those rows is cheaper than a (pp x C) one-hot matmul, which OpenBLAS threads
    # slowly on a busy machine
    cols = np.arange(G)
    rows = worst[None, :] + pp * np.arange(vpp)[:, None]
    Fw = Fc[rows, cols].sum(axis=0)
    Bw = Bc[rows, cols].sum(axis=0)
    # estimate._memory: the largest block's backward working set per stage, and the loss logits copy
    work_st = np.zeros((pp, G))
    for st_, sigs in enumerate(k["sigs"]):
        for sig in sigs:
            full = np.stack([lv["act"][si, 0] for si, _ in sig])
            kept = np.stack([lv["act"][si, pi] for si, pi in sig])
            work_st[st_] = np.maximum(work_st[st_], memory.backward_working_bytes(full, kept))
    ent = dict(Fc=Fc, Bc=Bc, par_st=par_st, froz_st=k["Fst"] @ lv["froz"], parx_st=k["Tst"] @ lv["parx"],
               work_st=work_st, logit_st=k["Lst"] @ lv["logit"], kvf_st=k["Kst"] @ lv["kvf"].reshape(S * 3, G),
               kva_st=k["Lst"] @ lv["kv"],
               # estimate._memory: the largest ring forward buffers of a layer on the stage
               ring_st=np.max(np.where(k["Lst"][:, :, None] > 0, lv["ring"][None, :, :], 0.0), axis=1),
               act_st=k["Kst"] @ lv["act"].reshape(S * 3, G), params_dev=par_st[worst, cols], last_bwd=Bw,
               busy_worst=Fw + Bw, fm=k["Kall"] @ lv["fmodel"], fh=k["Ktot"] @ lv["fhw"].reshape(S * 3, G))
    # --- mirrors estimate.estimate: DP gradient reduction and ZeRO traffic over the dp group, per layer ---
    # gradients reduce over dp x cp ranks with stride tp (estimate.estimate: grad_ranks)
    cnt_worst = k["Tst"][worst].T  # (S, G) layers of each shape on the worst stage
    tp_c, cp_c = tuples[:, 1], tuples[:, 2]
    ar, rs, ag = np.zeros(G), np.zeros(G), np.zeros(G)
    for t in np.unique(tp_c).tolist():
        dp = n_dev // (t * pp)
        if dp <= 1:
            continue
        mk = tp_c == t
        link = _collective(cluster, 0, t, dp)
        pl, cw = lv["par"][:, mk], cnt_worst[:, mk]
        ar[mk] = np.sum(cw * comm.all_reduce_time_s(pl * g_bytes, link), axis=0)
        rs[mk] = np.sum(cw * comm.reduce_scatter_time_s(pl * g_bytes, link), axis=0)
        ag[mk] = np.sum(cw * comm.all_gather_time_s(pl * e, link), axis=0)
    # estimate.estimate: with ep*etp != tp the routed experts sync over EDP = n/(pp ep etp) ranks ep*etp apart
    ep_c, etp_c = tuples[:, 5], tuples[:, 6]
    for t, x, y in {(int(a), int(b), int(c)) for a, b, c in zip(tp_c, ep_c, etp_c) if b * c != a}:
        mk = (tp_c == t) & (ep_c == x) & (etp_c == y)
        dp = n_dev // (t * pp)
        edp = n_dev // (pp * x * y)
        px, cw = lv["parx"][:, mk], cnt_worst[:, mk]
        pl = lv["par"][:, mk] - px
        ar[mk] = rs[mk] = ag[mk] = 0.0  # columns whose degrees fit no plan of this pp keep 0
        if dp > 1:
            link = _collective(cluster, 0, t, dp)
            ar[mk] = np.sum(cw * comm.all_reduce_time_s(pl * g_bytes, link), axis=0)
            rs[mk] = np.sum(cw * comm.reduce_scatter_time_s(pl * g_bytes, link), axis=0)
            ag[mk] = np.sum(cw * comm.all_gather_time_s(pl * e, link), axis=0)
        if edp > 1 and n_dev % (pp * x * y) == 0:
            link = _collective(cluster, 0, x * y, edp)
            ar[mk] += np.sum(cw * comm.all_reduce_time_s(px * g_bytes, link), axis=0)
            rs[mk] += np.sum(cw * comm.reduce_scatter_time_s(px * g_bytes, link), axis=0)
            ag[mk] += np.sum(cw * comm.all_gather_time_s(px * e, link), axis=0)
    # --- estimate.pipeline_p2p_s, the same function the scalar estimate calls (columns whose tp * cp does
    # not fit this pp on the cluster belong to no plan: nan) ---
    p2p = np.zeros(G)
    if pp > 1:
        ok = n_dev % (tp_c * cp_c * pp) == 0
        ss = tp_c * cp_c * (n_dev // (tp_c * cp_c * pp))  # stage_size = tp * cp * dp
        p2p[~ok] = np.nan
        hidden = model.layers[0].hidden
        for x in np.unique(ss[ok]).tolist():
            mk = ok & (ss == x)
            b, cp, tp = tuples[mk, 0].astype(float), cp_c[mk].astype(float), tp_c[mk].astype(float)
            # estimate.estimate: one work item's activations, s/n tokens (ParallelPlan.seq_chunks)
            nbytes = b * (s // tuples[mk, 10]) / cp * hidden * e / np.where(tuples[mk, 3] > 0, tp, 1)
            p2p[mk] = pipeline_p2p_s(cluster, pp, x, nbytes, p2p=lambda a, c: _p2p(cluster, a, c))
    ent.update(ar=ar, rs=rs, ag=ag, p2p=p2p)
    ctx.groups[key] = ent
    ctx.stages = None
    return ent


_PER_COLUMN = ("params_dev", "last_bwd", "busy_worst", "fm", "fh", "ar", "rs", "ag", "p2p")


def _estimate_arrays(model, cluster, workload, pa: PlanArrays, tm: dict) -> dict:
    t0 = time.perf_counter()
    P = len(pa)
    n_dev = cluster.device_count
    dev = cluster.devices[0].device
    dtype = workload.dtype
    # estimate.estimate: e, b, s, m
    e = DTYPE_BYTES[dtype] if dtype != "fp8" else 2
    s = workload.seq_len
    m = np.where(pa.num_microbatches > 0, pa.num_microbatches,
                 np.maximum(1, workload.global_batch // (pa.mbs * pa.dp)))
    _check(pa, cluster, workload, model, m)
    items = m * pa.seq_chunks  # estimate.estimate: work items per step (ParallelPlan.seq_chunks)
    # estimate._memory: dtype sizes
    e_w = 2 if workload.dtype in ("bf16", "fp16", "fp8") else 4
    e_act = 2 if workload.dtype != "fp32" else 4
    g_bytes = 4 if workload.grad_dtype == "fp32" else 2
    ctx = _ctx(model, cluster, workload)

    # distinct layer tuples -> columns of ctx (u_of: every plan's column), count groups cg, pipeline groups pg
    etp = np.where(pa.etp > 0, pa.etp, pa.tp)
    lt_cols = [pa.mbs, pa.tp, pa.cp, pa.sp, pa.flash_attention, pa.ep, etp, pa.overlap_tp_comm, pa.cp_a2a,
               pa.moe_tp_slice, pa.seq_chunks]
    u_first, u_of = _row_ids(lt_cols)
    tuples_b = np.stack([np.asarray(c, dtype=np.int64)[u_first] for c in lt_cols], axis=1)
    cg_first, cg_of = _row_ids([pa.pp, pa.vpp, pa.recompute, pa.recompute_num_layers + 1])
    cg_keys = np.stack([pa.pp[cg_first], pa.vpp[cg_first], pa.recompute[cg_first],
                        pa.recompute_num_layers[cg_first]], axis=1)
    pg_first, pg_of = _row_ids([pa.schedule, pa.pp, pa.vpp, m, pa.seq_chunks])
    pg_keys = np.stack([pa.schedule[pg_first], pa.pp[pg_first], pa.vpp[pg_first], m[pg_first],
                        pa.seq_chunks[pg_first]], axis=1)
    NPG = len(pg_keys)
    tm["prepare"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    u_of = ctx.columns(tuples_b, (cluster, dev, dtype, e, e_act, e_w, s,
                                  (workload.moe_imbalance, workload.moe_capacity_factor)))[u_of]
    G = len(ctx.tuples)
    tm["layers"] += time.perf_counter() - t0

    # ---- per count group, for every column: chunk and stage sums, DP traffic, p2p ------------------------
    t0 = time.perf_counter()
    cg = [_group_entry(ctx, pp, vpp, rc, rnl, n_dev, e, g_bytes, s) for pp, vpp, rc, rnl in cg_keys.tolist()]
    # distinct (count group, column) pairs
    cu_first, cu_of = _row_ids([cg_of, u_of])
    cu_cg, cu_u = cg_of[cu_first], u_of[cu_first]
    flat = cu_cg * G + cu_u
    per_cu = {k: np.stack([x[k] for x in cg]).ravel()[flat] for k in _PER_COLUMN}
    tm["chunks"] += time.perf_counter() - t0

    # ---- pipeline: distinct problems (pipeline group, count group, column) --------------------------------
    t0 = time.perf_counter()
    pr_first, pr_of = _row_ids([pg_of, cu_of])
    pr_pg, pr_cu = pg_of[pr_first], cu_of[pr_first]
    pr_cg, pr_u = cu_cg[pr_cu], cu_u[pr_cu]
    NPR = len(pr_first)
    p2p_pr = per_cu["p2p"][pr_cu]
    # A problem's makespan is fixed by its (pipeline group, count group, column) once the model, the cluster,
    # seq_len and dtype are: reuse what an earlier call on them computed (a search calls estimate_batch again
    # and again on one cluster; most of its pipeline problems repeat). Keys: the three ids packed in an int64.
    key = (ctx.ids(ctx.pg_id, pg_keys)[pr_pg] << 42) | (ctx.ids(ctx.cg_id, cg_keys)[pr_cg] << 21) | pr_u
    pipe_pr = np.full(NPR, np.nan)
    miss = np.ones(NPR, dtype=bool)
    if len(ctx.pipe_keys):
        at = np.minimum(np.searchsorted(ctx.pipe_keys, key), len(ctx.pipe_keys) - 1)
        hit = ctx.pipe_keys[at] == key
        pipe_pr[hit] = ctx.pipe_vals[at[hit]]
        miss = ~hit
    if miss.any():
        pr_ranges = _ranges(pr_pg, NPG)
        for gk, (sch, pp, vpp, mm, nc) in enumerate(pg_keys.tolist()):
            a, b = pr_ranges[gk]
            rows = a + np.flatnonzero(miss[a:b])
            if not len(rows):
                continue
            schedule = SCHEDULES[sch]
            dag = _dag(schedule, pp, vpp, mm, nc)
            n_st = pp * vpp
            D = np.zeros((len(rows), 3 * n_st))
            cgs, us = pr_cg[rows], pr_u[rows]
            for gi in np.unique(cgs).tolist():
                sel = cgs == gi
                F = cg[gi]["Fc"][:, us[sel]].T
                B = cg[gi]["Bc"][:, us[sel]].T
                D[sel, :n_st] = F
                if schedule == "zb-h1":
                    # pipeline.simulate: w = bwd / 2, B op = bwd - w, W op = w
                    w = B / 2
                    D[sel, n_st:2 * n_st] = B - w
                    D[sel, 2 * n_st:] = w
                else:
                    D[sel, n_st:2 * n_st] = B
            pipe_pr[rows] = _makespan(dag, D, p2p_pr[rows])
        if len(ctx.pipe_keys) + int(miss.sum()) > _PIPE_MEMO_MAX:
            ctx.pipe_keys, ctx.pipe_vals = ctx.pipe_keys[:0], ctx.pipe_vals[:0]
        keys = np.concatenate([ctx.pipe_keys, key[miss]])
        order = np.argsort(keys, kind="stable")
        ctx.pipe_keys, ctx.pipe_vals = keys[order], np.concatenate([ctx.pipe_vals, pipe_pr[miss]])[order]
    tm["pipeline"] += time.perf_counter() - t0

    # ---- step time, per plan --------------------------------------------------------------------------
    t0 = time.perf_counter()
    dp = pa.dp
    pipe_s = pipe_pr[pr_of]
    p2p_s = p2p_pr[pr_of]
    ar, rs, ag = per_cu["ar"][cu_of], per_cu["rs"][cu_of], per_cu["ag"][cu_of]
    dp_s = np.where(pa.zero == 0, ar, rs + np.where(pa.zero < 3, ag, 2 * items * ag))
    # estimate: grad_ranks > 1, or routed experts syncing over their own EDP group
    dp_s = np.where((dp * pa.cp > 1) | (pa.ep * etp != pa.tp), dp_s, 0.0) / dev.efficiency.dp_collective
    busy = per_cu["busy_worst"][cu_of]
    last_bwd = per_cu["last_bwd"][cu_of]
    params_dev = per_cu["params_dev"][cu_of]
    stage_busy = np.where(pa.pp > 1, items * busy, pipe_s)
    hide = dev.efficiency.comm_overlap
    dp_exposed = np.where(
        pa.zero == 3, np.maximum(dp_s - hide * stage_busy, EXPOSED_TAIL_FRACTION * dp_s),
        np.where(pa.overlap_grad_reduce, np.maximum(dp_s - hide * last_bwd, EXPOSED_TAIL_FRACTION * dp_s), dp_s))
    if dev.efficiency.shard_copy_ns_per_byte:
        dp_exposed = dp_exposed + np.where(dp * pa.cp > 1, shard_copy_s(params_dev, e, g_bytes, pa.zero, items, dev),
                                           0.0)
    # optimizer step (offload_s is 0: plans with optimizer offload went to the scalar estimate)
    owned = params_dev / np.where(pa.zero >= 1, dp * pa.cp, 1)
    on_device = owned * (1 - pa.offload_optimizer)
    opt_s = on_device * 32 / (dev.memory_bandwidth_bytes_per_s * dev.efficiency.memory)
    offload_s = np.zeros(P)
    step = pipe_s + dp_exposed + opt_s + offload_s
    tokens = workload.global_batch * workload.seq_len
    scale = items * pa.tp * pa.cp * dp
    fm = per_cu["fm"][cu_of] * scale
    fh = per_cu["fh"][cu_of] * scale
    peak = dev.peak_flops(dtype) * n_dev

    # ---- memory: distinct (problem, zero, offload fractions), in blocks of one (pp, zero) -----------------
    oa_first, oa_of = _row_ids([_float_ids(pa.offload_activations), _float_ids(pa.offload_optimizer)])
    me_first, me_of = _row_ids([pr_of, pa.zero, oa_of])
    me_pr = pr_of[me_first]
    me_zero = pa.zero[me_first]
    me_dp = (dp * pa.cp)[me_first]  # ZeRO shards over dp x cp (estimate._memory)
    me_oact = pa.offload_activations[me_first]
    me_oopt = pa.offload_optimizer[me_first]
    oact_any, oopt_any = bool(me_oact.any()), bool(me_oopt.any())  # x * (1 - 0) is x: skipped when all 0
    me_pg = pr_pg[me_pr]
    par_t, froz_t, act_t, parx_t, work_t, logit_t, kvf_t, kva_t, ring_t = ctx.stage_tables()
    me_nc = pa.seq_chunks[me_first]
    # estimate.expert_data_parallel: the ranks sharing the same experts
    me_edp = (dp * pa.cp * pa.tp // (pa.ep * etp))[me_first]
    me_row = np.array([x["row"] for x in cg], dtype=np.int64)[pr_cg[me_pr]]
    me_u = pr_u[me_pr]
    me_pp = pg_keys[me_pg, 1]
    max_pp = int(pg_keys[:, 1].max())
    infl_t = np.zeros((NPG, max_pp))
    for gk, (sch, pp, vpp, mm, nc) in enumerate(pg_keys.tolist()):
        infl_t[gk, :pp] = _inflight(SCHEDULES[sch], pp, vpp, mm, nc)  # mirrors estimate._memory
    infl_t = infl_t.ravel()
    order = np.lexsort((me_zero, me_pp))
    o_pp, o_zero = me_pp[order], me_zero[order]
    cut = np.flatnonzero((o_pp[1:] != o_pp[:-1]) | (o_zero[1:] != o_zero[:-1])) + 1
    mem_me = np.empty(len(me_first))
    for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(order)]):
        idx = order[a:b]
        pp, zz = int(o_pp[a]), int(o_zero[a])
        st = np.arange(pp)
        at = (me_row[idx][:, None] + st) * G + me_u[idx][:, None]  # (plans, stages) in the stacked tables
        # --- mirrors estimate._memory ---
        weights, grads, optim = memory.model_state_parts(par_t.take(at), me_dp[idx][:, None], zz,
                                                         weight_dtype_bytes=e_w, grad_dtype_bytes=g_bytes,
                                                         optimizer=workload.optimizer)
        parx = parx_t.take(at)
        split = (parx > 0) & (me_edp[idx] != me_dp[idx])[:, None]
        if split.any():  # estimate._memory: dense states over dp x cp, routed experts over EDP
            dense = memory.model_state_parts(par_t.take(at) - parx, me_dp[idx][:, None], zz, weight_dtype_bytes=e_w,
                                             grad_dtype_bytes=g_bytes, optimizer=workload.optimizer)
            routed = memory.model_state_parts(parx, me_edp[idx][:, None], zz, weight_dtype_bytes=e_w,
                                              grad_dtype_bytes=g_bytes, optimizer=workload.optimizer)
            weights, grads, optim = (np.where(split, d + r, x) for d, r, x in
                                     zip(dense, routed, (weights, grads, optim)))
        infl = infl_t.take(me_pg[idx][:, None] * max_pp + st)
        acts = act_t.take(at) * infl
        if oact_any:
            acts = acts * (1 - me_oact[idx])[:, None]
        if oopt_any:
            optim = optim * (1 - me_oopt[idx])[:, None]
        work = work_t.take(at)
        subtotal = weights + grads + optim + froz_t.take(at) + acts + work + logit_t.take(at)
        ring = ring_t.take(at)
        if (ring > 0).any():  # estimate._memory: ring buffers beyond the backward working set
            subtotal = subtotal + np.maximum(0.0, ring - work)
        nc = me_nc[idx][:, None]
        if (nc > 1).any():  # estimate._memory: chunked sequences' K/V (longctx.seq_chunk_kv_bytes)
            subtotal = subtotal + np.where(nc > 1, kvf_t.take(at) * infl + kva_t.take(at) * (nc - 1), 0.0)
        # the worst stage's total: allocator_overhead_bytes (x + (0.07 x + c)) is nondecreasing in x, also
        # in floating point, so it is applied to the largest subtotal only
        top = subtotal.max(axis=1)
        mem_me[idx] = top + memory.allocator_overhead_bytes(top)
    peak_mem = mem_me[me_of]
    out = {
        "step_time_s": step, "tokens_per_s": tokens / step, "mfu": fm / (step * peak), "hfu": fh / (step * peak),
        "peak_memory_bytes": peak_mem, "fits": peak_mem <= dev.memory_bytes, "pipeline_s": pipe_s,
        "pp_comm_s": np.where(pa.pp > 1, 2 * items * pa.vpp * p2p_s, 0.0), "dp_comm_exposed_s": dp_exposed,
        "optimizer_s": opt_s, "offload_s": offload_s,
    }
    tm["step+memory"] += time.perf_counter() - t0
    return out
