"""estimate(model, cluster, workload, plan) -> Estimate: one plan through the phases estimate_batch runs on
many, with the per-stage detail and the explanation only one plan needs.

The phases: checks -> setup (the plan's layer tuple, its column of the per-layer values, the chunk layout's
sums) -> chunk sums -> pipeline -> data-parallel sync -> optimizer -> memory -> outputs. The per-layer values
(batch_layers.py), the chunk and stage sums (batch_context.py, over chunks.layer_counts), the step terms
(step_terms.py) and memory (memory_phase.py) are the same functions, on the same cached columns, that
estimate_batch evaluates; what is this module's own is the per-stage detail (each chunk's time and parts, the
pipeline's timeline via pipeline.simulate_times, memory per stage and part) and the stage layout of a
cluster of several device types (planner/cost/stages.py), each stage on its own device and links. Device
ranks follow Megatron's order (tp fastest, then cp, then dp, then pp).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.core import dtypes
from planner.core.dims import RECOMPUTE_POLICIES, SCHEDULE_INDEX, SCHEDULE_RULES, WEIGHT_VERSIONS
from planner.core.errors import BadInput
from planner.core.hardware import Cluster
from planner.core.model import ModelGraph
from planner.core.plan import Estimate, ParallelPlan, Workload
from planner.cost import attention_balance as ab
from planner.cost import energy, frozen_fill, memory_phase, pipeline, why
from planner.cost.batch_context import STAGE_TABLES, cost_context, group_sums
from planner.cost.batch_layers import PARTS, FixedLinks, float_bits
from planner.cost.checks import check_plan
from planner.cost.chunks import layer_counts, partition_key, split_chunks  # noqa: F401  split_chunks: re-exported
from planner.cost.links import cached_p2p, group_link, stage_links, strided_link
from planner.cost.stages import boundary_p2p_s, stage_layout
from planner.cost.step_terms import (  # dp_sync_s: re-exported for planners/ilp.py
    compressed_p2p_bytes,
    dp_sync_s,  # noqa: F401
    exposed_sync_s,
    layer_sync_sums_s,
    low_bandwidth_exposed_s,
    offload_exposed_s,
    optimizer_step_s,
    pp_comm_s,
    pseudo_gradient_bytes_per_step,
    state_shards,
    step_time_s,
    tokens_per_s,
    utilisation,
    zero_sync_s,
)


def layer_tuple(plan: ParallelPlan, workload: Workload) -> np.ndarray:
    """The plan's layer tuple (batch_layers.TUPLE), one row."""
    etp = plan.etp or plan.tp
    return np.array([[plan.mbs, plan.tp, plan.cp, plan.sp, plan.flash_attention, plan.ep, etp, plan.overlap_tp_comm,
                      plan.cp_comm == "a2a", plan.moe_dispatch == "tp_slice", plan.seq_chunks,
                      plan.moe_dispatch == "deepep", float_bits(plan.offload.activations).item(),
                      plan.dp if workload.documents is not None else 0, plan.attention_pool,
                      float_bits(plan.act_compression).item()]], dtype=np.int64)


def expert_data_parallel(plan: ParallelPlan) -> int:
    """The plan's expert-data-parallel degree (memory_phase.expert_data_parallel)."""
    return memory_phase.expert_data_parallel(plan.dp, plan.cp, plan.tp, plan.ep, plan.etp or plan.tp)


def _attention_factors(workload: Workload, plan: ParallelPlan):
    """attention_balance.AttentionFactors of the workload's documents over the plan's dp replicas; None without
    documents. Chunked sequences are refused there: their chunk costs assume one causal document."""
    docs = workload.documents
    if docs is None:
        return None
    if plan.seq_chunks > 1:
        raise BadInput("seq_chunks > 1 with Workload.documents is not modelled (chunk costs assume one causal "
                       "document per sequence); use seq_chunks 1")
    return ab.attention_factors(workload.seq_len, workload.global_batch, plan.dp, docs.mean_tokens, docs.max_tokens,
                                docs.seed)



