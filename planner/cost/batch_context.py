"""What estimate_batch keeps between calls (CostContext) and the per count group sums it builds from it.

A count group is (pp, vpp, recompute, recompute_num_layers): it fixes which layers each chunk and stage holds
(chunks.layer_counts) and so, for every layer-tuple column of CostContext, the chunk times, stage memory tables, DP traffic and
p2p time (group_sums). Separate from planner/cost/batch.py, which only gathers these per plan.
"""
from __future__ import annotations

import numpy as np

from planner.core import dtypes
from planner.core.hardware import Cluster
from planner.core.model import ModelGraph
from planner.core.plan import Workload
from planner.cost import memory
from planner.cost.batch_layers import TUPLE, layer_values
from planner.cost.chunks import layer_counts, shape_index
from planner.cost.links import cached_p2p, pipeline_p2p_s, strided_link
from planner.cost.step_terms import compressed_p2p_bytes, layer_sync_sums_s

_CONTEXTS_PER_CLUSTER = 64
PIPE_MEMO_MAX = 500_000
IDS_MAX = 1 << 20  # columns, pipeline groups and count groups get ids below 2**21: packed in one int64


class CostContext:
    """What the estimate computed for one (model, cluster, workload terms) -- and, for a stage of a stage
    layout, that stage's device and links -- that a later call on them reuses; each piece is fixed by its key.

    - columns: one per distinct layer tuple seen (`col`, `tuples`, batch_layers.TUPLE), holding
      layer_values' per-shape values for it (`lv`, arrays whose last axis is the column). A column's values
      are computed from its tuple alone (elementwise), so they do not depend on which other tuples a batch holds.
    - count groups (`groups`): per (pp, vpp, recompute, recompute_num_layers, partition) its chunk and stage
      sums, worst stage, DP traffic and p2p time for every column (group_sums). New columns drop them all
      (they are recomputed over every column when next needed), and any new entry drops `stages`, the
      per-stage tables of all entries stacked for the memory phase.
    - makespans per pipeline problem (pipeline group, count group, column): a sorted array of packed int64
      keys (`pipe_keys`) and their values; pipeline and count groups get small ids (`pg_id`, `cg_id`).

    Kept on its cluster (cost_context), so it lives as long as the cluster does."""

    def __init__(self, model: ModelGraph, cluster: Cluster, workload: Workload, dev=None, links=None):
        self.model, self.cluster = model, cluster
        self.shape_of, self.shapes = shape_index(model)
        host = cluster.nodes[0].host_link
        e = dtypes.activation_bytes(workload.dtype)
        docs = None if workload.documents is None else (workload.global_batch, workload.documents)
        # layer_values' arguments after (shapes, tuples): the stage's device (the cluster's first unless a
        # stage layout places it) and links (None: the cluster's strided groups)
        self.layer_args = (cluster, dev or cluster.devices[0].device, workload.dtype, e, e,
                           dtypes.weight_bytes(workload.dtype), workload.seq_len,
                           (workload.moe_imbalance, workload.moe_capacity_factor),
                           None if host is None else host.bytes_per_s, docs, links)
        self.col: dict = {}
        self.tuples = np.zeros((0, len(TUPLE)), dtype=np.int64)
        self.lv: dict | None = None
        self.groups: dict = {}
        self.stages = None
        self.pg_id: dict = {}
        self.cg_id: dict = {}
        self.partitions: list = [None]  # explicit partitions seen (chunks.partition_key), by id; 0: the even split
        self.partition_id: dict = {None: 0}
        self.pipe_keys = np.zeros(0, dtype=np.int64)
        self.pipe_vals = np.zeros(0)

    def columns(self, tuples: np.ndarray) -> np.ndarray:
        """The column of each layer tuple (rows of `tuples`), evaluating the layer values of new ones."""
        ids = [self.col.get(t) for t in map(tuple, tuples.tolist())]
        new = [i for i, c in enumerate(ids) if c is None]
        if new:
            nt = tuples[new]
            vals = layer_values(self.shapes, nt, *self.layer_args)
            self.lv = vals if self.lv is None else {k: np.concatenate([self.lv[k], v], axis=-1)
                                                     for k, v in vals.items()}
            for i, t in zip(new, map(tuple, nt.tolist())):
                ids[i] = self.col[t] = len(self.col)
            self.tuples = np.concatenate([self.tuples, nt])
            self.groups.clear()
            self.stages = None
        return np.array(ids, dtype=np.int64)

    def partition_ids(self, keys: list) -> np.ndarray:
        """The id of each partition key (new ones appended): a count-group column."""
        out = np.empty(len(keys), dtype=np.int64)
        for i, k in enumerate(keys):
            hit = self.partition_id.get(k)
            if hit is None:
                hit = self.partition_id[k] = len(self.partitions)
                self.partitions.append(k)
            out[i] = hit
        return out

    def ids(self, table: dict, keys: np.ndarray) -> np.ndarray:
        return np.array([table.setdefault(k, len(table)) for k in map(tuple, keys.tolist())], dtype=np.int64)

    def stage_tables(self):
        """(per-stage params, frozen bytes, activation bytes, routed params, backward working bytes, logits
        bytes, full-recompute K/V, all K/V, ring buffers) of every entry stacked as flat arrays: entry row
        r + stage (r: the entry's "row"), column c at (r + stage) * columns + c."""
        if self.stages is None:
            ents = list(self.groups.values())
            rows = np.cumsum([0] + [len(x["par_st"]) for x in ents])
            for x, r in zip(ents, rows.tolist()):
                x["row"] = r
            self.stages = tuple(np.concatenate([x[k] for x in ents]).ravel() for k in STAGE_TABLES)
        return self.stages


