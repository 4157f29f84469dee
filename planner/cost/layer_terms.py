"""The per-layer terms of one micro-batch's pass: compute, recompute, and the TP, CP, EP, attention-pool and
activation-offload traffic that runs inside it, under the host's dispatch floor.

One implementation for both callers: estimate() evaluates it on one plan's layer (every row value a Python
number) and estimate_batch on columns of distinct layer tuples (every row value a
numpy array of one length, batch_layers.layer_values). Values that choose a branch (sequence parallel, flash
attention, ep, the cp and dispatch kinds) are shared by all rows; `LinkSet` gives the link a row's group uses.
Terms that do not depend on the recompute policy (`pass_terms`) are computed once per layer and rows, the
rest (`policy_terms`) once per policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from planner.core.errors import Infeasible
from planner.core.model import Layer
from planner.cost import attention_balance as ab
from planner.cost import comm, longctx, moe
from planner.cost.compute import (
    ATTENTION_BWD_FACTOR,
    LayerTime,
    chunk_attention_factor,
    floored,
    layer_time,
    recompute_time_s,
)

# Megatron's default: the gradient reduction is not overlapped with backward (overlap_grad_reduce=False,
# docs/formulas.md#comm-overlap); FSDP2 overlaps by default. When overlapped, the last bucket stays exposed.
EXPOSED_TAIL_FRACTION = 0.1

# layer kinds whose sublayers end in a TP all-reduce (or AG + RS under SP)
_TP_KINDS = ("attention", "mlp", "moe", "encoder")


# The records below are built on every scalar layer step: slotted, not frozen, since a frozen dataclass's
# __init__ costs as much as the arithmetic there. Treat them as read-only.
@dataclass(slots=True)
class LayerRows:
    """The layer tuples the terms are evaluated on. b (micro-batch), s (tokens per sequence chunk), tp, cp,
    etp (resolved: plan.etp or tp) and seq_chunks: Python numbers (one plan) or arrays of one length (rows);
    the other fields are shared by every row. e: bytes per communicated element, e_act: per activation."""
    b: object
    s: object
    tp: object
    cp: object
    etp: object
    seq_chunks: object
    dev: object
    dtype: str
    e: int
    e_act: int
    sp: bool
    flash: bool
    ep: int
    overlap_tp: bool
    cp_a2a: bool
    tp_slice: bool
    deepep: bool
    moe_routing: tuple = (1.0, None)  # (workload.moe_imbalance, workload.moe_capacity_factor)
    offload_activations: float = 0.0  # plan.offload.activations
    host_bytes_per_s: float | None = None
    attention_pool: bool = False
    attention_scale: float = 1.0  # attention_balance.AttentionFactors: time of the core, slowest replica
    attention_flops_scale: float = 1.0  # and its work, mean replica


class LinkSet(Protocol):
    """The links of the rows' groups: role 'tp', 'cp', 'ep' or 'pool' (the DistCA pool over every device)."""

    def has(self, role: str) -> bool: ...

    def each(self, role: str, on, time_s: Callable) -> object:
        """time_s(link, sel) on the rows where `on` holds, grouped by their link of `role`; 0 elsewhere.
        sel selects those rows of a row array (`at`), None when the rows are one plan."""


@dataclass(slots=True)
class StageLinks:
    """One plan's stage: the links estimate() built for it (ep None without expert parallelism, pool None
    without the attention pool)."""
    tp: object
    cp: object
    ep: object = None
    pool: object = None

    def has(self, role: str) -> bool:
        return getattr(self, role) is not None

    def each(self, role: str, on, time_s: Callable):
        return float(time_s(getattr(self, role), None)) if on else 0.0


def at(x, sel):
    """x on the selected rows: x itself when it is one value or sel is None (one plan)."""
    return x if sel is None or not isinstance(x, np.ndarray) or x.ndim == 0 else x[sel]


def _where(on, x, other=0.0):
    """np.where for rows, a plain branch for one plan (Python floats stay floats there)."""
    if type(on) is bool:
        return x if on else other
    return np.where(on, x, other)


