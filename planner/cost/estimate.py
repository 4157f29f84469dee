"""estimate(model, cluster, workload, plan) -> Estimate: the one pure function the rest is built on.

It assembles the pieces: per-layer compute (compute.py), per-collective communication over the links the
plan's groups actually span (comm.py and Cluster.collective), the pipeline schedule with uneven stages
(pipeline.py) and memory per device (memory.py). Device ranks follow Megatron's order (tp fastest, then cp,
then dp, then pp), so a tp group is contiguous and lands inside a node when tp <= devices per node.

estimate() runs as named phases over one plan: checks -> setup (work item, bytes per element, links, stage
layout, chunk structure) -> layer terms summed per chunk -> pipeline -> data-parallel sync -> optimizer ->
memory -> outputs. The pieces it assembles from live beside it: the chunk split and the structure read off it
in estimate_structure.py, one layer's step in estimate_layer.py, the step terms after the pipeline (DP sync,
optimizer, step time, MFU) in step_terms.py, shared with estimate_batch, memory per device in
estimate_memory.py, the explanation text in why.py; bytes per dtype in planner/core/dtypes.py. Every name
they define that other modules import from here stays importable from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from planner.core import dtypes
from planner.core.errors import BadInput, Infeasible
from planner.core.hardware import Cluster
from planner.core.layout import RankLayout
from planner.core.model import ModelGraph
from planner.core.plan import Estimate, ParallelPlan, Workload
from planner.cost import attention_balance as ab
from planner.cost import pipeline, why

# Besides what estimate() uses, re-exported (each the same object as in its module): search/partition.py,
# planners/ilp.py, app/viz.py and tests import split_chunks, _policies, _layer_step and the rest from here.
from planner.cost.estimate_layer import (  # noqa: F401
    EXPOSED_TAIL_FRACTION,
    _Ctx,
    _layer_step,
    _LayerStep,
    _overlapped_tp_s,
    _steps,
)
from planner.cost.estimate_memory import _memory, expert_data_parallel
from planner.cost.estimate_structure import (  # noqa: F401
    _BY_CLUSTER,
    _BY_MODEL,
    _cache_for,
    _chunks,
    _partition_key,
    _policies,
    _split_chunks,
    _Structure,
    _structure,
    _topological,
    split_chunks,
)
from planner.cost.links import (  # pipeline_p2p_s: re-exported for app/viz.py and batch_context.py
    cached_p2p,
    group_link,
    pipeline_p2p_s,  # noqa: F401
    stage_links,
    strided_link,
)
from planner.cost.stages import boundary_p2p_s, stage_layout
from planner.cost.step_terms import (  # dp_sync_s and shard_copy_s: re-exported for planners/ilp.py and tests
    dp_sync_s,  # noqa: F401
    exposed_sync_s,
    layer_sync_sums_s,
    optimizer_step_s,
    pp_comm_s,
    shard_copy_s,  # noqa: F401
    state_shards,
    step_time_s,
    tokens_per_s,
    utilisation,
    zero_sync_s,
)

# Host-side AdamW (ZeRO-Offload's CPU-Adam) streams the same 32 bytes per parameter through host DRAM.
# ASSUMPTION: 100 GB/s of usable host memory bandwidth per GPU's share of a dual-socket server (8-channel
# DDR4-3200 is 205 GB/s per socket by spec); replace with a measured figure from `calibrate`.
HOST_MEMORY_BYTES_PER_S = 100e9


def _offload_time_s(cluster, plan: ParallelPlan, owned_params: float, e: int, g_bytes: int,
                    stage_busy_s: float) -> float:
    """Exposed time of optimizer offload: gradients go down and updated weights come back over the host
    link (4 bytes per parameter at 16-bit, ZeRO-Offload section 3.3-3.5), and the CPU runs the update.
    The gradient copy overlaps backward (ZeRO-Offload section 4.1); the update and the upload do not."""
    frac = plan.offload.optimizer
    if frac <= 0:
        return 0.0
    node = cluster.nodes[0]
    if node.host_link is None:
        raise Infeasible(f"node type {node.node_type.name} has no host_link: optimizer offload needs one")
    host_bw = node.host_link.bytes_per_s
    upload = frac * owned_params * e / host_bw
    cpu_step = frac * owned_params * 32 / HOST_MEMORY_BYTES_PER_S
    download = frac * owned_params * g_bytes / host_bw
    return upload + cpu_step + max(0.0, download - stage_busy_s)


def _check_expert_parallel(model: ModelGraph, plan: ParallelPlan) -> None:
    """ep must divide every MoE layer's experts and fold into the dp x cp x tp ranks (Megatron's
    expert_tensor x expert x expert-data grid over the same devices); a dense model takes ep = 1.
    moe_dispatch 'tp_slice' has ep = tp (ParallelPlan checks it), so tp divides the experts here."""
    if plan.moe_dispatch == "tp_slice" and not any(layer.kind == "moe" for layer in model.layers):
        raise BadInput(f"moe_dispatch tp_slice: model {model.name} has no MoE layers; use moe_dispatch a2a")
    if plan.ep == 1:
        return
    experts = {layer.experts for layer in model.layers if layer.kind == "moe"}
    if not experts:
        raise BadInput(f"--ep {plan.ep}: model {model.name} has no MoE layers; use --ep 1")
    for n_exp in sorted(experts):
        if n_exp % plan.ep:
            raise BadInput(f"--ep {plan.ep} does not divide the {n_exp} experts of model {model.name}")
    etp = plan.etp or plan.tp
    ranks = plan.dp * plan.cp * plan.tp
    if ranks % (plan.ep * etp):
        raise BadInput(f"ep*etp = {plan.ep}*{etp} must divide dp*cp*tp = {ranks}; change --ep")


def _check_deepep(deepep, workload: Workload) -> None:
    """DeepEP's dispatch (moe_dispatch 'deepep') runs dropless routing only (Megatron-Bridge's recipes turn
    DeepEP off when they turn token dropping on)."""
    if np.any(deepep) and workload.moe_capacity_factor is not None:
        raise BadInput(f"moe_dispatch deepep needs dropless routing; the workload drops tokens at capacity factor "
                       f"{workload.moe_capacity_factor}: use moe_dispatch a2a or drop the capacity factor")


def _check_context_parallel(model: ModelGraph, plan: ParallelPlan) -> None:
    """Ulysses (cp_comm 'a2a') gives each cp rank heads/(tp*cp) whole heads (Jacobs et al. 2023 section 3.2:
    the degree must divide the heads)."""
    if plan.cp_comm != "a2a":
        return
    for layer in model.layers:
        if layer.kind == "attention" and layer.heads % (plan.tp * plan.cp):
            raise BadInput(f"cp_comm a2a: tp*cp = {plan.tp}*{plan.cp} must divide the {layer.heads} heads of "
                           f"model {model.name}; use the ring")


def _check_seq_chunks(model: ModelGraph, plan: ParallelPlan, seq_len: int) -> None:
    """seq_chunks n needs causal attention (a chunk may only read earlier chunks: TeraPipe section 3) and
    chunks that split evenly, also over the 2*cp load-balanced halves of context parallelism (Megatron)."""
    n = plan.seq_chunks
    if n == 1:
        return
    if any(layer.kind in ("attention", "encoder") and layer.trainable and not layer.causal for layer in model.layers):
        raise BadInput(f"seq_chunks {n}: model {model.name} has non-causal attention, whose chunks would read later "
                       f"chunks; use seq_chunks 1")
    unit = n * (2 * plan.cp if plan.cp > 1 else 1)
    if seq_len % unit:
        raise BadInput(f"seq_chunks {n}: sequence {seq_len} must divide into {n} chunks"
                       + (f" of 2*cp = {2 * plan.cp} parts" if plan.cp > 1 else ""))


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


_PARTS = ("compute_s", "recompute_s", "tp_comm_s", "cp_comm_s", "ep_comm_s", "act_offload_s", "attn_pool_s")


def estimate(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan) -> Estimate:
    """Step time, throughput, MFU, memory per device and the explanation of one plan, as named phases: the
    checks, what every phase reads (_setup), layer terms summed per chunk, the pipeline, data-parallel sync,
    the optimizer, memory, and the outputs."""
    _check_plan(model, cluster, workload, plan)
    one = _setup(model, cluster, workload, plan)
    sums = _chunk_sums(one)
    p2p_s, pipe = _pipeline(one, sums)
    sync = _data_parallel_sync(one, sums, pipe)
    opt_s, offload_s = _optimizer_s(one, sync)
    mem = _stage_memory(one, pipe, sync)
    return _outputs(one, sums, p2p_s, pipe, sync, opt_s, offload_s, mem)


def _check_plan(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan) -> None:
    """Refuse (BadInput) a plan the cost model cannot price on this cluster, model and workload."""
    n = plan.devices
    if n != cluster.device_count:
        raise BadInput(f"plan uses dp*tp*pp*cp = {plan.dp}*{plan.tp}*{plan.pp}*{plan.cp} = {n} devices, "
                       f"cluster {cluster.name} has {cluster.device_count}")
    _check_expert_parallel(model, plan)
    _check_context_parallel(model, plan)
    _check_deepep(plan.moe_dispatch == "deepep", workload)
    if workload.global_batch % (plan.mbs * plan.dp):
        raise BadInput(f"global batch {workload.global_batch} is not divisible by mbs*dp = "
                       f"{plan.mbs}*{plan.dp}")
    _check_seq_chunks(model, plan, workload.seq_len)


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~5 us per estimate; read-only by convention
class _OnePlan:
    """What every phase of estimate() reads about one plan on one cluster: the inputs, the work item, bytes
    per element, stage 0's device and links, the stage layout, the chunk structure and the layer context."""

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
    dp_link: object
    ep_link: object
    layout: object  # stages.StageLayout, or None for one device type and no placement
    structure: _Structure
    layer_ctx: _Ctx
    factors: object  # attention_balance.AttentionFactors of the workload's documents, or None