def estimate(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan) -> Estimate:
    """Step time, throughput, MFU, memory per device and the explanation of one plan, as named phases: the
    checks, what every phase reads (_setup), chunk sums, the pipeline, data-parallel sync, the optimizer,
    memory, and the outputs."""
    check_plan(model, cluster, workload, plan)
    one = _setup(model, cluster, workload, plan)
    sums = _chunk_sums(one)
    p2p_s, pipe = _pipeline(one, sums)
    # DiffusionPipe: frozen encoders' forward moved off stage 0 into the backbone's bubbles (frozen_fill.py)
    fill = frozen_fill.fill_plan(one, sums.fwd_s, sums.bwd_s, p2p_s)
    if fill is not None and fill.backbone is not None:
        pipe = frozen_fill.filled_pipeline(fill)
        sums.fwd_s = list(fill.backbone_fwd_s)
    sync = _data_parallel_sync(one, sums, pipe)
    opt_s, offload_s = _optimizer_s(one, sync)
    mem = _stage_memory(one, pipe, sync)
    est = _outputs(one, sums, p2p_s, pipe, sync, opt_s, offload_s, mem)
    if fill is None:
        return est
    return est.model_copy(update={"breakdown": {**est.breakdown, **frozen_fill.breakdown(fill)},
                                  "why": est.why + frozen_fill.why(fill)})


@dataclass(slots=True)
class _Stage:
    """One pipeline stage's view of the shared columns: its context (device, links, cached values), the
    plan's column there and the chunk layout's sums (batch_context.group_sums)."""

    ctx: object
    col: int
    entry: dict


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~5 us per estimate; read-only by convention
class _OnePlan:
    """What every phase of estimate() reads about one plan on one cluster: the inputs, the work item, bytes
    per element, the stage layout, each stage's column and sums, and the layer counts of its chunk layout."""

    model: ModelGraph
    cluster: Cluster
    workload: Workload
    plan: ParallelPlan
    microbatches: int  # m
    items: int  # work items per step: m * seq_chunks
    item_tokens: int  # tokens of one work item's sequences: seq_len / seq_chunks
    act_bytes: int  # bytes per element of activations and of what the step sends (dtypes.activation_bytes)
    weight_bytes: int  # bytes per parameter of the weights ZeRO gathers and offload uploads
    grad_bytes: int  # bytes per parameter of the gradients reduced and offloaded
    device: object  # stage 0's device: the cluster's first unless a stage layout places the stages
    ep_link: object  # stage 0's expert-parallel link, None without expert parallelism
    layout: object  # stages.StageLayout, or None for one device type and no placement
    stages: list  # per stage a _Stage (one shared _Stage for every stage without a layout)
    counts: dict  # chunks.layer_counts of the plan's chunk layout
    factors: object  # attention_balance.AttentionFactors of the workload's documents, or None


def _setup(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan) -> _OnePlan:
    """The work item, bytes per element, the stage layout, and each stage's column of the cached per-layer
    values with its chunk layout's sums."""
    dtype = workload.dtype
    e, w_bytes, g_bytes = dtypes.activation_bytes(dtype), dtypes.weight_bytes(dtype), dtypes.gradient_bytes(
        workload.grad_dtype)
    m = plan.microbatches(workload)
    # Sequence-chunked pipeline: every per-micro-batch term is per work item, one chunk of s/n tokens of the
    # micro-batch's sequences, and a step runs m*n items (TeraPipe, Li et al. 2021 section 3).
    s, items = workload.seq_len // plan.seq_chunks, m * plan.seq_chunks
    factors = _attention_factors(workload, plan)
    rc, rnl = RECOMPUTE_POLICIES.index(plan.recompute), -1 if plan.recompute_num_layers is None \
        else plan.recompute_num_layers
    part = partition_key(plan)
    row = layer_tuple(plan, workload)

    def stage(ctx) -> _Stage:
        col = int(ctx.columns(row)[0])
        return _Stage(ctx=ctx, col=col, entry=group_sums(ctx, plan.pp, plan.vpp, rc, rnl, cluster.device_count, e,
                                                           w_bytes, g_bytes, workload.seq_len, part))

    # Several device types, or a plan that places its stages: each stage on its own devices, profile and links
    # (planner/cost/stages.py); None keeps every stage on the cluster's strided groups, rank r on device r.
    layout = stage_layout(cluster, plan, dtype)
    if layout is None:
        dev = cluster.devices[0].device
        ep_link = strided_link(cluster, 0, plan.etp or plan.tp, plan.ep) if plan.ep > 1 else None
        stages = [stage(cost_context(model, cluster, workload))] * plan.pp
    else:
        dev, stages = layout.devices[0], []
        pool = strided_link(cluster, 0, 1, plan.devices) if plan.attention_pool else None
        for k in range(plan.pp):
            tp_l, cp_l, _, ep_l = stage_links(cluster, layout.ranks, k)
            key = ("stage", layout.devices[k].name, layout.groups[k], plan.tp, plan.cp, plan.dp, plan.ep,
                   plan.etp, plan.attention_pool)
            stages.append(stage(cost_context(model, cluster, workload, key, layout.devices[k],
                                     FixedLinks(tp_l, cp_l, ep_l, pool))))
        ep_link = stage_links(cluster, layout.ranks, 0)[3]
    return _OnePlan(model=model, cluster=cluster, workload=workload, plan=plan, microbatches=m, items=items,
                    item_tokens=s, act_bytes=e, weight_bytes=w_bytes, grad_bytes=g_bytes, device=dev,
                    ep_link=ep_link, layout=layout, stages=stages,
                    counts=layer_counts(model, plan.pp, plan.vpp, rc, rnl, part), factors=factors)