STAGE_TABLES = ("par_st", "froz_st", "act_st", "parx_st", "work_st", "logit_st", "kvf_st", "kva_st", "ring_st")


def forget(cluster: Cluster) -> None:
    """Drop every cost context kept on `cluster` (tests and benchmarks start from an empty memo)."""
    cluster.__dict__.pop(_STORE, None)


_STORE = "_cost_contexts"


def _store(cluster: Cluster) -> dict:
    """The cost contexts kept on this cluster object, freed with it. Owned by the object: a copy
    (Cluster.with_efficiency / with_stack are model_copy, which copies the instance dict) starts its own, or
    it would price its new efficiencies with the original's cached values."""
    hit = cluster.__dict__.get(_STORE)
    if hit is None or hit["owner"] is not cluster:
        hit = cluster.__dict__[_STORE] = {"owner": cluster}
    return hit


def cost_context(model: ModelGraph, cluster: Cluster, workload: Workload, stage_key=None, dev=None, links=None) -> CostContext:
    """The cached CostContext of (model, cluster, the workload's terms); stage_key names a stage of a stage layout
    (its device and groups), whose dev and links the context then uses."""
    docs = None if workload.documents is None else (workload.global_batch, workload.documents)
    # kept on the cluster, freed with it; the model named by its serial
    store = _store(cluster)
    key = (model._cost_cache["serial"], workload.seq_len, workload.dtype, workload.grad_dtype, workload.moe_imbalance,
           workload.moe_capacity_factor, docs, stage_key)
    hit = store.get(key)
    if hit is None or max(len(hit.col), len(hit.pg_id), len(hit.cg_id), len(hit.partitions)) > IDS_MAX:
        if len(store) > _CONTEXTS_PER_CLUSTER:
            store.clear()
            store["owner"] = cluster
        hit = store[key] = CostContext(model, cluster, workload, dev, links)
    return hit


