"""Per-layer values of estimate_batch over distinct layer tuples, and the cluster link lookups they read.

_layer_values mirrors estimate._layer_step (time, FLOPs), the activation sum of estimate._memory and the
parameter counts, with arrays over the distinct layer tuples: the one place estimate_batch evaluates
compute.py / comm.py per layer. The link caches (_collective, _p2p) live here as the first thing these
values need; the count-group sums (batch_context.py) read them too.
"""
from __future__ import annotations

import numpy as np

from planner.cost import comm, longctx, moe
from planner.cost.batch_plans import POLICIES
from planner.cost.compute import ATTENTION_BWD_FACTOR, chunk_attention_factor, floored, layer_time, recompute_time_s
from planner.cost.estimate import _group
from planner.cost.estimate_layer import _overlapped_tp_s
from planner.cost.estimate_structure import _cache_for
from planner.core.hardware import Cluster


_LINKS: dict[int, tuple[Cluster, dict]] = {}


def _links(cluster: Cluster) -> dict:
    return _cache_for(_LINKS, cluster)


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
    sub_keys = tuples[:, [3, 4, 5, 7, 8, 9, 11]]
    for key in np.unique(sub_keys, axis=0):
        idx = np.flatnonzero(np.all(sub_keys == key, axis=1))
        sp, flash, ep, tp_overlap, a2a = bool(key[0]), bool(key[1]), int(key[2]), bool(key[3]), bool(key[4])
        tp_slice, deepep = bool(key[5]), bool(key[6])
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
                    if deepep:  # estimate._layer_step: once per destination node
                        ep_s[mk] = 4 * comm.deduplicated_dispatch_time_s(
                            nbytes[mk] / layer.topk, layer.topk, link,
                            inter_node_bytes_per_s=link.rank_inter_bytes_per_s,
                            groups=layer.route_groups, topk_groups=layer.route_topk_groups)
                    else:
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
