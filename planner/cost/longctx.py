"""Long-context terms: all-to-all (Ulysses) context parallelism, activation offload to host memory, and the
K/V that sequence-chunked pipelines keep and circulate.

Pure functions; sizes may be numpy arrays. Bytes are what one device sends, per layer, per micro-batch, per
pass (forward or backward), as comm.all_to_all_time_s takes them.
"""
from __future__ import annotations

import numpy as np


def ulysses_a2a_bytes(b, s, heads: int, kv_heads: int, head_dim: int, cp, tp, dtype_bytes):
    """DeepSpeed-Ulysses bytes one rank hands to all-to-alls in one pass of one attention layer.

    Before the core, Q, K and V of the rank's s/cp tokens are re-sharded to all s tokens of heads/cp heads;
    after it the output goes back: (a + 2 kv) d + a d elements per token, over the rank's tp share of the
    heads (Jacobs et al. 2023 section 3.2: 4Nh per layer for MHA, 4Nh/P per link). The backward pass moves
    the same volume of gradients. With GQA and kv < cp, K/V heads are replicated to cp (Δ)."""
    c = np.asarray(cp, dtype=float)
    kv = np.maximum(kv_heads, c)
    per_token = (2 * heads + 2 * kv) * head_dim / np.asarray(tp, dtype=float)
    out = np.asarray(b, dtype=float) * np.asarray(s, dtype=float) / c * per_token * dtype_bytes
    return float(out) if np.ndim(out) == 0 else out


def offload_exposed_s(nbytes, host_bytes_per_s: float, overlap_s):
    """Exposed time of a host transfer that runs beside `overlap_s` of compute on its own copy engine:
    max(0, bytes / B_host - overlap) (docs/formulas.md#memory-offload, Δ; Megatron fine-grained activation offloading and
    SPPO overlap D2H / H2D with the layer's compute)."""
    t = np.asarray(nbytes, dtype=float) / host_bytes_per_s - np.asarray(overlap_s, dtype=float)
    out = np.maximum(t, 0.0)
    return float(out) if np.ndim(out) == 0 else out


# ----------------------------------------------------------------------------------------------------------
# sequence-chunked pipelines (TeraPipe, Li et al. 2021; Seq1F1B, Sun et al. 2024; SPPO, Chen et al. 2025)


def chunk_kv_bytes(layer, b, s_chunk, tp, cp, dtype_bytes):
    """K and V of one sequence chunk (b sequences of s_chunk tokens) of one attention layer on one device:
    b s_chunk/cp tokens x 2 kv_heads d / tp elements (MLA: the up-projected keys and values the core reads,
    heads (d_nope + d_rope + d_v)); 0 for other layers. With Ulysses the rank holds every token of 1/cp of
    the heads instead: the same bytes (GQA replication below cp ignored, Δ)."""
    if layer.kind not in ("attention", "encoder") or not layer.trainable:
        return 0 * b
    if layer.mla is not None:
        m = layer.mla
        width = layer.heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    else:
        width = 2 * (layer.kv_heads or layer.heads) * layer.head_dim
    return layer.tokens(b, s_chunk) / cp * width / tp * dtype_bytes


def ring_chunk_factor(seq_chunks):
    """K/V a ring-attention pass of the mean sequence chunk circulates, over an isolated chunk's: chunk i's
    queries meet the K/V of chunks 0..i, (i + 1) chunks, spread over the cp ranks; the mean over i of n
    chunks is (n + 1) / 2 (Δ: ours; each chunk runs its own ring pass over its prefix, as Megatron's ring
    would on a sequence that long). 1 for an unchunked sequence."""
    return (np.asarray(seq_chunks, dtype=float) + 1) / 2


def seq_chunk_kv_bytes(kv_chunk, inflight_chunks, seq_chunks, off_device_share):
    """Device bytes a layer holds beyond its chunks' saved activations when a sequence runs as n chunks
    through the pipeline (Δ: ours, from the dependencies TeraPipe section 3 describes):
      retained K/V   later chunks' forward (and its recompute in backward) read the K/V of every earlier
                     chunk of the sequence, so what the saved activations do not hold on the device -- all of
                     it under full recompute (only the block input is saved), the offloaded share otherwise
                     (off_device_share) -- stays anyway, for every chunk in flight: kv_chunk x inflight x share;
      dK/dV          a chunk's backward adds into the K/V gradients of every earlier chunk, which wait for
                     those chunks' own backward (last chunk first): kv_chunk x (n - 1) at the start of a
                     sequence's backward, once per stage.
    Neither is offloaded: every later chunk reads them. 0 for n = 1."""
    n = np.asarray(seq_chunks, dtype=float)
    on = n > 1
    retained = np.where(on, kv_chunk * np.asarray(inflight_chunks, dtype=float) * off_device_share, 0.0)
    out = retained + np.where(on, kv_chunk * (n - 1), 0.0)
    return float(out) if np.ndim(out) == 0 else out


# ----------------------------------------------------------------------------------------------------------
# ring context parallelism: what the forward of one attention layer holds while it runs


def ring_forward_buffers_bytes(layer, b, q_tokens, kv_tokens, tp, cp, dtype_bytes):
    """Transient bytes of one attention layer's ring (p2p) context-parallel forward on one device, as Megatron
    runs it through Transformer Engine (AttnFuncWithCPAndKVP2P.forward, transformer_engine/pytorch/attention/
    dot_product_attention/context_parallel.py): every step's K/V receive buffer stays referenced until the
    forward returns (a new `p2p_comm_buffers[i + 1]` per step), and so does every step's partial output and
    log-sum-exp (`out_per_step`, `softmax_lse_per_step`), merged after the last step into an fp32 output.
    TE pull request 2916 ("Reduce P2P forward peak memory: O(C) -> O(1)", open) and 1208 ("the original
    implementation saves each attention layer's whole K, V") describe the same retention. So at the end of
    the loop a rank holds cp blocks of K/V, i.e. the K/V of all kv_tokens, and, on the last rank (whose steps
    all see its whole query block), cp partial outputs of its q_tokens/cp queries:
      b kv_tokens 2 kv_heads d / tp x e          K/V of every step
      b q_tokens (a d e + 4 a) / tp              bf16 partial outputs and fp32 LSE of every step
      b q_tokens/cp a d 4 / tp                   the fp32 merged output
    q_tokens = kv_tokens = s unchunked; a sequence chunk's pass has its own queries and its whole prefix's K/V.
    Freed when the layer's forward returns: a transient beside the saved activations, once per stage (Δ: ours
    how it meets the backward working set, estimate._stage_memory). 0 for other layers and cp = 1."""
    if layer.kind not in ("attention", "encoder") or not layer.trainable:
        return 0 * b
    a, d = layer.heads, layer.head_dim
    if layer.mla is not None:  # the up-projected K and V the core reads (as chunk_kv_bytes)
        m = layer.mla
        kv_width, out_width = a * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim), a * m.v_head_dim
    else:
        kv_width, out_width = 2 * (layer.kv_heads or a) * d, a * d
    c = np.asarray(cp, dtype=float)
    kv = b * np.asarray(kv_tokens, dtype=float) * kv_width / tp * dtype_bytes
    outs = b * np.asarray(q_tokens, dtype=float) * (out_width * dtype_bytes + 4 * a) / tp
    merged = b * np.asarray(q_tokens, dtype=float) / c * out_width * 4 / tp
    out = np.where(c > 1, kv + outs + merged, 0.0)
    return float(out) if np.ndim(out) == 0 else out