@dataclass(slots=True)
class _ChunkSums:
    """Per pipeline chunk, one work item's forward and backward seconds and its PARTS; the FLOPs per device of
    one item through every chunk."""

    fwd_s: list
    bwd_s: list
    parts: list  # per chunk: {part name: seconds}
    flops_model: float
    flops_hw: float


def _chunk_sums(one: _OnePlan) -> _ChunkSums:
    """Chunk sums: each chunk's sums read from its stage's column (chunk c runs on stage c % pp), and its parts
    summed from the layer counts of the chunk layout."""
    pp, K = one.plan.pp, one.counts["K"]
    fwd, bwd, parts = [], [], []
    for c in range(one.counts["C"]):
        st = one.stages[c % pp]
        fwd.append(float(st.entry["Fc"][c, st.col]))
        bwd.append(float(st.entry["Bc"][c, st.col]))
        lv_parts = st.ctx.lv["parts"][..., st.col]  # (shapes, policies, parts)
        parts.append(dict(zip(PARTS, (K[c] @ lv_parts.reshape(-1, len(PARTS))).tolist())))
    first = one.stages[0]
    return _ChunkSums(fwd_s=fwd, bwd_s=bwd, parts=parts, flops_model=float(first.entry["fm"][first.col]),
                      flops_hw=float(first.entry["fh"][first.col]))


def chunk_times(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan):
    """(forward s, backward s, parts) per pipeline chunk of one work item, and one stage-to-stage transfer's
    seconds: what estimate() hands to the pipeline simulation (app/viz.py draws the same)."""
    check_plan(model, cluster, workload, plan)
    one = _setup(model, cluster, workload, plan)
    sums = _chunk_sums(one)
    return sums.fwd_s, sums.bwd_s, sums.parts, _p2p_s(one)


def _p2p_s(one: _OnePlan) -> float:
    """Seconds of one stage-to-stage transfer: the column's (batch_context._p2p_column_s), or with a stage
    layout every rank pair of each boundary at once, sharing NICs and island gateways."""
    plan = one.plan
    if plan.pp == 1:
        return 0.0
    if one.layout is None:
        return float(one.stages[0].entry["p2p"][one.stages[0].col])
    # Activations cross each stage boundary once per micro-batch each way (Narayanan 2021 3.2); with sequence
    # parallel (scatter/gather) each tp rank sends 1/tp of them.
    nbytes = compressed_p2p_bytes(plan.mbs * one.item_tokens / plan.cp * one.model.layers[0].hidden * one.act_bytes / (
        plan.tp if plan.sp else 1), plan.act_compression)
    return float(max(boundary_p2p_s(one.cluster, one.layout, k, nbytes, p2p=cached_p2p(one.cluster))
                     for k in range(plan.pp)))


def _pipeline(one: _OnePlan, sums: _ChunkSums):
    """(seconds of one stage-to-stage transfer, the schedule's timing) of the chunks through the pipeline."""
    plan = one.plan
    p2p_s = _p2p_s(one)
    # simulate_times: simulate's timing without its event list, equal field for field (estimate reads no events)
    pipe = pipeline.simulate_times(plan.schedule, sums.fwd_s, sums.bwd_s, one.microbatches, v=plan.vpp,
                                   p2p_s=p2p_s, seq_chunks=plan.seq_chunks)
    return p2p_s, pipe


