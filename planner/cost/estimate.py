"""estimate(model, cluster, workload, plan) -> Estimate: the one pure function the rest is built on.

It assembles the pieces: per-layer compute (compute.py), per-collective communication over the links the
plan's groups actually span (comm.py and Cluster.collective), the pipeline schedule with uneven stages
(pipeline.py) and memory per device (memory.py). Device ranks follow Megatron's order (tp fastest, then cp,
then dp, then pp), so a tp group is contiguous and lands inside a node when tp <= devices per node.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from planner.cost import attention_balance as ab
from planner.cost import comm, longctx, memory, moe, pipeline
from planner.cost.compute import (
    ATTENTION_BWD_FACTOR, DTYPE_BYTES, chunk_attention_factor, floored, layer_time, recompute_time_s,
)
from planner.errors import BadInput, Infeasible
from planner.hardware import Cluster
from planner.hetero.stages import boundary_p2p_s, stage_layout, stage_links
from planner.model import Layer, ModelGraph
from planner.plan import Estimate, ParallelPlan, Workload

# Megatron's default: the gradient reduction is not overlapped with backward (overlap_grad_reduce=False,
# reference formulas.md 4.4); FSDP2 overlaps by default. When overlapped, the last bucket stays exposed.
EXPOSED_TAIL_FRACTION = 0.1


def split_chunks(graph: ModelGraph, plan: ParallelPlan) -> list[list[Layer]]:
    """Layers of each pipeline chunk, in pipeline order (pp * vpp chunks; chunk c runs on stage c % pp).

    Layers outside the transformer blocks go to the chunk of the block they feed: embedding and frozen
    encoders to the first chunk, final norm and head to the last.
    """
    # fresh lists: callers may change them; the cached split stays as it was
    return [list(c) for c in _chunks(graph, plan.pp, plan.vpp, _partition_key(plan))]


def _partition_key(plan: ParallelPlan):
    return None if plan.partition is None else tuple(tuple(a.layers) for a in plan.partition)


# Per-object caches (models and clusters are frozen): keyed by id(), holding the object itself so that
# its id cannot be reused by another object while the entry lives, and checked with `is` on every hit.
_BY_MODEL: dict[int, tuple[object, dict]] = {}
_BY_CLUSTER: dict[int, tuple[object, dict]] = {}


def _cache_for(store: dict, obj) -> dict:
    hit = store.get(id(obj))
    if hit is None or hit[0] is not obj:
        if len(store) > 32:
            store.clear()
        hit = store[id(obj)] = (obj, {})
    return hit[1]


def _chunks(graph: ModelGraph, pp: int, vpp: int, partition) -> tuple[tuple[Layer, ...], ...]:
    """split_chunks for (pp, vpp, partition key), cached per model; refusals are not cached."""
    cache = _cache_for(_BY_MODEL, graph)
    key = ("chunks", pp, vpp, partition)
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = tuple(tuple(c) for c in _split_chunks(graph, pp, vpp, partition))
    return hit


def _topological(graph: ModelGraph) -> list[Layer]:
    """graph.topological(), without importing networkx (half a second, on a process's first estimate) when
    the layers form one chain: then there is exactly one topological order, the chain's."""
    succ: dict[str, str] = {}
    has_pred: set[str] = set()
    for u, w in graph.edges:
        if u in succ or w in has_pred:  # a branch or a join: not a chain
            return graph.topological()
        succ[u] = w
        has_pred.add(w)
    heads = [layer.name for layer in graph.layers if layer.name not in has_pred]
    if len(heads) != 1:
        return graph.topological()
    by_name = graph.by_name
    order = [by_name[heads[0]]]
    while order[-1].name in succ and len(order) <= len(graph.layers):
        order.append(by_name[succ[order[-1].name]])
    if len(order) != len(graph.layers) or len(by_name) != len(graph.layers):
        return graph.topological()  # a cycle, a stray layer or an edge to an unknown name: its rules
    return order


def _split_chunks(graph: ModelGraph, pp: int, vpp: int, partition) -> list[list[Layer]]:
    chunks_n = pp * vpp
    blocks = sorted({layer.block for layer in graph.layers if layer.block is not None})
    if not blocks:
        return [list(graph.topological())] + [[] for _ in range(chunks_n - 1)]
    if len(blocks) < chunks_n:
        raise BadInput(f"pp*vpp = {chunks_n} pipeline chunks but the model has only {len(blocks)} blocks")
    if partition is not None:
        ranges = list(partition)
        covered = [i for lo, hi in ranges for i in range(lo, hi)]
        if covered != list(range(len(blocks))):
            raise BadInput(f"partition {ranges} does not cover blocks 0..{len(blocks) - 1} once, in order")
    else:
        sizes = [len(x) for x in np.array_split(np.arange(len(blocks)), chunks_n)]
        edges = np.cumsum([0] + sizes)
        ranges = [(int(edges[i]), int(edges[i + 1])) for i in range(chunks_n)]
    chunk_of_block = {}
    for c, (lo, hi) in enumerate(ranges):
        for i in range(lo, hi):
            chunk_of_block[blocks[i]] = c
    order = _topological(graph)
    out: list[list[Layer]] = [[] for _ in range(chunks_n)]
    seen_block = False
    for layer in order:
        if layer.block is not None:
            seen_block = True
            out[chunk_of_block[layer.block]].append(layer)
        else:
            out[chunks_n - 1 if seen_block else 0].append(layer)
    return out


def pipeline_p2p_s(cluster: Cluster, pp: int, stage_size: int, nbytes, p2p=None):
    """Time of one activation transfer between pipeline stages (nbytes may be an array).

    The simulator takes one transfer time, so the slowest boundary (one that leaves a node) sets it;
    interleaving also wraps the last stage back to the first. `p2p` replaces cluster.p2p (a cache).
    """
    p2p = p2p or cluster.p2p
    pairs = [(k * stage_size, ((k + 1) % pp) * stage_size) for k in range(pp)]
    links = {p2p(a, c) for a, c in pairs if a != c}
    return np.max([comm.p2p_time_s(nbytes, bw, lat) for bw, lat in links], axis=0)


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
        from planner.errors import Infeasible

        raise Infeasible(f"node type {node.node_type.name} has no host_link: optimizer offload needs one")
    host_bw = node.host_link.bytes_per_s
    upload = frac * owned_params * e / host_bw
    cpu_step = frac * owned_params * 32 / HOST_MEMORY_BYTES_PER_S
    download = frac * owned_params * g_bytes / host_bw
    return upload + cpu_step + max(0.0, download - stage_busy_s)


def _policies(layers: list[Layer], plan: ParallelPlan) -> dict[str, str]:
    """Recompute policy of each layer of one chunk: by its block's position in the chunk."""
    order = []
    for layer in layers:
        if layer.block is not None and layer.block not in order:
            order.append(layer.block)
    pos = {blk: i for i, blk in enumerate(order)}
    return {layer.name: plan.layer_recompute(pos[layer.block]) if layer.block is not None else
            ("none" if plan.recompute == "full" and plan.recompute_num_layers is not None else plan.recompute)
            for layer in layers}


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


def _group(base: int, stride: int, size: int) -> list[int]:
    return [base + stride * i for i in range(size)]


_PARTS = ("compute_s", "recompute_s", "tp_comm_s", "cp_comm_s", "ep_comm_s", "act_offload_s", "attn_pool_s")


@dataclass(frozen=True)
class _Structure:
    """What estimate() reads off the chunk split and the recompute policies, for one (model, pp, vpp,
    partition, recompute, recompute_num_layers); cached per model.

    reps: per distinct (shape_key, policy) the first layer with it in chunk order (the one the
    per-call memo of layer steps was keyed by) and its policy. idx: (chunks, longest chunk) index into
    reps of each layer, padded with len(reps) (a zero row). train: per stage its trainable layers
    (chunks c % pp == stage in chunk order); frozen: its frozen layers; acts: the reps index of each
    of its layers, in the order _memory sums their activations; blocks: per stage, per transformer block
    on it, the reps index of each of its trainable layers (the backward working set is the largest
    block's; identical blocks listed once); heads: per stage its LM head layers (the loss logits)."""

    chunks: tuple
    reps: tuple
    idx: np.ndarray
    train: tuple
    frozen: tuple
    acts: tuple
    shapes: tuple  # the first trainable layer of each shape_key, in stage order
    train_shape: tuple  # per stage: the index into shapes of each of its trainable layers
    blocks: tuple = ()
    heads: tuple = ()


def _structure(model: ModelGraph, plan: ParallelPlan) -> _Structure:
    cache = _cache_for(_BY_MODEL, model)
    key = ("structure", plan.pp, plan.vpp, _partition_key(plan), plan.recompute, plan.recompute_num_layers)
    hit = cache.get(key)
    if hit is not None:
        return hit
    chunks = _chunks(model, plan.pp, plan.vpp, _partition_key(plan))
    index: dict = {}
    reps = []
    rows = []
    layer_keys = []
    for layers in chunks:
        policies = _policies(list(layers), plan)
        row = []
        for layer in layers:
            k = (layer.shape_key, policies[layer.name])
            if k not in index:
                index[k] = len(reps)
                reps.append((layer, policies[layer.name]))
            row.append(index[k])
        rows.append(row)
        layer_keys.append(row)
    width = max([len(r) for r in rows] + [1])
    idx = np.full((len(chunks), width), len(reps), dtype=np.int64)
    for c, row in enumerate(rows):
        idx[c, :len(row)] = row
    on = [[c for c in range(len(chunks)) if c % plan.pp == st] for st in range(plan.pp)]
    train = tuple(tuple(layer for c in cs for layer in chunks[c] if layer.trainable) for cs in on)
    frozen = tuple(tuple(layer for c in cs for layer in chunks[c] if not layer.trainable) for cs in on)
    acts = tuple(tuple(k for c in cs for k in layer_keys[c]) for cs in on)
    blocks = []
    for cs in on:
        per_block: dict = {}
        for c in cs:
            for layer, k in zip(chunks[c], layer_keys[c]):
                if layer.block is not None and layer.trainable:
                    per_block.setdefault((c, layer.block), []).append(k)
        blocks.append(tuple(dict.fromkeys(tuple(v) for v in per_block.values())))  # distinct, in order
    heads = tuple(tuple(layer for c in cs for layer in chunks[c] if layer.kind == "head") for cs in on)
    shape_index: dict = {}
    shapes = []
    for ls in train:
        for layer in ls:
            if layer.shape_key not in shape_index:
                shape_index[layer.shape_key] = len(shapes)
                shapes.append(layer)
    train_shape = tuple(tuple(shape_index[layer.shape_key] for layer in ls) for ls in train)
    if len(cache) > 4096:
        cache.clear()
    hit = cache[key] = _Structure(chunks=chunks, reps=tuple(reps), idx=idx, train=train, frozen=frozen,
                                  acts=acts, shapes=tuple(shapes), train_shape=train_shape,
                                  blocks=tuple(blocks), heads=heads)
    return hit


def _link(cluster: Cluster, base: int, stride: int, size: int):
    """cluster.collective(_group(base, stride, size)), cached per cluster by (base, stride, size): a dp
    group of 16k ranks is otherwise a 16k-element list and tuple hashed on every call."""
    cache = _cache_for(_BY_CLUSTER, cluster)
    key = ("collective", base, stride, size)
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = cluster.collective(_group(base, stride, size))
    return hit


def _p2p_cached(cluster: Cluster):
    """cluster.p2p with its answers remembered per cluster."""
    cache = _cache_for(_BY_CLUSTER, cluster)
    memo = cache.setdefault("p2p", {})

    def p2p(a: int, c: int):
        hit = memo.get((a, c))
        if hit is None:
            hit = memo[(a, c)] = cluster.p2p(a, c)
        return hit
    return p2p


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


def dp_sync_s(per_layer_params, g_bytes: int, e: int, zero: int, m: int, dp_link, dev) -> float:
    """Seconds of data-parallel gradient reduction and ZeRO traffic per step over `dp_link`, one collective per
    layer (Megatron and DDP reduce in buckets of about a layer's size). per_layer_params: array of the
    stage's trainable parameters per device, by layer."""
    if zero == 0:
        dp_s = float(np.sum(comm.all_reduce_time_s(per_layer_params * g_bytes, dp_link)))
    else:
        dp_s = float(np.sum(comm.reduce_scatter_time_s(per_layer_params * g_bytes, dp_link)))
        if zero < 3:
            dp_s += float(np.sum(comm.all_gather_time_s(per_layer_params * e, dp_link)))
        else:
            # ZeRO-3 / FSDP gathers each layer's weights for every micro-batch's forward and again
            # for its backward (ZeRO section 7.2.2; FSDP reshard_after_forward=True).
            dp_s += 2 * m * float(np.sum(comm.all_gather_time_s(per_layer_params * e, dp_link)))
    return dp_s / dev.efficiency.dp_collective


def shard_copy_s(params_dev, e: int, g_bytes: int, zero, m, dev):
    """Host copies around a sharded-data-parallel framework's collectives (Efficiency.shard_copy_ns_per_byte):
    every gathered weight byte and every reduce-scattered gradient byte, with dp_sync_s's gather count
    (ZeRO-3: 2 per micro-batch, ZeRO-2: 1 per step), not overlapped. 0 below ZeRO-2."""
    gathers = np.where(zero == 3, 2 * m, 1)
    copied = params_dev * (gathers * e + g_bytes)
    return np.where(zero >= 2, copied * dev.efficiency.shard_copy_ns_per_byte * 1e-9, 0.0)


def estimate(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan) -> Estimate:
    n = plan.devices
    if n != cluster.device_count:
        raise BadInput(f"plan uses dp*tp*pp*cp = {plan.dp}*{plan.tp}*{plan.pp}*{plan.cp} = {n} devices, "
                       f"cluster {cluster.name} has {cluster.device_count}")
    _check_expert_parallel(model, plan)
    _check_context_parallel(model, plan)
    if workload.global_batch % (plan.mbs * plan.dp):
        raise BadInput(f"global batch {workload.global_batch} is not divisible by mbs*dp = "
                       f"{plan.mbs}*{plan.dp}")
    dev = cluster.devices[0].device
    dtype = workload.dtype
    e = DTYPE_BYTES[dtype] if dtype != "fp8" else 2  # fp8 GEMMs keep bf16 activations between kernels
    b, s, m = plan.mbs, workload.seq_len, plan.microbatches(workload)
    _check_seq_chunks(model, plan, s)
    # Sequence-chunked pipeline: every per-micro-batch term below is per work item, one chunk of s/n tokens
    # of the micro-batch's sequences, and a step runs m*n items (TeraPipe, Li et al. 2021 section 3).
    s, items = s // plan.seq_chunks, m * plan.seq_chunks
    tp, cp = plan.tp, plan.cp
    stage_size = tp * cp * plan.dp

    tp_link = _link(cluster, 0, 1, tp)
    cp_link = _link(cluster, 0, tp, cp)
    # Gradients are reduced, and ZeRO shards states, over dp x cp ranks: context-parallel ranks hold the
    # same weights (Megatron's data-parallel group "with cp").
    grad_ranks = plan.dp * cp
    dp_link = _link(cluster, 0, tp, grad_ranks)
    # Megatron lays the expert grid out as [expert-data][expert][expert-tensor] over the dp x cp x tp ranks
    # of a stage: the ranks of one expert-parallel group sit etp apart.
    ep_link = _link(cluster, 0, plan.etp or tp, plan.ep) if plan.ep > 1 else None
    # Several device types, or a plan that places its stages: each stage on its own devices and profile
    # (planner/hetero/stages.py); None keeps the homogeneous path below unchanged.
    layout = stage_layout(cluster, plan, dtype)
    if layout is not None:
        dev = layout.devices[0]
        tp_link, cp_link, dp_link, ep_link = stage_links(cluster, layout, 0, plan)

    st = _structure(model, plan)
    chunks = st.chunks
    host = cluster.nodes[0].host_link
    ctx = _Ctx(b=b, s=s, tp=tp, cp=cp, e=e, dev=dev, dtype=dtype, plan=plan, tp_link=tp_link,
               cp_link=cp_link, ep_link=ep_link, moe_routing=(workload.moe_imbalance, workload.moe_capacity_factor),
               host_bytes_per_s=None if host is None else host.bytes_per_s,
               e_act=2 if workload.dtype != "fp32" else 4, seq_chunks=plan.seq_chunks)
    factors = _attention_factors(workload, plan)
    if factors is not None:
        # documents: every replica's micro-batches run at the slowest replica's attention (they meet at the
        # gradient reduction), or at the pool's balanced share (DistCA); FLOPs count the work done
        ctx = dataclasses.replace(ctx, attention_scale=factors.pooled if plan.attention_pool else factors.straggler,
                                  attention_flops_scale=factors.mean)
    if plan.attention_pool:  # the pool spans every device of the plan
        ctx = dataclasses.replace(ctx, pool_link=_link(cluster, 0, 1, n))
    # Per chunk, the sums over its layers of each layer step's terms. cumsum adds along a row one element
    # after the other, as the loop `f += one.fwd_s` over the chunk's layers did, so the sums are the same
    # floats; the padding adds 0.0, which changes nothing.
    vals = np.zeros((len(st.reps) + 1, 4 + len(_PARTS)))
    for i, one in enumerate(_steps(model, cluster, st, ctx, () if layout is None else (layout.groups[0], dev.name))):
        vals[i] = (one.fwd_s, one.bwd_s, *(one.parts[k] for k in _PARTS), one.flops_model, one.flops_hw)
    per_layer_vals = vals[st.idx]  # (chunks, longest chunk, 4 + parts)
    if layout is not None:  # the other stages' chunks on their own devices and links
        per_layer_vals = per_layer_vals.copy()
        for stage in range(1, plan.pp):
            s_tp, s_cp, _, s_ep = stage_links(cluster, layout, stage, plan)
            s_ctx = dataclasses.replace(ctx, dev=layout.devices[stage], tp_link=s_tp, cp_link=s_cp, ep_link=s_ep)
            s_vals = np.zeros_like(vals)
            key = (layout.groups[stage], layout.devices[stage].name)
            for i, one in enumerate(_steps(model, cluster, st, s_ctx, key)):
                s_vals[i] = (one.fwd_s, one.bwd_s, *(one.parts[k] for k in _PARTS), one.flops_model, one.flops_hw)
            rows = [c for c in range(len(chunks)) if c % plan.pp == stage]
            per_layer_vals[rows] = s_vals[st.idx[rows]]
    sums = np.cumsum(per_layer_vals, axis=1)[:, -1, :].tolist()
    fwd_s = [row[0] for row in sums]
    bwd_s = [row[1] for row in sums]
    per_chunk = [dict(zip(_PARTS, row[2:2 + len(_PARTS)])) for row in sums]
    # FLOPs: one running sum over every layer of every chunk, in chunk order
    chunk_flops_model = float(np.cumsum(per_layer_vals[:, :, -2].reshape(-1))[-1])
    chunk_flops_hw = float(np.cumsum(per_layer_vals[:, :, -1].reshape(-1))[-1])

    # Pipeline: activations cross each stage boundary once per micro-batch each way (Narayanan 2021 3.2);
    # with sequence parallel (scatter/gather) each tp rank sends 1/tp of them.
    p2p_s = 0.0
    if plan.pp > 1:
        nbytes = b * s / cp * model.layers[0].hidden * e / (tp if plan.sp else 1)
        if layout is None:
            p2p_s = float(pipeline_p2p_s(cluster, plan.pp, stage_size, nbytes, p2p=_p2p_cached(cluster)))
        else:  # every rank pair of each boundary at once, sharing NICs and island gateways
            p2p_s = float(max(boundary_p2p_s(cluster, layout, k, nbytes, p2p=_p2p_cached(cluster))
                              for k in range(plan.pp)))
    # simulate_times: simulate's timing without its event list, equal field for field (estimate reads no
    # events)
    pipe = pipeline.simulate_times(plan.schedule, fwd_s, bwd_s, m, v=plan.vpp, p2p_s=p2p_s,
                                   seq_chunks=plan.seq_chunks)

    # Data parallel gradient reduction and ZeRO traffic over the dp group. One collective per layer
    # (Megatron and DDP reduce in buckets of about a layer's size), so the per-collective latency of a
    # ring over many ranks counts as often as it is paid.
    # Parameters per device of each trainable shape (layers with one shape_key hold the same), summed per
    # stage over its trainable layers in chunk order, as sum() over the layers did.
    sharded = [float(layer.params_per_device(tp=tp, ep=plan.ep, etp=plan.etp)) for layer in st.shapes]
    stage_params = [sum(sharded[i] for i in ls) for ls in st.train_shape]
    worst = int(np.argmax(stage_params))
    if layout is not None:  # the busiest stage's gradient traffic, over its own dp group, on its device
        dp_link = stage_links(cluster, layout, worst, plan)[2]
        dev = layout.devices[worst]
    per_layer = np.array([sharded[i] for i in st.train_shape[worst]] or [0.0])
    params_dev = float(per_layer.sum())
    g_bytes = 4 if workload.grad_dtype == "fp32" else 2
    edp = expert_data_parallel(plan)
    if plan.ep * (plan.etp or tp) != tp and layout is None:
        # routed experts reduce (and, under ZeRO, gather) over their own expert-data-parallel group: the
        # ranks ep*etp apart in the stage (Megatron parallel_state.py), the rest over dp x cp
        routed = np.array([float(st.shapes[i].routed_params()) / (plan.ep * (plan.etp or tp))
                           for i in st.train_shape[worst]] or [0.0])
        dp_s = dp_sync_s(per_layer - routed, g_bytes, e, plan.zero, items, dp_link, dev) if grad_ranks > 1 else 0.0
        if edp > 1:
            dp_s += dp_sync_s(routed, g_bytes, e, plan.zero, items, _link(cluster, 0, plan.ep * (plan.etp or tp), edp),
                              dev)
    else:
        dp_s = dp_sync_s(per_layer, g_bytes, e, plan.zero, items, dp_link, dev) if grad_ranks > 1 else 0.0
    stage_busy = float(pipe.busy_s[worst]) if plan.pp > 1 else float(pipe.step_time_s)
    hide = dev.efficiency.comm_overlap
    if plan.zero == 3:
        # FSDP prefetches the next layer's gather during this layer's compute: only what compute cannot
        # cover, and the first gather and last reduce-scatter, stay exposed.
        dp_exposed = max(dp_s - hide * stage_busy, EXPOSED_TAIL_FRACTION * dp_s)
    elif plan.overlap_grad_reduce:
        last_bwd = sum(bwd_s[c] for c in range(len(chunks)) if c % plan.pp == worst)
        dp_exposed = max(dp_s - hide * last_bwd, EXPOSED_TAIL_FRACTION * dp_s)
    else:
        dp_exposed = dp_s
    if grad_ranks > 1:
        dp_exposed += shard_copy_s(params_dev, e, g_bytes, plan.zero, items, dev)

    # Optimizer step: AdamW streams fp32 master weights, gradients and two moments (read and write).
    owned = params_dev / (grad_ranks if plan.zero >= 1 else 1)
    on_device = owned * (1 - plan.offload.optimizer)
    opt_s = on_device * 32 / (dev.memory_bandwidth_bytes_per_s * dev.efficiency.memory)
    if layout is not None:  # every stage steps its own optimizer at once: the slowest one counts
        opt_s = max(p / (grad_ranks if plan.zero >= 1 else 1) * (1 - plan.offload.optimizer) * 32
                    / (d.memory_bandwidth_bytes_per_s * d.efficiency.memory)
                    for p, d in zip(stage_params, layout.devices))
    offload_s = _offload_time_s(cluster, plan, owned, e, g_bytes, stage_busy)

    step = pipe.step_time_s + dp_exposed + opt_s + offload_s
    tokens = workload.global_batch * workload.seq_len
    # FLOPs are per device of one pipeline chunk; a step runs m micro-batches (m*n items) on tp*cp*dp devices
    # per stage.
    flops_model = chunk_flops_model * items * tp * cp * plan.dp
    flops_hw = chunk_flops_hw * items * tp * cp * plan.dp
    peak = dev.peak_flops(dtype) * n
    if layout is not None:
        peak = sum(cluster.devices[i].device.peak_flops(dtype) for g in layout.groups for i in g)
    mfu = flops_model / (step * peak)
    hfu = flops_hw / (step * peak)

    # routed-expert parameters per stage: their states shard over the expert-data-parallel ranks
    expert = [float(layer.routed_params()) / (plan.ep * (plan.etp or tp)) for layer in st.shapes]
    stage_expert = [sum(expert[i] for i in ls) for ls in st.train_shape]
    mem = _memory(model, st, workload, plan, pipe, params_dev, stage_params, dev, stage_expert)
    # The breakdown describes the busiest pipeline stage: its per-micro-batch parts times m, plus the
    # step-level terms. compute_s excludes recompute, which has its own line.
    busiest = int(np.argmax(pipe.busy_s))
    stage_parts = {k: items * sum(per_chunk[c][k] for c in range(len(chunks)) if c % plan.pp == busiest)
                   for k in per_chunk[0]}
    breakdown_out = {
        "compute_s": stage_parts["compute_s"],
        "recompute_s": stage_parts["recompute_s"],
        "tp_comm_s": stage_parts["tp_comm_s"],
        "cp_comm_s": stage_parts["cp_comm_s"],
        "ep_comm_s": stage_parts["ep_comm_s"],
        "act_offload_s": stage_parts["act_offload_s"],
        "attn_pool_s": stage_parts["attn_pool_s"],
        "pp_comm_s": 2 * items * plan.vpp * p2p_s if plan.pp > 1 else 0.0,
        "pipeline_bubble_s": pipe.bubble_s,
        "dp_comm_exposed_s": dp_exposed,
        "optimizer_s": opt_s,
        "offload_s": offload_s,
    }
    fits = mem["total_bytes"] <= dev.memory_bytes
    capacity = dev.memory_bytes
    if layout is not None:  # each stage against its own smallest device; report the tightest stage
        tight = max(range(plan.pp), key=lambda i: mem["stages"][i]["total_bytes"] / layout.capacity_bytes[i])
        fits = all(mem["stages"][i]["total_bytes"] <= layout.capacity_bytes[i] for i in range(plan.pp))
        mem = {**mem["stages"][tight], "stages": mem["stages"]}
        capacity, dev = layout.capacity_bytes[tight], layout.devices[tight]
    why = _why(breakdown_out, step, fits, mem, dev)
    if fits and cp > 1:
        # why context parallel: each rank keeps s/cp tokens' activations and does 1/cp of the s^2 attention
        why += (f"; cp {cp} ({'Ulysses all-to-all' if plan.cp_comm == 'a2a' else 'ring'}) gives each GPU "
                f"{workload.seq_len // cp} of the {workload.seq_len} tokens: {mem['activations_bytes'] / 1e9:.1f} GB "
                f"of activations, which "
                f"cp 1 would multiply by {cp}, and 1/{cp} of the quadratic attention")
    if fits and factors is not None:
        # why (not) pool the attention: the slowest replica's documents against the balanced share
        why += (f"; documents (mean {workload.documents.mean_tokens} tokens): attention runs at "
                f"{factors.straggler / factors.mean:.2f}x the mean replica's work on the slowest of {plan.dp} "
                f"replicas" + (f", {factors.pooled / factors.mean:.2f}x pooled (DistCA)" if plan.attention_pool
                               else ""))
    if fits and plan.seq_chunks > 1:
        # why chunk the sequence: n times more, smaller work items fill and drain the pipeline (its bubble
        # (p-1)/(m n + p-1) of the step), at the price of the K/V kept for later chunks
        why += (f"; seq_chunks {plan.seq_chunks}: {m} micro-batch{'es' if m > 1 else ''} run as {items} chunks of "
                f"{s} tokens through {plan.pp} stages (bubble {pipe.bubble_s / pipe.step_time_s:.0%} of the "
                f"pipeline), {mem['seq_chunk_kv_bytes'] / 1e9:.1f} GB of K/V kept for later chunks")
    if fits and plan.moe_dispatch == "tp_slice":
        # why Pipeline MoE: its only MoE traffic is the TP group's all-reduce, usually inside a node
        n_exp = max(layer.experts for layer in model.layers if layer.kind == "moe")
        why += (f"; MoE tp_slice (Pipeline MoE): {n_exp // tp} of {n_exp} experts whole on each of the {tp} TP "
                f"ranks, tokens picked by index and combined by the TP all-reduce, no expert all-to-all")
    return Estimate(
        step_time_s=step, tokens_per_s=tokens / step, mfu=mfu, hfu=hfu,
        peak_memory_bytes=mem["total_bytes"], memory_capacity_bytes=capacity, fits=fits,
        breakdown=breakdown_out, memory={k: v for k, v in mem.items() if k != "stages"},
        stages=[{"stage": i, "fwd_s": fwd_s[i], "bwd_s": bwd_s[i], **mem["stages"][i]}
                for i in range(min(plan.pp, len(fwd_s)))],
        why=why)


def expert_data_parallel(plan: ParallelPlan) -> int:
    """EDP = dp*cp*tp / (ep*etp): the ranks that hold the same experts (Megatron parallel_state.py; MoE
    Parallel Folding, formulas.md section 6)."""
    return plan.dp * plan.cp * plan.tp // (plan.ep * (plan.etp or plan.tp))


def _memory(model, st: _Structure, workload, plan, pipe, params_dev, stage_params, dev, stage_expert=None) -> dict:
    e_w = 2 if workload.dtype in ("bf16", "fp16", "fp8") else 4
    e_act = 2 if workload.dtype != "fp32" else 4
    g = 4 if workload.grad_dtype == "fp32" else 2
    cache = _cache_for(_BY_MODEL, model)
    # activation bytes of each (shape, policy) of the structure, cached per model (its layers stay alive
    # with it, so their ids are stable): they depend on nothing but these arguments
    tp_slice = plan.moe_dispatch == "tp_slice"
    s_item = workload.seq_len // plan.seq_chunks  # tokens of one work item (ParallelPlan.seq_chunks)
    act_args = (plan.mbs, s_item, plan.tp, plan.cp, plan.sp, e_act, plan.flash_attention, tp_slice)
    def act(layer, policy):
        key = ("act", id(layer), policy, act_args)
        hit = cache.get(key)
        if hit is None:
            # a tp_slice MoE layer keeps its replicated input's activations whole (moe.layer_sp)
            hit = cache[key] = float(layer.activation_bytes(
                plan.mbs, s_item, plan.tp, plan.cp, moe.layer_sp(layer.kind, plan.sp, tp_slice), policy,
                e_act, flash=plan.flash_attention))
        return hit

    act_of = [act(layer, policy) for layer, policy in st.reps]
    act_none = [act(layer, "none") for layer, _ in st.reps]  # what each layer materialises in its backward
    kv_of = [0.0] * len(st.reps)  # one chunk's K/V per layer, when the sequence runs in chunks
    ring_memo: dict = {}

    def ring_of(k):  # a chunk's ring pass: its own queries, its whole prefix's K/V (the last chunk's: s)
        if k not in ring_memo:
            ring_memo[k] = float(longctx.ring_forward_buffers_bytes(st.reps[k][0], plan.mbs, s_item, workload.seq_len,
                                                                    plan.tp, plan.cp, e_act))
        return ring_memo[k]
    if plan.seq_chunks > 1:
        kv_of = [float(longctx.chunk_kv_bytes(layer, plan.mbs, s_item, plan.tp, plan.cp, e_act))
                 for layer, _ in st.reps]
    work_of: dict = {}  # backward working set per distinct block (reps indices)
    stages = []
    for stage in range(plan.pp):
        states = memory.model_state_bytes(stage_params[stage], plan.dp * plan.cp, plan.zero, weight_dtype_bytes=e_w,
                                          grad_dtype_bytes=g, optimizer=workload.optimizer)
        edp = expert_data_parallel(plan)
        if stage_expert is not None and stage_expert[stage] > 0 and edp != plan.dp * plan.cp:
            # dense parameters shard over dp x cp, routed experts over EDP (Megatron's expert-data group)
            dense = memory.model_state_bytes(stage_params[stage] - stage_expert[stage], plan.dp * plan.cp,
                                             plan.zero, weight_dtype_bytes=e_w, grad_dtype_bytes=g,
                                             optimizer=workload.optimizer)
            routed = memory.model_state_bytes(stage_expert[stage], edp, plan.zero, weight_dtype_bytes=e_w,
                                              grad_dtype_bytes=g, optimizer=workload.optimizer)
            states = {k: dense[k] + routed[k] for k in ("weights", "gradients", "optimizer")}
        frozen = sum(float(layer.params_per_device(tp=plan.tp)) * e_w for layer in st.frozen[stage])
        act_one = 0.0
        for k in st.acts[stage]:
            act_one += act_of[k]
        inflight = pipe.peak_inflight[stage] / plan.vpp if plan.vpp > 1 else pipe.peak_inflight[stage]
        acts = act_one * inflight * (1 - plan.offload.activations)
        # chunked sequences: K/V later chunks read and dK/dV earlier ones wait for (longctx.seq_chunk_kv_bytes)
        kv = 0.0
        if plan.seq_chunks > 1:
            for k in st.acts[stage]:
                share = 1.0 if st.reps[k][1] == "full" else plan.offload.activations
                kv += longctx.seq_chunk_kv_bytes(kv_of[k], inflight, plan.seq_chunks, share)
        # the block in backward: re-materialised activations and activation gradients, once per stage, on
        # the device whatever is offloaded (memory.backward_working_bytes)
        working = 0.0
        for blk in st.blocks[stage]:
            hit = work_of.get(blk)
            if hit is None:
                hit = work_of[blk] = float(memory.backward_working_bytes([act_none[k] for k in blk],
                                                                         [act_of[k] for k in blk]))
            working = max(working, hit)
        # ring context parallelism: one attention forward's retained K/V, partial outputs and LSEs
        # (longctx.ring_forward_buffers_bytes), freed before the backward's working set is built: only what
        # exceeds that working set adds to the peak
        ring = 0.0
        for k in (st.acts[stage] if plan.cp > 1 and plan.cp_comm == "ring" else ()):
            ring = max(ring, ring_of(k))
        ring = max(0.0, ring - working)
        # the loss's 16-bit logits copy beside the saved fp32 ones, one micro-batch (Layer.logits_transient_bytes)
        logits = 0.0
        for layer in st.heads[stage]:
            logits += float(layer.logits_transient_bytes(plan.mbs, s_item, plan.tp, plan.cp, e_act))
        opt = states["optimizer"] * (1 - plan.offload.optimizer)
        subtotal = states["weights"] + states["gradients"] + opt + frozen + acts + working + logits + kv + ring
        overhead = memory.allocator_overhead_bytes(subtotal)
        stages.append({"weights_bytes": states["weights"] + frozen, "gradients_bytes": states["gradients"],
                       "optimizer_bytes": opt, "activations_bytes": acts, "backward_working_bytes": working,
                       "logits_transient_bytes": logits, "seq_chunk_kv_bytes": kv, "cp_ring_buffers_bytes": ring,
                       "overhead_bytes": overhead,
                       "total_bytes": subtotal + overhead})
    worst = max(stages, key=lambda d: d["total_bytes"])
    return {**worst, "stages": stages}


def _why(bd: dict, step: float, fits: bool, mem: dict, dev) -> str:
    if not fits:
        return (f"does not fit: needs {mem['total_bytes'] / 1e9:.1f} GB per device, has "
                f"{dev.memory_bytes / 1e9:.0f} GB")
    top = max(bd.items(), key=lambda kv: kv[1])
    names = {"compute_s": "compute", "pipeline_bubble_s": "pipeline bubble", "tp_comm_s": "TP communication",
             "dp_comm_exposed_s": "exposed DP communication", "ep_comm_s": "expert all-to-all",
             "cp_comm_s": "context-parallel communication", "optimizer_s": "optimizer step",
             "recompute_s": "recomputation", "pp_comm_s": "pipeline transfers", "offload_s": "offload",
             "act_offload_s": "activation offload", "attn_pool_s": "attention pool transfers"}
    return f"limited by {names.get(top[0], top[0])} ({top[1] / step:.0%} of the step)"