def _setup(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan) -> _OnePlan:
    """The work item, bytes per element, the groups' links (Megatron rank order: tp fastest, then cp, dp),
    the stage layout, the chunk structure and the context every layer step reads."""
    dev = cluster.devices[0].device
    dtype = workload.dtype
    e = dtypes.activation_bytes(dtype)
    b, m = plan.mbs, plan.microbatches(workload)
    # Sequence-chunked pipeline: every per-micro-batch term below is per work item, one chunk of s/n tokens
    # of the micro-batch's sequences, and a step runs m*n items (TeraPipe, Li et al. 2021 section 3).
    s, items = workload.seq_len // plan.seq_chunks, m * plan.seq_chunks
    tp, cp = plan.tp, plan.cp
    # Several device types, or a plan that places its stages: each stage on its own devices and profile
    # (planner/cost/stages.py); None keeps the homogeneous path, rank r on device r.
    layout = stage_layout(cluster, plan, dtype)
    ranks = RankLayout(tp=tp, cp=cp, dp=plan.dp, pp=plan.pp, ep=plan.ep, etp=plan.etp)
    if layout is not None:
        dev, ranks = layout.devices[0], layout.ranks
    # Stage 0's groups (core/layout.py): gradients are reduced, and ZeRO shards states, over dp x cp ranks
    # (context-parallel ranks hold the same weights); the ep group sits etp apart in Megatron's expert grid.
    tp_link, cp_link, dp_link, ep_link = stage_links(cluster, ranks, 0)
    st = _structure(model, plan)
    host = cluster.nodes[0].host_link
    ctx = _Ctx(b=b, s=s, tp=tp, cp=cp, e=e, dev=dev, dtype=dtype, plan=plan, tp_link=tp_link,
               cp_link=cp_link, ep_link=ep_link, moe_routing=(workload.moe_imbalance, workload.moe_capacity_factor),
               host_bytes_per_s=None if host is None else host.bytes_per_s,
               e_act=dtypes.activation_bytes(dtype), seq_chunks=plan.seq_chunks)
    factors = _attention_factors(workload, plan)
    if factors is not None:
        # documents: every replica's micro-batches run at the slowest replica's attention (they meet at the
        # gradient reduction), or at the pool's balanced share (DistCA); FLOPs count the work done
        ctx = dataclasses.replace(ctx, attention_scale=factors.pooled if plan.attention_pool else factors.straggler,
                                  attention_flops_scale=factors.mean)
    if plan.attention_pool:  # the pool spans every device of the plan
        ctx = dataclasses.replace(ctx, pool_link=strided_link(cluster, 0, 1, plan.devices))
    return _OnePlan(model=model, cluster=cluster, workload=workload, plan=plan, microbatches=m, items=items,
                    item_tokens=s, act_bytes=e, weight_bytes=dtypes.weight_bytes(dtype),
                    grad_bytes=dtypes.gradient_bytes(workload.grad_dtype), device=dev, dp_link=dp_link,
                    ep_link=ep_link, layout=layout, structure=st, layer_ctx=ctx, factors=factors)