@dataclass(slots=True)
class _DataParallelSync:
    """The gradient reduction and ZeRO traffic of the stage with the most trainable parameters (`worst`)."""

    stage_params: list  # trainable parameters per device of each stage
    worst: int
    params_dev: float  # the worst stage's trainable parameters per device
    device: object  # the worst stage's device
    stage_busy_s: float  # its busy seconds in the pipeline (the whole pipeline's step when pp = 1)
    exposed_s: float  # what compute does not hide, plus the sharded framework's host copies
    sync_s: float = 0.0  # one step's full sync, before DiLoCo / SparseLoCo (the why's reference)


def _sync_s(one: _OnePlan, worst: int) -> float:
    """step_terms.zero_sync_s of the worst stage's layers, one collective per layer: the column's sums
    (batch_context._dp_collective_sums: routed experts over their own expert-data-parallel group, the rest
    over dp x cp), or with a stage layout all of them over the worst stage's own dp x cp group."""
    plan, st = one.plan, one.stages[worst]
    if one.layout is None:
        ent, col = st.entry, st.col
        return float(zero_sync_s(ent["ar"][col], ent["rs"][col], ent["ag"][col], plan.zero, one.items, one.device))
    if plan.dp * plan.cp == 1:
        return 0.0
    link = group_link(one.cluster, one.layout.ranks, "dp_cp", worst)
    sums = layer_sync_sums_s(st.ctx.lv["par"][:, st.col], one.grad_bytes, one.weight_bytes, link,
                             one.counts["Tst"][worst], zero=plan.zero)
    return float(zero_sync_s(*sums, plan.zero, one.items, one.layout.devices[worst]))


def _data_parallel_sync(one: _OnePlan, sums: _ChunkSums, pipe) -> _DataParallelSync:
    """Data-parallel gradient reduction and ZeRO traffic over the dp group, and how much of it stays exposed.
    One collective per layer (Megatron and DDP reduce in buckets of about a layer's size), so the
    per-collective latency of a ring over many ranks counts as often as it is paid."""
    plan, first = one.plan, one.stages[0]
    stage_params = first.entry["par_st"][:, first.col].tolist()
    worst = int(first.entry["worst"][first.col])
    dev = one.device if one.layout is None else one.layout.devices[worst]
    params_dev = stage_params[worst]
    stage_busy = float(pipe.busy_s[worst]) if plan.pp > 1 else float(pipe.step_time_s)
    # the worst stage's backward of the last micro-batch: what an overlapped gradient reduction hides behind
    last_bwd = sum(sums.bwd_s[c] for c in range(len(sums.bwd_s)) if c % plan.pp == worst) \
        if plan.overlap_grad_reduce else 0.0
    # DiLoCo / SparseLoCo: R of the bytes, every H steps (step_terms.low_bandwidth_exposed_s); R = H = 1: as is
    sync_s = _sync_s(one, worst)
    exposed = exposed_sync_s(sync_s * plan.grad_compression, plan.zero, plan.overlap_grad_reduce, stage_busy,
                             last_bwd, dev, params_dev=params_dev, weight_bytes=one.weight_bytes,
                             grad_bytes=one.grad_bytes, items=one.items, replicas=plan.dp * plan.cp)
    exposed = low_bandwidth_exposed_s(sync_s * plan.grad_compression, exposed, plan.local_steps, plan.grad_compression,
                                      params_dev, dev)
    return _DataParallelSync(stage_params=stage_params, worst=worst, params_dev=params_dev, device=dev,
                             stage_busy_s=stage_busy, exposed_s=float(exposed), sync_s=sync_s)


def _optimizer_s(one: _OnePlan, sync: _DataParallelSync) -> tuple[float, float]:
    """(optimizer step, exposed offload) seconds (step_terms.optimizer_step_s and offload_exposed_s)."""
    plan = one.plan
    shards = int(state_shards(plan.zero, plan.dp * plan.cp))
    if one.layout is None:
        opt_s = float(optimizer_step_s(sync.params_dev, shards, plan.offload.optimizer, sync.device))
    else:  # every stage steps its own optimizer at once: the slowest one counts
        opt_s = max(float(optimizer_step_s(p, shards, plan.offload.optimizer, d))
                    for p, d in zip(sync.stage_params, one.layout.devices))
    host = one.cluster.nodes[0].host_link
    offload_s = float(offload_exposed_s(plan.offload.optimizer, sync.params_dev / shards, one.weight_bytes,
                                        one.grad_bytes, sync.stage_busy_s, None if host is None else host.bytes_per_s))
    return opt_s, offload_s


