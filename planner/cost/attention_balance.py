"""Core attention disaggregation (DistCA-style) for variable-length document batches: the straggler gap.

Each data-parallel replica trains on a packed sequence of S tokens made of documents of varying length, with
a per-document causal mask. Its linear layers (QKV/O projections, MLP) cost the same for every replica (same
token count), but its attention core costs sum_i l_i^2 (causal: half the square, docs/formulas.md#flops-causal), so the
replica holding one long document straggles and every other replica waits for it at the gradient reduction.

  without disaggregation   t_r = T_lin + c_attn * W_r,  W_r = sum over r's documents of l_i^2 / 2
                           gap = max_r t_r - mean_r t_r                           (Δ: our model)
  with disaggregation      attention tasks (query chunks of at most `shard_tokens`, chunk [a, b) of a
                           document costs (b^2 - a^2) / 2) go to a pool of all replicas' devices, longest
                           first to the least loaded (LPT); the linear layers stay where they were, and
                           the Q/K/V and output of every moved chunk travel over the fabric beside compute
                           (DistCA's ping-pong overlap): t_r = T_lin + c_attn * W'_r + max(0, comm_r - T_lin)
                           (Δ: LPT balancing and the exposed-transfer rule are ours, after DistCA's design)

c_attn converts work units (l^2 / 2 token pairs per head-dim column) to seconds with the layer's own
attention_core_flops and the device's attention efficiency; T_lin uses the model's GEMM FLOPs at the matmul
efficiency. All figures are per step over the model's attention layers.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from planner.core.hardware import Device
from planner.core.model import ModelGraph


def sample_documents(total_tokens: int, replicas: int, mean_tokens: float, max_tokens: int,
                     seed: int = 0) -> list[list[int]]:
    """Per replica, document lengths filling exactly `total_tokens` (the last one cut): log-normal lengths
    (sigma 1.5, long-tailed like pre-training corpora) with the given mean, capped at max_tokens. Seeded."""
    rng = np.random.default_rng(seed)
    sigma = 1.5
    mu = np.log(mean_tokens) - sigma ** 2 / 2
    out = []
    for _ in range(replicas):
        docs, left = [], total_tokens
        while left > 0:
            n = int(min(max(1, rng.lognormal(mu, sigma)), max_tokens, left))
            docs.append(n)
            left -= n
        out.append(docs)
    return out


def attention_work(docs) -> float:
    """Causal attention work of a replica's documents: sum l^2 / 2 (token pairs)."""
    return float(sum(n * n for n in docs)) / 2


def shards(docs, shard_tokens: int) -> list[float]:
    """Work of each query chunk [a, b) of each document, (b^2 - a^2) / 2: a causal row attends to its prefix."""
    out = []
    for n in docs:
        for a in range(0, n, shard_tokens):
            b = min(n, a + shard_tokens)
            out.append((b * b - a * a) / 2)
    return out


def lpt(tasks: list[float], bins: int) -> np.ndarray:
    """Longest processing time first onto the least-loaded bin (Graham 1969: within 4/3 of optimal)."""
    heap = [(0.0, i) for i in range(bins)]
    load = np.zeros(bins)
    for w in sorted(tasks, reverse=True):
        lo, i = heapq.heappop(heap)
        load[i] = lo + w
        heapq.heappush(heap, (load[i], i))
    return load