@dataclass(slots=True)
class _ChunkSums:
    """Per pipeline chunk, one work item's forward and backward seconds and its _PARTS; the FLOPs per device
    of one item through every chunk."""

    fwd_s: list
    bwd_s: list
    parts: list  # per chunk: {part name: seconds}
    flops_model: float
    flops_hw: float


def _step_table(one: _OnePlan, ctx: _Ctx, where: tuple) -> np.ndarray:
    """One row per distinct (layer shape, policy) of the structure, plus a zero row for padding: the layer
    step's fwd_s, bwd_s, _PARTS, model FLOPs and hardware FLOPs."""
    vals = np.zeros((len(one.structure.reps) + 1, 4 + len(_PARTS)))
    for i, step in enumerate(_steps(one.model, one.cluster, one.structure, ctx, where)):
        vals[i] = (step.fwd_s, step.bwd_s, *(step.parts[k] for k in _PARTS), step.flops_model, step.flops_hw)
    return vals


def _chunk_sums(one: _OnePlan) -> _ChunkSums:
    """Layer terms -> chunk sums: each layer step's terms, on its stage's devices and links, summed per chunk."""
    st, layout, plan = one.structure, one.layout, one.plan
    vals = _step_table(one, one.layer_ctx, () if layout is None else (layout.groups[0], one.device.name))
    per_layer_vals = vals[st.idx]  # (chunks, longest chunk, 4 + parts)
    if layout is not None:  # the other stages' chunks on their own devices and links
        per_layer_vals = per_layer_vals.copy()
        for stage in range(1, plan.pp):
            s_tp, s_cp, _, s_ep = stage_links(one.cluster, layout.ranks, stage)
            s_ctx = dataclasses.replace(one.layer_ctx, dev=layout.devices[stage], tp_link=s_tp, cp_link=s_cp,
                                        ep_link=s_ep)
            s_vals = _step_table(one, s_ctx, (layout.groups[stage], layout.devices[stage].name))
            rows = [c for c in range(len(st.chunks)) if c % plan.pp == stage]
            per_layer_vals[rows] = s_vals[st.idx[rows]]
    # cumsum adds along a row one element after the other, as the loop `f += one.fwd_s` over the chunk's
    # layers did, so the sums are the same floats; the padding adds 0.0, which changes nothing.
    sums = np.cumsum(per_layer_vals, axis=1)[:, -1, :].tolist()
    # FLOPs: one running sum over every layer of every chunk, in chunk order
    return _ChunkSums(fwd_s=[row[0] for row in sums], bwd_s=[row[1] for row in sums],
                      parts=[dict(zip(_PARTS, row[2:2 + len(_PARTS)])) for row in sums],
                      flops_model=float(np.cumsum(per_layer_vals[:, :, -2].reshape(-1))[-1]),
                      flops_hw=float(np.cumsum(per_layer_vals[:, :, -1].reshape(-1))[-1]))


