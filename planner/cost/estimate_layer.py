"""One layer's forward and backward pass for one micro-batch (_layer_step), with the context it reads (_Ctx)
and the per-cluster cache of those steps (_steps).

Separate from planner/cost/estimate.py, which assembles these per-layer steps into chunks, stages, the
pipeline and the step: this is where compute, recompute and the TP, CP, EP, offload and attention-pool
traffic inside a pass meet.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost import attention_balance as ab
from planner.cost import comm, longctx, moe
from planner.cost.compute import ATTENTION_BWD_FACTOR, chunk_attention_factor, floored, layer_time, recompute_time_s
from planner.cost.estimate_structure import _BY_CLUSTER, _cache_for, _Structure
from planner.core.errors import Infeasible
from planner.core.model import Layer
from planner.core.plan import ParallelPlan

# Megatron's default: the gradient reduction is not overlapped with backward (overlap_grad_reduce=False,
# reference formulas.md 4.4); FSDP2 overlaps by default. When overlapped, the last bucket stays exposed.
EXPOSED_TAIL_FRACTION = 0.1


@dataclass(frozen=True)
class _Ctx:
    b: int
    s: int
    tp: int
    cp: int
    e: int
    dev: object
    dtype: str
    plan: ParallelPlan
    tp_link: object
    cp_link: object
    ep_link: object
    # MoE routing (workload.moe_imbalance, workload.moe_capacity_factor), host link bytes/s for activation
    # offload, activation bytes per element: defaults keep a context built without them balanced and
    # offload-free.
    moe_routing: tuple = (1.0, None)
    host_bytes_per_s: float | None = None
    e_act: int = 2
    seq_chunks: int = 1  # s is one sequence chunk's tokens when > 1 (ParallelPlan.seq_chunks)
    # Workload.documents: the attention core's time (slowest replica, or pooled) and work (mean) over one causal
    # document per sequence (attention_balance.AttentionFactors); the link of the DistCA pool (all devices)
    attention_scale: float = 1.0
    attention_flops_scale: float = 1.0
    pool_link: object = None


@dataclass(frozen=True)
class _LayerStep:
    fwd_s: float
    bwd_s: float
    parts: dict
    flops_model: float
    flops_hw: float


def _overlapped_tp_s(tp_s, lt, rc):
    """What stays exposed of a layer's TP traffic when it is chunked under the GEMMs that produce or consume
    it (Wang et al. 2023, "Overlap communication with dependent computation", ASPLOS; Megatron's
    --tp-comm-overlap): the part the layer's GEMMs cannot cover -- all of its passes except the attention
    core, which has no TP traffic beside it -- and never less than a tail, the first and last chunk."""
    hideable = lt.fwd_s + lt.bwd_s + rc - (1 + ATTENTION_BWD_FACTOR) * lt.attention_fwd_s
    return np.maximum(tp_s - hideable, EXPOSED_TAIL_FRACTION * tp_s)


def _layer_step(layer: Layer, policy: str, c: _Ctx) -> _LayerStep:
    """One layer's forward and backward pass for one micro-batch: compute, recompute, and the TP, CP
    and EP communication that runs inside the pass, under the host's dispatch floor."""
    b, s, tp, cp, e, plan = c.b, c.s, c.tp, c.cp, c.e, c.plan
    etp = plan.etp or tp
    # Pipeline MoE (moe_dispatch 'tp_slice'): the MoE layer reads the replicated input, without SP's split
    tp_slice = plan.moe_dispatch == "tp_slice"
    sp = moe.layer_sp(layer.kind, plan.sp, tp_slice)
    load = 1.0
    if layer.kind == "moe":
        # the busiest expert-parallel rank sets the layer's time (planner/cost/moe.py)
        load = moe.rank_load_factor(c.moe_routing[0], c.moe_routing[1], max(1, layer.experts // plan.ep))
    lt = layer_time(layer, b, s, c.dev, c.dtype, tp=tp, cp=cp, sp=sp, ep=plan.ep,
                    flash=plan.flash_attention, etp=etp, expert_load=load, seq_chunks=c.seq_chunks,
                    attention_scale=c.attention_scale)
    rc = recompute_time_s(lt, layer, policy)
    tp_s = ep_s = cp_f = cp_b = off_f = off_b = pool_f = pool_b = 0.0
    fwd_flops = lt.fwd_flops
    if c.attention_flops_scale != 1.0 and layer.fixed_tokens is None:
        # documents: the core does the mean replica's sum l^2 / 2, not s^2 / 2 (attention_balance)
        fwd_flops = fwd_flops + (c.attention_flops_scale - 1.0) * layer.attention_core_flops(b, s, tp, cp)
    if plan.attention_pool and layer.kind == "attention" and layer.trainable and c.pool_link is not None:
        # DistCA (arXiv 2510.18121): the core's Q, K, V go to the pool and its output comes back in forward, the
        # gradients of the same tensors in backward, an all-to-all over every device; what the layer's own
        # projections and norms cannot cover stays exposed (Δ: DistCA's ping-pong also hides it under the
        # MLP of another nano-batch, so this is an upper bound)
        nbytes = layer.tokens(b, s) / cp * ab.pool_width(layer) / tp * e
        one = float(comm.all_to_all_time_s(nbytes, c.pool_link,
                                           inter_node_bytes_per_s=c.pool_link.rank_inter_bytes_per_s))
        pool_f = max(0.0, one - float(lt.fwd_s - lt.attention_fwd_s))
        pool_b = max(0.0, one - float(lt.bwd_s - ATTENTION_BWD_FACTOR * lt.attention_fwd_s))
    # MoE Parallel Folding (Liu et al. 2025): with etp = 1 and sequence parallel, the routed experts take
    # their tokens through the expert all-to-all alone; only shared experts (tp-split) need the TP group.
    # Under tp_slice (sp off for the layer) the experts' partial outputs need the TP all-reduce: not folded.
    folded = layer.kind == "moe" and etp == 1 and sp and not layer.shared_experts
    if tp > 1 and layer.kind in ("attention", "mlp", "moe", "encoder") and not folded:
        # Megatron: one all-reduce (or AG + RS under SP) per sublayer forward, one backward, one more
        # when the forward is recomputed (Narayanan 2021 section 3.2; Korthikanti 2022 section 4.2.2).
        # tp_slice combines its experts' outputs with this same all-reduce (Chen et al. 2023 section 3).
        nbytes = layer.tokens(b, s) / cp * layer.hidden * e
        one = float(comm.all_reduce_time_s(nbytes, c.tp_link))
        tp_s = one * (2 + (1 if policy == "full" and layer.trainable else 0))
        if plan.overlap_tp_comm:
            tp_s = float(_overlapped_tp_s(tp_s, lt, rc))
    if cp > 1 and layer.kind == "attention" and plan.cp_comm == "a2a":
        # Ulysses: all-to-alls before and after the core in each pass, not overlapped (Jacobs et al. 2023
        # section 3.2); the core then runs on heads/cp heads of the whole sequence, causally balanced.
        width = layer.head_dim or (layer.mla.qk_nope_head_dim + layer.mla.qk_rope_head_dim if layer.mla else 0)
        nbytes = longctx.ulysses_a2a_bytes(b, s, layer.heads, layer.kv_heads or layer.heads, width, cp, tp, e)
        one = float(comm.all_to_all_time_s(nbytes, c.cp_link,
                                           inter_node_bytes_per_s=c.cp_link.rank_inter_bytes_per_s))
        cp_f, cp_b = one, one
    elif cp > 1 and layer.kind == "attention":
        # Ring attention passes K/V blocks around the cp ring while computing; what does not hide behind
        # the attention core of the same pass stays exposed (Liu et al. 2023, section 3). A third of
        # the traffic is the forward's, two thirds the backward's (K/V again, and dK/dV).
        kv = comm.cp_kv_bytes_per_layer(b, s, layer.kv_heads, layer.head_dim, cp, e)
        if c.seq_chunks > 1:  # a chunk's pass carries its prefix's K/V too (longctx.ring_chunk_factor)
            kv = kv * float(longctx.ring_chunk_factor(c.seq_chunks))
        ring = float(comm.p2p_time_s(kv, c.cp_link.bus_bytes_per_s, c.cp_link.latency_s))
        attn = float(lt.attention_fwd_s)
        cp_f = max(0.0, ring / 3 - attn)
        cp_b = max(0.0, 2 * ring / 3 - ATTENTION_BWD_FACTOR * attn)
    # tp_slice: tokens reach the experts by index slicing, no dispatch/combine all-to-all (Pipeline MoE
    # section 3); the TP all-reduce above is all the layer sends
    if c.ep_link is not None and layer.kind == "moe" and not tp_slice:
        tokens = layer.tokens(b, s) / cp / (tp if plan.sp else 1)
        # the busiest rank receives `load` times the balanced share (moe.rank_load_factor)
        nbytes = tokens * layer.topk * layer.hidden * e * load
        # dispatch + combine, forward and backward (Megatron MoE README)
        if plan.moe_dispatch == "deepep":  # once per destination node, not per expert (comm)
            ep_s = 4 * float(comm.deduplicated_dispatch_time_s(
                nbytes / layer.topk, layer.topk, c.ep_link, inter_node_bytes_per_s=c.ep_link.rank_inter_bytes_per_s,
                groups=layer.route_groups, topk_groups=layer.route_topk_groups))
        else:
            ep_s = 4 * float(comm.all_to_all_time_s(
                nbytes, c.ep_link, inter_node_bytes_per_s=c.ep_link.rank_inter_bytes_per_s))
    frac = plan.offload.activations
    if frac > 0 and layer.trainable:
        # Activation offload: the layer's saved tensors go to the host during its forward and come back
        # for its backward over the host link, beside the pass's compute (SPPO; formulas.md 2.4, Δ).
        if c.host_bytes_per_s is None:
            raise Infeasible("activation offload needs a host_link on the node type; this cluster has none")
        act = frac * float(layer.activation_bytes(b, s, tp, cp, sp, policy, c.e_act,
                                                  flash=plan.flash_attention))
        off_f = longctx.offload_exposed_s(act, c.host_bytes_per_s, float(lt.fwd_s))
        off_b = longctx.offload_exposed_s(act, c.host_bytes_per_s, float(lt.bwd_s + rc))
    host_b = 2 * lt.host_fwd_s + (lt.host_fwd_s if policy == "full" and layer.trainable else 0.0)
    fwd = float(floored(lt.fwd_s + (tp_s + ep_s) / 2 + cp_f + off_f + pool_f, lt.host_fwd_s))
    bwd = lt.bwd_s + rc + (tp_s + ep_s) / 2 + cp_b + off_b + pool_b
    bwd = float(floored(bwd, host_b)) if layer.trainable else float(lt.bwd_s)
    mult = 3 if layer.trainable else 1
    recompute_flops = fwd_flops if (policy == "full" and layer.trainable) else 0.0
    if policy == "selective" and layer.trainable:
        recompute_flops = (layer.attention_core_flops(b, s, tp, cp) * chunk_attention_factor(layer, c.seq_chunks)
                           * (c.attention_flops_scale if layer.fixed_tokens is None else 1.0))
    parts = {"compute_s": float(lt.fwd_s + lt.bwd_s), "recompute_s": float(rc), "tp_comm_s": tp_s,
             "cp_comm_s": cp_f + cp_b, "ep_comm_s": ep_s, "act_offload_s": off_f + off_b,
             "attn_pool_s": pool_f + pool_b}
    return _LayerStep(fwd_s=fwd, bwd_s=bwd, parts=parts, flops_model=float(mult * fwd_flops),
                      flops_hw=float(mult * fwd_flops + recompute_flops))


def _steps(model, cluster, st: _Structure, ctx: _Ctx, where: tuple = ()) -> list[_LayerStep]:
    """_layer_step of each of st.reps, cached per cluster by the representative layer (held in the entry,
    so its id stays its own) and every input _layer_step reads. `where`: the stage's devices and profile
    when they are not the cluster's first (heterogeneous layouts)."""
    cache = _cache_for(_BY_CLUSTER, cluster)
    plan = ctx.plan
    common = (ctx.b, ctx.s, ctx.tp, ctx.cp, ctx.e, ctx.dtype, plan.sp, plan.ep, plan.flash_attention,
              plan.overlap_tp_comm) + tuple(where) + (plan.etp, plan.cp_comm, plan.offload.activations, ctx.seq_chunks,
                                                     plan.attention_pool, ctx.attention_scale,
                                                     ctx.attention_flops_scale,
                                                     ctx.moe_routing, ctx.host_bytes_per_s, ctx.e_act,
                                                     plan.moe_dispatch)
    out = []
    for layer, policy in st.reps:
        key = ("step", id(layer), policy, common)
        hit = cache.get(key)
        if hit is None or hit[0] is not layer:
            if len(cache) > 200_000:
                cache.clear()
            hit = cache[key] = (layer, _layer_step(layer, policy, ctx))
        out.append(hit[1])
    return out