def _positive(x):
    """max(0, x) for rows or one plan's number (numpy's ufunc costs a microsecond on a number)."""
    return np.maximum(0.0, x) if isinstance(x, np.ndarray) else max(0.0, x)


@dataclass(slots=True)
class PassTerms:
    """What a layer's pass costs whatever the recompute policy (seconds per micro-batch, per row)."""
    lt: LayerTime
    sp: bool  # sequence parallel for this layer (moe.layer_sp)
    fwd_flops: object
    tp_on: object  # the layer sends TP traffic
    tp_one_s: object  # one TP all-reduce of the layer's output (0 where tp_on is false)
    cp_fwd_s: object
    cp_bwd_s: object
    ep_s: object  # dispatch + combine, forward and backward
    pool_fwd_s: object
    pool_bwd_s: object


@dataclass(slots=True)
class PolicyTerms:
    """A layer's pass under one recompute policy: the floored pass times, their parts, and FLOPs."""
    fwd_s: object
    bwd_s: object
    recompute_s: object
    tp_s: object
    offload_fwd_s: object
    offload_bwd_s: object
    flops_model: object
    flops_hw: object


def overlapped_tp_s(tp_s, lt, rc):
    """What stays exposed of a layer's TP traffic when it is chunked under the GEMMs that produce or consume
    it (Wang et al. 2023, "Overlap communication with dependent computation", ASPLOS; Megatron's
    --tp-comm-overlap): the part the layer's GEMMs cannot cover -- all of its passes except the attention
    core, which has no TP traffic beside it -- and never less than a tail, the first and last chunk."""
    hideable = lt.fwd_s + lt.bwd_s + rc - (1 + ATTENTION_BWD_FACTOR) * lt.attention_fwd_s
    return np.maximum(tp_s - hideable, EXPOSED_TAIL_FRACTION * tp_s)