def _pipeline(one: _OnePlan, sums: _ChunkSums):
    """(seconds of one stage-to-stage transfer, the schedule's timing) of the chunks through the pipeline."""
    plan, cluster = one.plan, one.cluster
    tp, cp = plan.tp, plan.cp
    # Activations cross each stage boundary once per micro-batch each way (Narayanan 2021 3.2); with
    # sequence parallel (scatter/gather) each tp rank sends 1/tp of them.
    p2p_s = 0.0
    if plan.pp > 1:
        nbytes = plan.mbs * one.item_tokens / cp * one.model.layers[0].hidden * one.act_bytes / (tp if plan.sp else 1)
        if one.layout is None:
            stage_size = tp * cp * plan.dp
            p2p_s = float(pipeline_p2p_s(cluster, plan.pp, stage_size, nbytes, p2p=cached_p2p(cluster)))
        else:  # every rank pair of each boundary at once, sharing NICs and island gateways
            p2p_s = float(max(boundary_p2p_s(cluster, one.layout, k, nbytes, p2p=cached_p2p(cluster))
                              for k in range(plan.pp)))
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


def _gradient_sync_s(one: _OnePlan, per_layer, worst: int, dp_link, dev) -> float:
    """step_terms.zero_sync_s of the worst stage's layers: routed experts over their own expert-data-parallel
    group, the rest over dp x cp."""
    plan, st, tp = one.plan, one.structure, one.plan.tp
    g_bytes, w_bytes, zero = one.grad_bytes, one.weight_bytes, plan.zero
    grad_ranks = plan.dp * plan.cp
    sums = (0.0, 0.0, 0.0)
    if plan.ep * (plan.etp or tp) != tp and one.layout is None:
        # routed experts reduce (and, under ZeRO, gather) over their own expert-data-parallel group: the
        # ranks ep*etp apart in the stage (Megatron parallel_state.py), the rest over dp x cp
        routed = np.array([float(st.shapes[i].routed_params()) / (plan.ep * (plan.etp or tp))
                           for i in st.train_shape[worst]] or [0.0])
        if grad_ranks > 1:
            sums = layer_sync_sums_s(per_layer - routed, g_bytes, w_bytes, dp_link, zero=zero)
        edp = expert_data_parallel(plan)
        if edp > 1:
            ranks = RankLayout(tp=tp, cp=plan.cp, dp=plan.dp, pp=plan.pp, ep=plan.ep, etp=plan.etp)
            edp_link = group_link(one.cluster, ranks, "edp")
            routed_sums = layer_sync_sums_s(routed, g_bytes, w_bytes, edp_link, zero=zero)
            sums = tuple(d + r for d, r in zip(sums, routed_sums))
    elif grad_ranks > 1:
        sums = layer_sync_sums_s(per_layer, g_bytes, w_bytes, dp_link, zero=zero)
    return float(zero_sync_s(*sums, zero, one.items, dev))


