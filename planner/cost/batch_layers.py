"""Per-layer values of estimate_batch over distinct layer tuples, and the cluster link lookups they read.

_layer_values evaluates layer_terms (time, FLOPs: the same code estimate._layer_step runs on one plan) on
columns of distinct layer tuples, with the activation sum of estimate._memory and the parameter counts: the
one place estimate_batch evaluates compute.py / comm.py per layer. The links come from cost/links.py, the
one link cache (carried by the cluster), as estimate()'s do.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from planner.core.hardware import Cluster
from planner.cost import longctx
from planner.cost.batch_plans import POLICIES
from planner.cost.layer_terms import LayerRows, pass_terms, policy_terms
from planner.cost.links import strided_link


class _ClusterLinks:
    """layer_terms.LinkSet for rows of layer tuples on one cluster: each row's groups are stage 0's of
    RankLayout.strided, as estimate() links them: tp (first 0, stride 1, tp), cp (0, tp, cp), ep (0, etp, ep);
    no attention pool (plans with one take the scalar path, batch.py)."""

    def __init__(self, cluster: Cluster, tp: np.ndarray, cp: np.ndarray, etp: np.ndarray, ep: int):
        self.cluster, self.ep = cluster, ep
        # per role: the row columns that pick the group, and the group's (first, stride, size) from them
        self.keys = {"tp": ((tp,), lambda t: (0, 1, t)), "cp": ((tp, cp), lambda t, c: (0, t, c)),
                     "ep": ((etp,), lambda t: (0, t, ep))}

    def has(self, role: str) -> bool:
        return role in ("tp", "cp") or (role == "ep" and self.ep > 1)

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


def _layer_values(shapes, tuples, cluster, dev, dtype, e, e_act, e_w, seq_len, routing=(1.0, None)):
    """Per distinct shape (rows) and policy, with arrays over the distinct layer tuples (columns):
    forward and backward time of one micro-batch, model and hardware FLOPs, activation bytes; and
    trainable / frozen parameters per device (layer_terms; the activation sum of estimate._memory, and the
    params_per_device calls of estimate.estimate and estimate._memory).

    Tuple columns: mbs, tp, cp, sp, flash, ep, etp, overlap_tp, cp_a2a, tp_slice, seq_chunks, deepep. sp,
    flash, ep and the kinds select branches, so the tuples are evaluated per distinct value of those, with
    arrays over (mbs, tp, cp, etp, seq_chunks)."""
    nu, ns = len(tuples), len(shapes)
    out = {k: np.zeros((ns, 3, nu)) for k in ("fwd", "bwd", "fhw", "act", "kvf")}
    for k in ("fmodel", "par", "froz", "parx", "logit", "kv", "ring"):
        out[k] = np.zeros((ns, nu))
    sub_keys = tuples[:, [3, 4, 5, 7, 8, 9, 11]]
    for key in np.unique(sub_keys, axis=0):
        idx = np.flatnonzero(np.all(sub_keys == key, axis=1))
        sp, flash, ep, tp_overlap, a2a, tp_slice, deepep = (bool(key[0]), bool(key[1]), int(key[2]), bool(key[3]),
                                                           bool(key[4]), bool(key[5]), bool(key[6]))
        tpi, cpi, etpi, nck = tuples[idx, 1], tuples[idx, 2], tuples[idx, 6], tuples[idx, 10]
        # estimate.estimate: every term is one work item's, a chunk of s/n tokens (ParallelPlan.seq_chunks)
        rows = LayerRows(b=tuples[idx, 0].astype(float), s=seq_len // nck, tp=tpi.astype(float),
                         cp=cpi.astype(float), etp=etpi.astype(float), seq_chunks=nck, dev=dev, dtype=dtype, e=e,
                         e_act=e_act, sp=sp, flash=flash, ep=ep, overlap_tp=tp_overlap, cp_a2a=a2a,
                         tp_slice=tp_slice, deepep=deepep, moe_routing=routing)
        links = _ClusterLinks(cluster, tpi, cpi, etpi, ep)
        for si, layer in enumerate(shapes):
            _shape_values(out, si, idx, layer, rows, links, seq_len, e_w)
    return out


def _shape_values(out: dict, si: int, idx: np.ndarray, layer, r: LayerRows, links: _ClusterLinks, seq_len: int,
                  e_w: int) -> None:
    """Fill the values of shape `si` on columns `idx` (rows `r`): layer_terms' times and FLOPs per policy,
    then what estimate._memory and estimate.estimate read of the layer."""
    n = len(idx)

    def arr(x):
        return np.broadcast_to(np.asarray(x, dtype=float), (n,))

    t = pass_terms(layer, r, links)
    out["fmodel"][si, idx] = (3 if layer.trainable else 1) * arr(t.lt.fwd_flops)
    for pi, policy in enumerate(POLICIES):
        p = policy_terms(layer, policy, r, t)
        out["fwd"][si, pi, idx] = p.fwd_s
        out["bwd"][si, pi, idx] = p.bwd_s
        out["fhw"][si, pi, idx] = p.flops_hw
        # --- the activation sum of estimate._memory ---
        out["act"][si, pi, idx] = layer.activation_bytes(r.b, r.s, r.tp, r.cp, t.sp, policy, r.e_act, flash=r.flash)
    b, s, tp, cp, nck = r.b, r.s, r.tp, r.cp, r.seq_chunks
    # --- estimate._memory: the loss's 16-bit logits copy (LM head only) ---
    out["logit"][si, idx] = layer.logits_transient_bytes(b, s, tp, cp, r.e_act)
    # --- estimate._memory: one chunk's K/V (longctx.seq_chunk_kv_bytes; kept in full when the policy
    # saves only the block input, the plans here offload nothing) ---
    kv_one = np.where(nck > 1, arr(longctx.chunk_kv_bytes(layer, b, s, tp, cp, r.e_act)), 0.0)
    out["kv"][si, idx] = kv_one
    out["kvf"][si, POLICIES.index("full"), idx] = kv_one
    # --- estimate._memory: the ring forward's retained step buffers (a chunk's pass: its prefix's K/V) ---
    if not r.cp_a2a:
        out["ring"][si, idx] = longctx.ring_forward_buffers_bytes(layer, b, s, seq_len, tp, cp, r.e_act)
    # --- params: estimate.estimate (stage_params) and estimate._memory (frozen) ---
    if layer.trainable:
        out["par"][si, idx] = layer.params_per_device(tp=tp, ep=r.ep, etp=r.etp)
        # estimate.estimate: stage_expert, the routed parameters per device
        out["parx"][si, idx] = float(layer.routed_params()) / (r.ep * r.etp)
    else:
        out["froz"][si, idx] = arr(layer.params_per_device(tp=tp)) * e_w
