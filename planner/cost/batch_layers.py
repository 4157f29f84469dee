"""Per-layer values over columns of distinct layer tuples: the layers phase of the estimate.

layer_values evaluates layer_terms (time, its parts, FLOPs) on columns of distinct layer tuples, with the
activation, K/V and ring-buffer bytes the memory phase sums and the parameter counts: the one place the
estimate evaluates compute.py / comm.py per layer, for one plan (estimate) or many (estimate_batch). The
links come from cost/links.py, the one link cache (carried by the cluster).

A layer tuple is everything a layer's terms depend on besides the model, cluster and workload (TUPLE). Its
columns are integers; the activation-offload fraction is carried as its float64 bits, exactly.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from planner.core.dims import RECOMPUTE_POLICIES as POLICIES
from planner.core.hardware import Cluster
from planner.cost import attention_balance as ab
from planner.cost import longctx
from planner.cost.layer_terms import LayerRows, pass_terms, policy_terms
from planner.cost.links import strided_link

# The columns of a layer tuple, in order. docs_dp: the plan's dp when the workload packs documents (the
# attention factors depend on it), else 0; offload_act: plan.offload.activations as float64 bits; act_comp:
# plan.act_compression as float64 bits (no layer term reads it: the pipeline p2p bytes of the column do).
TUPLE = ("mbs", "tp", "cp", "sp", "flash", "ep", "etp", "overlap_tp", "cp_a2a", "tp_slice", "seq_chunks", "deepep",
         "offload_act", "docs_dp", "pool", "act_comp")
_BRANCH = [TUPLE.index(k) for k in ("sp", "flash", "ep", "overlap_tp", "cp_a2a", "tp_slice", "deepep",
                                    "offload_act", "docs_dp", "pool")]
# the parts of a layer's pass the estimate's breakdown reports, per policy
PARTS = ("compute_s", "recompute_s", "tp_comm_s", "cp_comm_s", "ep_comm_s", "act_offload_s", "attn_pool_s")


def float_bits(x) -> np.ndarray:
    """float64 values as int64 bit patterns (exact, reversible: bits_float)."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float64)).view(np.int64)


def bits_float(x) -> float:
    return float(np.array([x], dtype=np.int64).view(np.float64)[0])


class ClusterLinks:
    """layer_terms.LinkSet for rows of layer tuples on one cluster whose rank r is device r: each row's
    groups are stage 0's of RankLayout.strided: tp (first 0, stride 1, tp), cp (0, tp, cp), ep (0, etp, ep);
    the attention pool spans every device."""

    def __init__(self, cluster: Cluster, tp: np.ndarray, cp: np.ndarray, etp: np.ndarray, ep: int, pool: bool):
        self.cluster, self.ep, self.pool = cluster, ep, pool
        # per role: the row columns that pick the group, and the group's (first, stride, size) from them
        self.keys = {"tp": ((tp,), lambda t: (0, 1, t)), "cp": ((tp, cp), lambda t, c: (0, t, c)),
                     "ep": ((etp,), lambda t: (0, t, ep)), "pool": ((tp,), lambda t: (0, 1, cluster.device_count))}

    def has(self, role: str) -> bool:
        return role in ("tp", "cp") or (role == "ep" and self.ep > 1) or (role == "pool" and self.pool)

    def each(self, role: str, on, time_s: Callable) -> np.ndarray:
        cols, group = self.keys[role]
        on = np.broadcast_to(on, cols[0].shape)
        out = np.zeros(cols[0].shape)
        for key in set(zip(*(c[on].tolist() for c in cols))):
            sel = on.copy()
            for c, v in zip(cols, key):
                sel &= c == v
            out[sel] = time_s(strided_link(self.cluster, *group(*key)), sel)
        return out


class FixedLinks:
    """layer_terms.LinkSet of one stage whose groups are fixed (a stage layout: planner/cost/stages.py):
    every row uses the same tp, cp, ep and pool links (None where the plan has no such group)."""

    def __init__(self, tp, cp, ep=None, pool=None):
        self.links = {"tp": tp, "cp": cp, "ep": ep, "pool": pool}

    def has(self, role: str) -> bool:
        return self.links[role] is not None

    def each(self, role: str, on, time_s: Callable):
        return np.where(on, time_s(self.links[role], None), 0.0)