def _data_parallel_sync(one: _OnePlan, sums: _ChunkSums, pipe) -> _DataParallelSync:
    """Data-parallel gradient reduction and ZeRO traffic over the dp group, and how much of it stays exposed.
    One collective per layer (Megatron and DDP reduce in buckets of about a layer's size), so the
    per-collective latency of a ring over many ranks counts as often as it is paid."""
    plan, st, layout = one.plan, one.structure, one.layout
    # Parameters per device of each trainable shape (layers with one shape_key hold the same), summed per
    # stage over its trainable layers in chunk order, as sum() over the layers did.
    sharded = [float(layer.params_per_device(tp=plan.tp, ep=plan.ep, etp=plan.etp)) for layer in st.shapes]
    stage_params = [sum(sharded[i] for i in ls) for ls in st.train_shape]
    worst = int(np.argmax(stage_params))
    dp_link, dev = one.dp_link, one.device
    if layout is not None:  # the busiest stage's gradient traffic, over its own dp group, on its device
        dp_link = group_link(one.cluster, layout.ranks, "dp_cp", worst)
        dev = layout.devices[worst]
    per_layer = np.array([sharded[i] for i in st.train_shape[worst]] or [0.0])
    params_dev = float(per_layer.sum())
    dp_s = _gradient_sync_s(one, per_layer, worst, dp_link, dev)
    stage_busy = float(pipe.busy_s[worst]) if plan.pp > 1 else float(pipe.step_time_s)
    # the worst stage's backward of the last micro-batch: what an overlapped gradient reduction hides behind
    last_bwd = sum(sums.bwd_s[c] for c in range(len(st.chunks)) if c % plan.pp == worst) \
        if plan.overlap_grad_reduce else 0.0
    exposed = exposed_sync_s(dp_s, plan.zero, plan.overlap_grad_reduce, stage_busy, last_bwd, dev,
                             params_dev=params_dev, weight_bytes=one.weight_bytes, grad_bytes=one.grad_bytes,
                             items=one.items, replicas=plan.dp * plan.cp)
    return _DataParallelSync(stage_params=stage_params, worst=worst, params_dev=params_dev, device=dev,
                             stage_busy_s=stage_busy, exposed_s=float(exposed))