def straggler_gap(model: ModelGraph, device: Device, replica_docs: list[list[int]], link_bytes_per_s: float,
                  shard_tokens: int = 4096, dtype_bytes: int = 2) -> dict:
    """Step time per replica of one forward + backward, and the straggler gap (max - mean), without and with
    core attention disaggregation. `link_bytes_per_s`: each device's bandwidth to the attention pool (its
    NIC)."""
    att = [layer for layer in model.layers if layer.kind == "attention" and layer.trainable]
    if not att:
        raise ValueError(f"model {model.name} has no attention layers to disaggregate")
    eff = device.efficiency
    # seconds per unit of work (one causal token pair, l^2/2 summed): forward core FLOPs of a 1-token pair
    # (attention_core_flops(1, s) = 2 s^2 * per_pos / 2 for causal), forward + 2.5x backward
    # attention_core_flops(1, s) = s^2 * per_pos (causal): per unit of s^2/2 work that is 2 * per_pos FLOPs
    pair_flops = sum(2 * float(layer.attention_core_flops(1, 1)) for layer in att)
    c_attn = pair_flops * 3.5 / (device.peak_flops("bf16") * eff.attention)
    tokens = sum(replica_docs[0])
    lin_flops = 3 * sum(2 * float(m * n * k) for layer in model.layers if layer.trainable
                        for _, m, n, k in layer.gemms(1, 1))
    t_lin = tokens * lin_flops / (device.peak_flops("bf16") * eff.matmul)
    work = np.array([attention_work(d) for d in replica_docs])
    without = t_lin + c_attn * work
    pooled = lpt([w for d in replica_docs for w in shards(d, shard_tokens)], len(replica_docs))
    # every chunk's Q, K, V in and its output back, forward and backward (gradients): 2 x (q + 2 kv + o)
    per_token = sum(2 * (2 * layer.heads + 2 * layer.kv_heads) * layer.head_dim * dtype_bytes for layer in att)
    comm_s = tokens * per_token / link_bytes_per_s
    with_ = t_lin + c_attn * pooled + max(0.0, comm_s - t_lin)
    return {
        "replicas": len(replica_docs), "tokens_per_replica": tokens, "linear_s": t_lin,
        "without_s": without.tolist(), "with_s": with_.tolist(),
        "gap_without_s": float(without.max() - without.mean()), "gap_with_s": float(with_.max() - with_.mean()),
        "step_without_s": float(without.max()), "step_with_s": float(with_.max()),
        "pool_comm_s": comm_s, "longest_document": max(max(d) for d in replica_docs),
    }


# ----------------------------------------------------------------------------------------------------------
# in the cost model: attention work of a step's packed sequences, relative to full causal sequences

SHARD_TOKENS = 4096  # query-chunk granularity of the pooled attention tasks (straggler_gap's default)


@dataclass(frozen=True)
class AttentionFactors:
    """Attention-core work of a step's documents, per sequence, over one whole-sequence causal document
    (s^2 / 2 token pairs): `mean` over all sequences (the work done, for FLOPs); `straggler` the slowest
    data-parallel replica's mean (its sequences sum_i l_i^2 / 2 each; every replica waits for it at the
    gradient reduction); `pooled` the same after the attention tasks of all replicas are balanced over them
    (LPT over query chunks of SHARD_TOKENS; DistCA, arXiv 2510.18121)."""

    mean: float
    straggler: float
    pooled: float


@lru_cache(maxsize=256)
def attention_factors(seq_len: int, global_batch: int, dp: int, mean_tokens: int, max_tokens: int | None,
                      seed: int = 0, shard_tokens: int = SHARD_TOKENS) -> AttentionFactors:
    """AttentionFactors of global_batch sequences of seq_len tokens packed with documents (sample_documents:
    one list per sequence), dealt to dp replicas in order, global_batch / dp consecutive sequences each."""
    docs = sample_documents(seq_len, global_batch, mean_tokens, max_tokens or seq_len, seed)
    full = seq_len * seq_len / 2
    per_seq = np.array([attention_work(d) for d in docs]) / full
    share = global_batch // dp
    per_replica = per_seq[:share * dp].reshape(dp, share).mean(axis=1)
    pooled = lpt([w for d in docs[:share * dp] for w in shards(d, shard_tokens)], dp) / (share * full)
    return AttentionFactors(mean=float(per_seq.mean()), straggler=float(per_replica.max()),
                            pooled=float(pooled.max()))


def pool_width(layer) -> int:
    """Elements per token an attention core sends to the pool and gets back: Q, K, V in and the output out
    (straggler_gap's 2a + 2kv head widths; MLA: its up-projected queries, keys and values, and output)."""
    if layer.mla is not None:
        m = layer.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        return layer.heads * (qk + qk + m.v_head_dim + m.v_head_dim)
    return (2 * layer.heads + 2 * (layer.kv_heads or layer.heads)) * layer.head_dim
