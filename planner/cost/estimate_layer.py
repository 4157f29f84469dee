"""One layer's forward and backward pass for one micro-batch (_layer_step), with the context it reads (_Ctx)
and the per-cluster cache of those steps (_steps).

Separate from planner/cost/estimate.py, which assembles these per-layer steps into chunks, stages, the
pipeline and the step. The terms themselves (compute, recompute, the TP, CP, EP, offload and attention-pool
traffic inside a pass) are planner/cost/layer_terms.py's, the same code estimate_batch runs on columns; this
module evaluates them on one plan's row and caches them per layer shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.core.model import Layer
from planner.core.plan import ParallelPlan
from planner.cost.estimate_structure import _BY_CLUSTER, _cache_for, _Structure

# estimate.py reads EXPOSED_TAIL_FRACTION and _overlapped_tp_s from here
from planner.cost.layer_terms import (
    EXPOSED_TAIL_FRACTION,  # noqa: F401
    LayerRows,
    StageLinks,
    pass_terms,
    policy_terms,
)
from planner.cost.layer_terms import overlapped_tp_s as _overlapped_tp_s  # noqa: F401


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


# _steps evaluates every layer of a stage on one context: the last context (held, so its id stays its own),
# its rows and links, replaced as one tuple so that a reader never sees a mix of two contexts
_LAST_ROWS: tuple = (None, None, None)


def _rows(c: _Ctx) -> tuple[LayerRows, StageLinks]:
    """The one layer tuple of this plan's stage and its links, as layer_terms reads them."""
    global _LAST_ROWS
    last = _LAST_ROWS
    if last[0] is c:
        return last[1], last[2]
    plan = c.plan
    rows = LayerRows(b=c.b, s=c.s, tp=c.tp, cp=c.cp, etp=plan.etp or c.tp, seq_chunks=c.seq_chunks, dev=c.dev,
                     dtype=c.dtype, e=c.e, e_act=c.e_act, sp=plan.sp, flash=plan.flash_attention, ep=plan.ep,
                     overlap_tp=plan.overlap_tp_comm, cp_a2a=plan.cp_comm == "a2a",
                     tp_slice=plan.moe_dispatch == "tp_slice", deepep=plan.moe_dispatch == "deepep",
                     moe_routing=c.moe_routing, offload_activations=plan.offload.activations,
                     host_bytes_per_s=c.host_bytes_per_s, attention_pool=plan.attention_pool,
                     attention_scale=c.attention_scale, attention_flops_scale=c.attention_flops_scale)
    links = StageLinks(tp=c.tp_link, cp=c.cp_link, ep=c.ep_link, pool=c.pool_link)
    _LAST_ROWS = (c, rows, links)
    return rows, links


def _layer_step(layer: Layer, policy: str, c: _Ctx) -> _LayerStep:
    """One layer's forward and backward pass for one micro-batch (layer_terms on this plan's one row)."""
    rows, links = _rows(c)
    t = pass_terms(layer, rows, links)
    p = policy_terms(layer, policy, rows, t)
    parts = {"compute_s": float(t.lt.fwd_s + t.lt.bwd_s), "recompute_s": float(p.recompute_s),
             "tp_comm_s": float(p.tp_s), "cp_comm_s": float(t.cp_fwd_s + t.cp_bwd_s), "ep_comm_s": float(t.ep_s),
             "act_offload_s": float(p.offload_fwd_s + p.offload_bwd_s),
             "attn_pool_s": float(t.pool_fwd_s + t.pool_bwd_s)}
    return _LayerStep(fwd_s=float(p.fwd_s), bwd_s=float(p.bwd_s), parts=parts, flops_model=float(p.flops_model),
                      flops_hw=float(p.flops_hw))


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