def layer_values(shapes, tuples, cluster, dev, dtype, e, e_act, e_w, seq_len, routing=(1.0, None), host=None,
                  documents=None, links=None):
    """Per distinct shape (rows) and policy, with arrays over the distinct layer tuples (columns, TUPLE):
    forward and backward time of one work item and their PARTS, model and hardware FLOPs, activation bytes;
    trainable / frozen parameters per device.

    Branch-choosing columns (sp, flash, ep, the kinds, offload, documents, pool) are evaluated per distinct
    value, with arrays over (mbs, tp, cp, etp, seq_chunks). host: the host link's bytes/s (activation
    offload); documents: (global batch, Workload.documents) or None; links: a FixedLinks for a stage layout,
    None for the cluster's strided groups."""
    nu, ns = len(tuples), len(shapes)
    out = {k: np.zeros((ns, 3, nu)) for k in ("fwd", "bwd", "fhw", "act", "kvf")}
    out["parts"] = np.zeros((ns, 3, len(PARTS), nu))
    for k in ("fmodel", "par", "froz", "parx", "logit", "kv", "ring"):
        out[k] = np.zeros((ns, nu))
    sub_keys = tuples[:, _BRANCH]
    for key in np.unique(sub_keys, axis=0):
        idx = np.flatnonzero(np.all(sub_keys == key, axis=1))
        sp, flash, ep, tp_overlap, a2a, tp_slice, deepep, off, docs_dp, pool = key.tolist()
        tpi, cpi, etpi, nck = tuples[idx, 1], tuples[idx, 2], tuples[idx, 6], tuples[idx, 10]
        scale = flops_scale = 1.0
        if documents is not None and docs_dp:
            gbs, docs = documents
            f = ab.attention_factors(seq_len, gbs, docs_dp, docs.mean_tokens, docs.max_tokens, docs.seed)
            # every replica runs at the slowest replica's attention (they meet at the gradient reduction), or
            # at the pool's balanced share (DistCA); FLOPs count the work done
            scale, flops_scale = (f.pooled if pool else f.straggler), f.mean
        # every term is one work item's, a chunk of s/n tokens (ParallelPlan.seq_chunks)
        rows = LayerRows(b=tuples[idx, 0].astype(float), s=seq_len // nck, tp=tpi.astype(float),
                         cp=cpi.astype(float), etp=etpi.astype(float), seq_chunks=nck, dev=dev, dtype=dtype, e=e,
                         e_act=e_act, sp=bool(sp), flash=bool(flash), ep=int(ep), overlap_tp=bool(tp_overlap),
                         cp_a2a=bool(a2a), tp_slice=bool(tp_slice), deepep=bool(deepep), moe_routing=routing,
                         offload_activations=bits_float(off), host_bytes_per_s=host, attention_pool=bool(pool),
                         attention_scale=scale, attention_flops_scale=flops_scale)
        lk = links if links is not None else ClusterLinks(cluster, tpi, cpi, etpi, int(ep), bool(pool))
        for si, layer in enumerate(shapes):
            _shape_values(out, si, idx, layer, rows, lk, seq_len, e_w)
    return out


def _shape_values(out: dict, si: int, idx: np.ndarray, layer, r: LayerRows, links, seq_len: int, e_w: int) -> None:
    """Fill the values of shape `si` on columns `idx` (rows `r`): layer_terms' times, parts and FLOPs per
    policy, then the bytes and parameters the memory phase and the data-parallel sync read of the layer."""
    n = len(idx)

    def arr(x):
        return np.broadcast_to(np.asarray(x, dtype=float), (n,))

    t = pass_terms(layer, r, links)
    out["fmodel"][si, idx] = (3 if layer.trainable else 1) * arr(t.fwd_flops)
    policy_free = (arr(t.lt.fwd_s + t.lt.bwd_s), arr(t.cp_fwd_s + t.cp_bwd_s), arr(t.ep_s),
                   arr(t.pool_fwd_s + t.pool_bwd_s))
    for pi, policy in enumerate(POLICIES):
        p = policy_terms(layer, policy, r, t)
        out["fwd"][si, pi, idx] = p.fwd_s
        out["bwd"][si, pi, idx] = p.bwd_s
        out["fhw"][si, pi, idx] = p.flops_hw
        out["parts"][si, pi, :, idx] = np.stack([policy_free[0], arr(p.recompute_s), arr(p.tp_s), policy_free[1],
                                                 policy_free[2], arr(p.offload_fwd_s + p.offload_bwd_s),
                                                 policy_free[3]], axis=1)
        # what one work item keeps for the backward under the policy (memory.py)
        out["act"][si, pi, idx] = layer.activation_bytes(r.b, r.s, r.tp, r.cp, t.sp, policy, r.e_act, flash=r.flash)
    b, s, tp, cp, nck = r.b, r.s, r.tp, r.cp, r.seq_chunks
    # the loss's 16-bit logits copy (LM head only)
    out["logit"][si, idx] = layer.logits_transient_bytes(b, s, tp, cp, r.e_act)
    # one sequence chunk's K/V (longctx.chunk_kv_bytes), held by the saved activations unless the policy
    # keeps only the block input ("full")
    kv_one = np.where(nck > 1, arr(longctx.chunk_kv_bytes(layer, b, s, tp, cp, r.e_act)), 0.0)
    out["kv"][si, idx] = kv_one
    out["kvf"][si, POLICIES.index("full"), idx] = kv_one
    # the ring forward's retained step buffers (a chunk's pass: its prefix's K/V)
    if not r.cp_a2a:
        out["ring"][si, idx] = longctx.ring_forward_buffers_bytes(layer, b, s, seq_len, tp, cp, r.e_act)
    # parameters per device: trainable (and their routed-expert share), or frozen weights' bytes
    if layer.trainable:
        out["par"][si, idx] = layer.params_per_device(tp=tp, ep=r.ep, etp=r.etp)
        out["parx"][si, idx] = float(layer.routed_params()) / (r.ep * r.etp)
    else:
        out["froz"][si, idx] = arr(layer.params_per_device(tp=tp)) * e_w