_MEMORY_PARTS = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "backward_working_bytes",
                 "logits_transient_bytes", "seq_chunk_kv_bytes", "cp_ring_buffers_bytes", "overhead_bytes",
                 "total_bytes")


def _stage_memory(one: _OnePlan, pipe, sync: _DataParallelSync) -> dict:
    """Bytes per device of every stage (model states, frozen weights, activations in flight, transients,
    allocator overhead) and of the worst one: {**worst stage, "stages": [...]} (memory_phase.stage_memory on
    the stage tables of each stage's column)."""
    plan = one.plan
    tables = {k: np.array([[float(st.entry[k][i, st.col]) for i, st in enumerate(one.stages)]]) for k in STAGE_TABLES}
    if plan.fill_frozen and plan.pp > 1:  # every stage holds the frozen weights it fills with
        tables["froz_st"] = frozen_fill.replicated_frozen_bytes(tables["froz_st"])
    inflight = np.array([pipe.peak_inflight[:plan.pp]], dtype=float)  # in-flight work items per stage, per chunk
    if plan.vpp > 1:
        inflight /= plan.vpp

    def col(x):
        return np.full((1, 1), x, dtype=float)

    inputs = memory_phase.StageInputs(
        params_count=tables["par_st"], expert_params_count=tables["parx_st"], frozen_bytes=tables["froz_st"],
        activation_bytes=tables["act_st"], inflight_items=inflight, working_bytes=tables["work_st"],
        logits_bytes=tables["logit_st"], ring_bytes=tables["ring_st"], kv_full_bytes=tables["kvf_st"],
        kv_rest_bytes=tables["kva_st"] - tables["kvf_st"], dp_cp=col(plan.dp * plan.cp),
        edp=col(expert_data_parallel(plan)), seq_chunks=col(plan.seq_chunks),
        offload_activations=col(plan.offload.activations), offload_optimizer=col(plan.offload.optimizer),
        weight_versions=col(WEIGHT_VERSIONS[SCHEDULE_INDEX[plan.schedule]]))
    mem = memory_phase.stage_memory(inputs, plan.zero, one.weight_bytes, one.grad_bytes, one.workload.optimizer)
    overhead = mem.overhead_bytes()
    # the rows of _MEMORY_PARTS, stage by stage
    table = np.concatenate([mem.weights_bytes + mem.frozen_bytes, mem.gradients_bytes, mem.optimizer_bytes,
                            mem.activations_bytes, mem.backward_working_bytes, mem.logits_transient_bytes,
                            mem.seq_chunk_kv_bytes, mem.cp_ring_buffers_bytes, overhead, mem.subtotal_bytes + overhead])
    stages = [dict(zip(_MEMORY_PARTS, r)) for r in table.T.tolist()]
    totals = [d["total_bytes"] for d in stages]
    return {**stages[totals.index(max(totals))], "stages": stages}  # the first of equal stages, as max() picks


def _breakdown(one: _OnePlan, sums: _ChunkSums, p2p_s: float, pipe, sync: _DataParallelSync, opt_s: float,
               offload_s: float) -> dict:
    """Seconds per term of the busiest pipeline stage: its per-item parts times the items of a step, plus the
    step-level terms. compute_s excludes recompute, which has its own line."""
    plan, items = one.plan, one.items
    busiest = int(np.argmax(pipe.busy_s))
    per_chunk = sums.parts
    stage_parts = {k: items * sum(per_chunk[c][k] for c in range(len(per_chunk)) if c % plan.pp == busiest)
                   for k in PARTS}
    return {
        **stage_parts,
        "pp_comm_s": float(pp_comm_s(plan.pp, plan.vpp, items, p2p_s)),
        "pipeline_bubble_s": pipe.bubble_s,
        "dp_comm_exposed_s": sync.exposed_s,
        "optimizer_s": opt_s,
        "offload_s": offload_s,
    }