def pass_terms(layer: Layer, r: LayerRows, links: LinkSet) -> PassTerms:
    """The policy-free terms of `layer` on rows `r`: compute (compute.layer_time), then the traffic."""
    sp = moe.layer_sp(layer.kind, r.sp, r.tp_slice)  # tp_slice runs the MoE layer without SP's split
    load = 1.0
    if layer.kind == "moe":  # the busiest expert-parallel rank sets the layer's time (planner/cost/moe.py)
        load = moe.rank_load_factor(r.moe_routing[0], r.moe_routing[1], max(1, layer.experts // r.ep))
    lt = layer_time(layer, r.b, r.s, r.dev, r.dtype, tp=r.tp, cp=r.cp, sp=sp, ep=r.ep, flash=r.flash,
                    etp=r.etp, expert_load=load, seq_chunks=r.seq_chunks, attention_scale=r.attention_scale)
    fwd_flops = lt.fwd_flops
    if r.attention_flops_scale != 1.0 and layer.fixed_tokens is None:
        # documents: the core does the mean replica's sum l^2 / 2, not s^2 / 2 (attention_balance)
        fwd_flops = fwd_flops + (r.attention_flops_scale - 1.0) * layer.attention_core_flops(r.b, r.s, r.tp, r.cp)
    tp_on, tp_one = _tp_all_reduce_s(layer, r, links, sp)
    cp_f, cp_b = _cp_s(layer, r, links, lt)
    pool_f, pool_b = _pool_s(layer, r, links, lt)
    return PassTerms(lt=lt, sp=sp, fwd_flops=fwd_flops, tp_on=tp_on, tp_one_s=tp_one, cp_fwd_s=cp_f,
                     cp_bwd_s=cp_b, ep_s=_ep_s(layer, r, links, load), pool_fwd_s=pool_f, pool_bwd_s=pool_b)


def _tp_all_reduce_s(layer: Layer, r: LayerRows, links: LinkSet, sp: bool):
    """Whether the layer sends TP traffic, and one all-reduce of its output (Megatron: one per sublayer
    forward, one backward, one more when the forward is recomputed; Narayanan 2021 section 3.2)."""
    if layer.kind not in _TP_KINDS:
        return False, 0.0
    on = r.tp > 1
    if layer.kind == "moe" and sp and not layer.shared_experts:
        # MoE Parallel Folding (Liu et al. 2025): with etp = 1 and SP the routed experts take their tokens
        # through the expert all-to-all alone. Under tp_slice (sp off for the layer) the experts' partial
        # outputs need the TP all-reduce (Chen et al. 2023 section 3): not folded.
        on = on & (r.etp != 1)
    if on is False:  # one plan without TP traffic
        return False, 0.0
    nbytes = layer.tokens(r.b, r.s) / r.cp * layer.hidden * r.e
    return on, links.each("tp", on, lambda link, sel: comm.all_reduce_time_s(at(nbytes, sel), link))


def _cp_s(layer: Layer, r: LayerRows, links: LinkSet, lt: LayerTime):
    """Exposed context-parallel traffic of an attention layer, forward and backward."""
    if layer.kind != "attention":
        return 0.0, 0.0
    on = r.cp > 1
    if on is False:  # one plan without context parallelism
        return 0.0, 0.0
    if r.cp_a2a:
        # Ulysses: all-to-alls before and after the core in each pass, not overlapped (Jacobs et al. 2023
        # section 3.2); the core then runs on heads/cp heads of the whole sequence, causally balanced.
        width = layer.head_dim or (layer.mla.qk_nope_head_dim + layer.mla.qk_rope_head_dim if layer.mla else 0)
        nbytes = longctx.ulysses_a2a_bytes(r.b, r.s, layer.heads, layer.kv_heads or layer.heads, width, r.cp,
                                           r.tp, r.e)
        one = links.each("cp", on, lambda link, sel: comm.all_to_all_time_s(
            at(nbytes, sel), link, inter_node_bytes_per_s=link.rank_inter_bytes_per_s))
        return one, one
    # Ring attention passes K/V blocks around the cp ring while computing; what does not hide behind the
    # attention core of the same pass stays exposed (Liu et al. 2023, section 3). A third of the traffic is
    # the forward's, two thirds the backward's (K/V again, and dK/dV). A chunk's pass carries its prefix's
    # K/V too (longctx.ring_chunk_factor, 1 unchunked).
    kv = comm.cp_kv_bytes_per_layer(r.b, r.s, layer.kv_heads, layer.head_dim, r.cp, r.e)
    if isinstance(r.seq_chunks, np.ndarray) or r.seq_chunks > 1:
        kv = kv * longctx.ring_chunk_factor(r.seq_chunks)
    ring = links.each("cp", on, lambda link, sel: comm.p2p_time_s(at(kv, sel), link.bus_bytes_per_s,
                                                                 link.latency_s))
    attn = lt.attention_fwd_s
    return (_where(on, _positive(ring / 3 - attn)),
            _where(on, _positive(2 * ring / 3 - ATTENTION_BWD_FACTOR * attn)))


def _ep_s(layer: Layer, r: LayerRows, links: LinkSet, load):
    """Expert dispatch and combine, forward and backward (Megatron MoE README), for the busiest rank, which
    receives `load` times the balanced share (moe.rank_load_factor). tp_slice: tokens reach the experts by
    index slicing, no all-to-all (Pipeline MoE section 3)."""
    if layer.kind != "moe" or r.tp_slice or not links.has("ep"):
        return 0.0
    tokens = layer.tokens(r.b, r.s) / r.cp / (r.tp if r.sp else 1)
    nbytes = tokens * layer.topk * layer.hidden * r.e * load
    if r.deepep:  # once per destination node, not per expert (comm)
        def one(link, sel):
            return comm.deduplicated_dispatch_time_s(
                at(nbytes, sel) / layer.topk, layer.topk, link, inter_node_bytes_per_s=link.rank_inter_bytes_per_s,
                groups=layer.route_groups, topk_groups=layer.route_topk_groups)
    else:
        def one(link, sel):
            return comm.all_to_all_time_s(at(nbytes, sel), link, inter_node_bytes_per_s=link.rank_inter_bytes_per_s)
    return 4 * links.each("ep", True, one)


def _pool_s(layer: Layer, r: LayerRows, links: LinkSet, lt: LayerTime):
    """DistCA (arXiv 2510.18121): the core's Q, K, V go to the attention pool and its output comes back in
    forward, the gradients of the same tensors in backward, an all-to-all over every device; what the layer's
    own projections and norms cannot cover stays exposed (Δ: DistCA's ping-pong also hides it under the MLP
    of another nano-batch, so this is an upper bound)."""
    if not (r.attention_pool and layer.kind == "attention" and layer.trainable and links.has("pool")):
        return 0.0, 0.0
    nbytes = layer.tokens(r.b, r.s) / r.cp * ab.pool_width(layer) / r.tp * r.e
    one = links.each("pool", True, lambda link, sel: comm.all_to_all_time_s(
        at(nbytes, sel), link, inter_node_bytes_per_s=link.rank_inter_bytes_per_s))
    return (_positive(one - (lt.fwd_s - lt.attention_fwd_s)),
            _positive(one - (lt.bwd_s - ATTENTION_BWD_FACTOR * lt.attention_fwd_s)))


def _offload_s(layer: Layer, policy: str, r: LayerRows, t: PassTerms, rc):
    """Activation offload: the layer's saved tensors go to the host during its forward and come back for its
    backward over the host link, beside the pass's compute (SPPO; docs/formulas.md#memory-offload, Δ)."""
    if not (r.offload_activations > 0 and layer.trainable):
        return 0.0, 0.0
    if r.host_bytes_per_s is None:
        raise Infeasible("activation offload needs a host_link on the node type; this cluster has none")
    act = r.offload_activations * layer.activation_bytes(r.b, r.s, r.tp, r.cp, t.sp, policy, r.e_act,
                                                         flash=r.flash)
    return (longctx.offload_exposed_s(act, r.host_bytes_per_s, t.lt.fwd_s),
            longctx.offload_exposed_s(act, r.host_bytes_per_s, t.lt.bwd_s + rc))


def policy_terms(layer: Layer, policy: str, r: LayerRows, t: PassTerms) -> PolicyTerms:
    """The pass of `layer` under recompute `policy`: compute plus the traffic of `t`, under the host floor."""
    lt = t.lt
    rc = recompute_time_s(lt, layer, policy)
    full = policy == "full" and layer.trainable
    tp_s = t.tp_one_s * (2 + (1 if full else 0))  # the recomputed forward sends its all-reduce again
    if r.overlap_tp:
        tp_s = _where(t.tp_on, overlapped_tp_s(tp_s, lt, rc), tp_s)
    off_f, off_b = _offload_s(layer, policy, r, t, rc)
    host_b = 2 * lt.host_fwd_s + (lt.host_fwd_s if full else 0.0)
    fwd = floored(lt.fwd_s + (tp_s + t.ep_s) / 2 + t.cp_fwd_s + off_f + t.pool_fwd_s, lt.host_fwd_s)
    bwd = lt.bwd_s
    if layer.trainable:
        bwd = floored(lt.bwd_s + rc + (tp_s + t.ep_s) / 2 + t.cp_bwd_s + off_b + t.pool_bwd_s, host_b)
    mult = 3 if layer.trainable else 1  # forward, and backward's two GEMMs per forward one
    recompute_flops = t.fwd_flops if full else 0.0
    if policy == "selective" and layer.trainable:  # the attention core again (Korthikanti 2022 section 5)
        recompute_flops = (layer.attention_core_flops(r.b, r.s, r.tp, r.cp)
                           * chunk_attention_factor(layer, r.seq_chunks)
                           * (r.attention_flops_scale if layer.fixed_tokens is None else 1.0))
    return PolicyTerms(fwd_s=fwd, bwd_s=bwd, recompute_s=rc, tp_s=tp_s, offload_fwd_s=off_f, offload_bwd_s=off_b,
                       flops_model=mult * t.fwd_flops, flops_hw=mult * t.fwd_flops + recompute_flops)