def _optimizer_s(one: _OnePlan, sync: _DataParallelSync) -> tuple[float, float]:
    """(optimizer step, exposed offload) seconds (step_terms.optimizer_step_s; offload: _offload_time_s)."""
    plan = one.plan
    shards = int(state_shards(plan.zero, plan.dp * plan.cp))
    owned = sync.params_dev / shards
    if one.layout is None:
        opt_s = float(optimizer_step_s(sync.params_dev, shards, plan.offload.optimizer, sync.device))
    else:  # every stage steps its own optimizer at once: the slowest one counts
        opt_s = max(float(optimizer_step_s(p, shards, plan.offload.optimizer, d))
                    for p, d in zip(sync.stage_params, one.layout.devices))
    offload_s = _offload_time_s(one.cluster, plan, owned, one.weight_bytes, one.grad_bytes, sync.stage_busy_s)
    return opt_s, offload_s


def _stage_memory(one: _OnePlan, pipe, sync: _DataParallelSync) -> dict:
    """Memory per device of every stage and of the worst one (estimate_memory._memory)."""
    plan, st = one.plan, one.structure
    # routed-expert parameters per stage: their states shard over the expert-data-parallel ranks
    expert = [float(layer.routed_params()) / (plan.ep * (plan.etp or plan.tp)) for layer in st.shapes]
    stage_expert = [sum(expert[i] for i in ls) for ls in st.train_shape]
    return _memory(one.model, st, one.workload, plan, pipe, sync.params_dev, sync.stage_params, sync.device,
                   stage_expert)


def _breakdown(one: _OnePlan, sums: _ChunkSums, p2p_s: float, pipe, sync: _DataParallelSync, opt_s: float,
               offload_s: float) -> dict:
    """Seconds per term of the busiest pipeline stage: its per-item parts times the items of a step, plus the
    step-level terms. compute_s excludes recompute, which has its own line."""
    plan, items = one.plan, one.items
    busiest = int(np.argmax(pipe.busy_s))
    per_chunk = sums.parts
    stage_parts = {k: items * sum(per_chunk[c][k] for c in range(len(per_chunk)) if c % plan.pp == busiest)
                   for k in per_chunk[0]}
    return {
        **{k: stage_parts[k] for k in _PARTS},
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
    step = step_time_s(pipe.step_time_s, sync.exposed_s, opt_s, offload_s)
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
    text = why.explain(breakdown, step, fits, mem, dev, model=one.model, workload=workload, plan=plan, pipe=pipe,
                       microbatches=one.microbatches, item_tokens=one.item_tokens, factors=one.factors,
                       ep_link=one.ep_link)
    return Estimate(
        step_time_s=step, tokens_per_s=tokens_per_s(workload.global_batch, workload.seq_len, step),
        mfu=mfu, hfu=hfu,
        peak_memory_bytes=mem["total_bytes"], memory_capacity_bytes=capacity, fits=fits,
        breakdown=breakdown, memory={k: v for k, v in mem.items() if k != "stages"},
        stages=[{"stage": i, "fwd_s": sums.fwd_s[i], "bwd_s": sums.bwd_s[i], **mem["stages"][i]}
                for i in range(min(plan.pp, len(sums.fwd_s)))],
        why=text)
