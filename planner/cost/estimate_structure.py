"""How a model lies over a plan's pipeline: which layers each chunk holds, each layer's recompute policy, and
the _Structure estimate() reads off them; with the per-object caches (per model, per cluster) that these and
the other estimate_*.py pieces keep their results in.

Separate from planner/cost/estimate.py because it depends only on the model and the plan's (pp, vpp,
partition, recompute), never on the cluster or the workload: the batch estimate and the search reuse it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.core.errors import BadInput
from planner.core.model import Layer, ModelGraph
from planner.core.plan import ParallelPlan


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