def group_sums(ctx: CostContext, pp: int, vpp: int, rc: int, rnl: int, n_dev: int, e: int, w_bytes: int, g_bytes: int,
                 s: int, partition=None) -> dict:
    """A count group's sums for every column of ctx (cached in ctx.groups until new columns appear): the chunk
    and stage sums (_chunk_stage_sums), the worst stage's DP gradient reduction and ZeRO traffic
    (_dp_collective_sums) and the pipeline p2p time (_p2p_column_s). e: activation bytes per element, w_bytes
    and g_bytes: bytes per weight and per gradient."""
    key = (pp, vpp, rc, rnl, partition)
    ent = ctx.groups.get(key)
    if ent is not None:
        return ent
    k = layer_counts(ctx.model, pp, vpp, rc, rnl, partition)
    ent = _chunk_stage_sums(ctx, k, pp, vpp)
    ar, rs, ag = _dp_collective_sums(ctx, k["Tst"][ent["worst"]].T, pp, n_dev, w_bytes, g_bytes)
    ent.update(ar=ar, rs=rs, ag=ag, p2p=_p2p_column_s(ctx, pp, n_dev, e, s))
    ctx.groups[key] = ent
    ctx.stages = None
    return ent


def _chunk_stage_sums(ctx: CostContext, k: dict, pp: int, vpp: int) -> dict:
    """Per chunk forward / backward time, per stage params / frozen / activation / memory-table bytes; the
    worst stage, its params, busy time and last backward; model and hardware FLOPs: for every column, from the
    count group's layer counts `k` (chunks.layer_counts) by matmul."""
    lv, S, G = ctx.lv, len(ctx.shapes), len(ctx.tuples)
    Fc = k["K"] @ lv["fwd"].reshape(S * 3, G)  # (C, G): the chunk sums' fwd_s per chunk
    Bc = k["K"] @ lv["bwd"].reshape(S * 3, G)
    par_st = k["Tst"] @ lv["par"]  # (pp, G): stage_params
    # estimate._data_parallel_sync: worst = argmax(stage_params); exact ties (equal stages) go to the first,
    # robust to last-bit differences between a matmul and a sequential sum.
    near = par_st >= par_st.max(axis=0) * (1 - 1e-12)
    worst = np.argmax(near, axis=0)
    # the worst stage's chunks (c % pp == worst) summed in chunk order, as the scalar estimate sums them;
    # gathering just those rows is cheaper than a (pp x C) one-hot matmul, which OpenBLAS threads
    # slowly on a busy machine
    cols = np.arange(G)
    rows = worst[None, :] + pp * np.arange(vpp)[:, None]
    Fw = Fc[rows, cols].sum(axis=0)
    Bw = Bc[rows, cols].sum(axis=0)
    # estimate._stage_memory: the largest block's backward working set per stage, and the loss logits copy
    work_st = np.zeros((pp, G))
    for st_, sigs in enumerate(k["sigs"]):
        for sig in sigs:
            full = np.stack([lv["act"][si, 0] for si, _ in sig])
            kept = np.stack([lv["act"][si, pi] for si, pi in sig])
            work_st[st_] = np.maximum(work_st[st_], memory.backward_working_bytes(full, kept))
    return dict(Fc=Fc, Bc=Bc, par_st=par_st, froz_st=k["Fst"] @ lv["froz"], parx_st=k["Tst"] @ lv["parx"],
                work_st=work_st, logit_st=k["Lst"] @ lv["logit"], kvf_st=k["Kst"] @ lv["kvf"].reshape(S * 3, G),
                kva_st=k["Lst"] @ lv["kv"],
                # estimate._stage_memory: the largest ring forward buffers of a layer on the stage
                ring_st=np.max(np.where(k["Lst"][:, :, None] > 0, lv["ring"][None, :, :], 0.0), axis=1),
                act_st=k["Kst"] @ lv["act"].reshape(S * 3, G), worst=worst, params_dev=par_st[worst, cols],
                last_bwd=Bw, busy_worst=Fw + Bw, fm=k["Kall"] @ lv["fmodel"],
                fh=k["Ktot"] @ lv["fhw"].reshape(S * 3, G))