def _outputs(one: _OnePlan, sums: _ChunkSums, p2p_s: float, pipe, sync: _DataParallelSync, opt_s: float,
             offload_s: float, mem: dict) -> Estimate:
    """Step time, throughput, model and hardware FLOPs utilisation, the breakdown, the fit against device
    memory (per stage, the tightest reported, with a stage layout) and the explanation."""
    plan, workload, layout, dtype = one.plan, one.workload, one.layout, one.workload.dtype
    step = float(step_time_s(pipe.step_time_s, sync.exposed_s, opt_s, offload_s))
    dev = one.device
    peak = dev.peak_flops(dtype) * plan.devices
    if layout is not None:
        peak = sum(one.cluster.devices[i].device.peak_flops(dtype) for g in layout.groups for i in g)
    breakdown = _breakdown(one, sums, p2p_s, pipe, sync, opt_s, offload_s)
    fits = mem["total_bytes"] <= dev.memory_bytes
    capacity = dev.memory_bytes
    if layout is not None:  # each stage against its own smallest device; report the tightest stage
        tight = max(range(plan.pp), key=lambda i: mem["stages"][i]["total_bytes"] / layout.capacity_bytes[i])
        fits = all(mem["stages"][i]["total_bytes"] <= layout.capacity_bytes[i] for i in range(plan.pp))
        mem = {**mem["stages"][tight], "stages": mem["stages"]}
        capacity, dev = layout.capacity_bytes[tight], layout.devices[tight]
    mfu, hfu = utilisation(sums.flops_model, sums.flops_hw, one.items, plan.tp, plan.cp, plan.dp, step, peak)
    from planner.core.stack import DEFAULT_BAND  # here: this change of the module is _outputs's alone

    stack = one.cluster.stack
    text = why.explain(breakdown, step, fits, mem, dev, model=one.model, workload=workload, plan=plan, pipe=pipe,
                       microbatches=one.microbatches, item_tokens=one.item_tokens, factors=one.factors,
                       ep_link=one.ep_link, stack=stack)
    band = DEFAULT_BAND if stack is None else stack.band_for(dev.name)  # the 80% interval of measured / predicted
    return Estimate(
        step_time_s=step, tokens_per_s=float(tokens_per_s(workload.global_batch, workload.seq_len, step)),
        mfu=float(mfu), hfu=float(hfu),
        peak_memory_bytes=mem["total_bytes"], memory_capacity_bytes=capacity, fits=bool(fits),
        breakdown=breakdown, memory={k: v for k, v in mem.items() if k != "stages"},
        stages=[{"stage": i, "fwd_s": sums.fwd_s[i], "bwd_s": sums.bwd_s[i], **mem["stages"][i]}
                for i in range(min(plan.pp, len(sums.fwd_s)))],
        why=text + _low_bandwidth_why(one, sync), step_time_s_p10=step * band.p10, step_time_s_p90=step * band.p90,
        staleness_steps=SCHEDULE_RULES[SCHEDULE_INDEX[plan.schedule]].staleness_steps,
        **energy.money_terms(one.cluster, step, float(hfu), workload.tokens_per_step))


def _low_bandwidth_why(one: _OnePlan, sync: _DataParallelSync) -> str:
    """What DiLoCo / SparseLoCo and activation compression charge, and the trade-off the papers report."""
    plan = one.plan
    notes = []
    if plan.local_steps > 1 or plan.grad_compression < 1:
        sent = pseudo_gradient_bytes_per_step(sync.params_dev, one.grad_bytes, plan.dp * plan.cp, plan.local_steps,
                                              plan.grad_compression)
        notes.append(f"DP sync every {plan.local_steps} step(s) with {plan.grad_compression:g} of the bytes "
                     f"({sent / 1e6:.3g} MB per rank per step amortised; full per-step sync {sync.sync_s:.3g} s, "
                     f"exposed now {sync.exposed_s:.3g} s incl. the outer step / compression passes): DiLoCo / "
                     "SparseLoCo trade more steps to the same loss for less traffic (loss not modelled)")
    if plan.act_compression < 1 and plan.pp > 1:
        notes.append(f"pipeline activations and their gradients sent at {plan.act_compression:g} of their bytes "
                     "(subspace compression; its accuracy cost is not modelled)")
    return "".join(f"; {n}" for n in notes)
