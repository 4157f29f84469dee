"""How a model lies over a plan's pipeline: which layers each chunk holds (split_chunks), each layer's
recompute policy (policies), and the layer counts the estimate sums with (layer_counts).

They depend only on the model and the plan's (pp, vpp, partition, recompute, recompute_num_layers), never
on the cluster or the workload, so every plan of a search that shares them shares one entry, cached on the
model (ModelGraph._cost_cache). Chunk c runs on stage c % pp (Megatron's interleaved order; pp * vpp chunks).
"""
from __future__ import annotations

import numpy as np

from planner.core.dims import RECOMPUTE_POLICIES as POLICIES
from planner.core.errors import BadInput
from planner.core.model import Layer, ModelGraph
from planner.core.plan import ParallelPlan


def partition_key(plan: ParallelPlan):
    """The plan's explicit partition as a hashable tuple of block ranges, or None for the even split."""
    return None if plan.partition is None else tuple(tuple(a.layers) for a in plan.partition)


def split_chunks(graph: ModelGraph, plan: ParallelPlan) -> list[list[Layer]]:
    """Layers of each pipeline chunk, in pipeline order (pp * vpp chunks; chunk c runs on stage c % pp).

    Layers outside the transformer blocks go to the chunk of the block they feed: embedding and frozen
    encoders to the first chunk, final norm and head to the last.
    """
    # fresh lists: callers may change them; the cached split stays as it was
    return [list(c) for c in chunks_of(graph, plan.pp, plan.vpp, partition_key(plan))]


def chunks_of(graph: ModelGraph, pp: int, vpp: int, partition) -> tuple[tuple[Layer, ...], ...]:
    """split_chunks for (pp, vpp, partition key), cached per model; refusals are not cached."""
    cache = graph._cost_cache
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
    out: list[list[Layer]] = [[] for _ in range(chunks_n)]
    seen_block = False
    for layer in _topological(graph):
        if layer.block is not None:
            seen_block = True
            out[chunk_of_block[layer.block]].append(layer)
        else:
            out[chunks_n - 1 if seen_block else 0].append(layer)
    return out


def policies(layers: list[Layer], plan: ParallelPlan) -> dict[str, str]:
    """Recompute policy of each layer of one chunk: by its block's position in the chunk."""
    order = []
    for layer in layers:
        if layer.block is not None and layer.block not in order:
            order.append(layer.block)
    pos = {blk: i for i, blk in enumerate(order)}
    return {layer.name: plan.layer_recompute(pos[layer.block]) if layer.block is not None else
            ("none" if plan.recompute == "full" and plan.recompute_num_layers is not None else plan.recompute)
            for layer in layers}


def shape_index(model: ModelGraph) -> tuple[dict, list]:
    """The model's distinct layer shapes ({shape_key: index}, first layer of each): identical layers cost
    the same, so every per-layer value is computed once per shape."""
    cache = model._cost_cache
    hit = cache.get("shapes")
    if hit is None:
        shape_of: dict = {}
        shapes: list = []
        for layer in model.layers:
            if layer.shape_key not in shape_of:
                shape_of[layer.shape_key] = len(shapes)
                shapes.append(layer)
        hit = cache["shapes"] = (shape_of, shapes)
    return hit


def layer_counts(model: ModelGraph, pp: int, vpp: int, rc: int, rnl: int, partition=None) -> dict:
    """Layer counts of a chunk layout, by (shape, policy), cached per model: per chunk `K` (chunks, shapes x
    3 policies) and per stage (chunk c on stage c % pp): `Kst` all layers by policy, `Tst` trainable
    layers, `Fst` frozen ones, `Lst` all layers; `Kall` / `Ktot` over every chunk; `sigs`: per stage, its
    distinct transformer blocks as the (shape, policy) of their trainable layers in layer order (the
    backward working set is the largest block's). rc indexes POLICIES; rnl -1 means every block."""
    cache = model._cost_cache
    key = ("counts", pp, vpp, rc, rnl, partition)
    hit = cache.get(key)
    if hit is not None:
        return hit
    shape_of, shapes = shape_index(model)
    S = len(shapes)
    chunks = chunks_of(model, pp, vpp, partition)
    C = len(chunks)
    mode_plan = ParallelPlan.model_construct(recompute=POLICIES[rc], recompute_num_layers=None if rnl < 0 else rnl)
    K = np.zeros((C, S, 3))
    T = np.zeros((C, S))
    Fz = np.zeros((C, S))
    sigs: list = [[] for _ in range(pp)]
    for c, layers in enumerate(chunks):
        pol = policies(list(layers), mode_plan)
        blocks: dict = {}
        for layer in layers:
            si, pi = shape_of[layer.shape_key], POLICIES.index(pol[layer.name])
            K[c, si, pi] += 1
            if layer.trainable:
                T[c, si] += 1
                if layer.block is not None:
                    blocks.setdefault(layer.block, []).append((si, pi))
            else:
                Fz[c, si] += 1
        for sig in map(tuple, blocks.values()):
            if sig not in sigs[c % pp]:
                sigs[c % pp].append(sig)
    onehot = np.zeros((pp, C))
    onehot[np.arange(C) % pp, np.arange(C)] = 1.0
    Kf = K.reshape(C, S * 3)
    hit = dict(C=C, K=Kf, Kst=onehot @ Kf, Tst=onehot @ T, Fst=onehot @ Fz, Kall=K.sum(axis=(0, 2)),
               Ktot=Kf.sum(axis=0), Lst=onehot @ K.sum(axis=2), sigs=sigs)
    if len(cache) > 4096:
        kept = {k: cache[k] for k in ("owner", "serial")}
        cache.clear()
        cache.update(kept)
    cache[key] = hit
    return hit