def _dp_collective_sums(ctx: CostContext, cnt_worst: np.ndarray, pp: int, n_dev: int, w_bytes: int, g_bytes: int):
    """(all-reduce, reduce-scatter, all-gather) seconds per column of the worst stage's layers
    (step_terms.layer_sync_sums_s, as estimate._sync_s reads them): gradients over the dp x cp ranks
    with stride tp (dp x cp = n / (tp pp), so the count group and column fix it); with ep*etp != tp the routed
    experts over their EDP = n / (pp ep etp) ranks ep*etp apart. cnt_worst: (shapes, columns) layer counts."""
    cluster, lv, tuples = ctx.cluster, ctx.lv, ctx.tuples
    G = len(tuples)
    tp_c, ep_c, etp_c = tuples[:, 1], tuples[:, 5], tuples[:, 6]
    ar, rs, ag = np.zeros(G), np.zeros(G), np.zeros(G)
    for t in np.unique(tp_c).tolist():
        dp = n_dev // (t * pp)
        if dp <= 1:
            continue
        mk = tp_c == t
        link = strided_link(cluster, 0, t, dp)
        ar[mk], rs[mk], ag[mk] = layer_sync_sums_s(lv["par"][:, mk], g_bytes, w_bytes, link, cnt_worst[:, mk])
    for t, x, y in {(int(a), int(b), int(c)) for a, b, c in zip(tp_c, ep_c, etp_c) if b * c != a}:
        mk = (tp_c == t) & (ep_c == x) & (etp_c == y)
        dp = n_dev // (t * pp)
        edp = n_dev // (pp * x * y)
        px, cw = lv["parx"][:, mk], cnt_worst[:, mk]
        ar[mk] = rs[mk] = ag[mk] = 0.0  # columns whose degrees fit no plan of this pp keep 0
        if dp > 1:
            link = strided_link(cluster, 0, t, dp)
            ar[mk], rs[mk], ag[mk] = layer_sync_sums_s(lv["par"][:, mk] - px, g_bytes, w_bytes, link, cw)
        if edp > 1 and n_dev % (pp * x * y) == 0:
            link = strided_link(cluster, 0, x * y, edp)
            routed = layer_sync_sums_s(px, g_bytes, w_bytes, link, cw)
            ar[mk] += routed[0]
            rs[mk] += routed[1]
            ag[mk] += routed[2]
    return ar, rs, ag


def _p2p_column_s(ctx: CostContext, pp: int, n_dev: int, e: int, s: int) -> np.ndarray:
    """links.pipeline_p2p_s per column, the same function the scalar estimate calls, on one work item's
    activations (s / seq_chunks tokens, 1/tp of them with sequence parallel); columns whose tp * cp does not
    fit this pp on the cluster belong to no plan: nan. 0 without a pipeline."""
    cluster, tuples = ctx.cluster, ctx.tuples
    p2p = np.zeros(len(tuples))
    if pp == 1:
        return p2p
    tp_c, cp_c = tuples[:, 1], tuples[:, 2]
    ok = n_dev % (tp_c * cp_c * pp) == 0
    ss = tp_c * cp_c * (n_dev // (tp_c * cp_c * pp))  # stage_size = tp * cp * dp
    p2p[~ok] = np.nan
    hidden = ctx.model.layers[0].hidden
    for x in np.unique(ss[ok]).tolist():
        mk = ok & (ss == x)
        b, cp, tp = tuples[mk, 0].astype(float), cp_c[mk].astype(float), tp_c[mk].astype(float)
        nbytes = b * (s // tuples[mk, 10]) / cp * hidden * e / np.where(tuples[mk, 3] > 0, tp, 1)
        nbytes = compressed_p2p_bytes(nbytes, tuples[mk, TUPLE.index("act_comp")].view(np.float64))
        p2p[mk] = pipeline_p2p_s(cluster, pp, x, nbytes, p2p=cached_p2p(cluster))
    return p2p


PER_COLUMN = ("params_dev", "last_bwd", "busy_worst", "fm", "fh", "ar", "rs", "ag", "p2p")
