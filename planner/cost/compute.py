"""Compute time of one layer for one micro-batch on one device.

Each GEMM runs at the slower of its compute roof and its memory roof (the roofline model, Williams et al.
2009): a small GEMM after a wide tp split moves more bytes per FLOP and falls below the matmul peak, which
is how "small GEMMs run far below peak" enters without a fitted curve per shape. The attention core runs at
a FlashAttention efficiency; norms, activations, residual adds and rotary embeddings are memory-bound
and run at HBM bandwidth. Every kernel pays a launch overhead and every layer a framework overhead: the
terms that dominate the small vTrain models.

All functions are pure and accept numpy arrays for b, s, tp and cp.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.core.dtypes import BYTES_PER_ELEMENT
from planner.core.hardware import Device
from planner.core.model import Layer, Recompute

# Backward of a GEMM is two GEMMs of the same size (input grad and weight grad): 2x forward FLOPs
# (Narayanan et al. 2021, Appendix). FlashAttention's backward does 2.5x its forward work, recomputing the
# scores (FlashAttention benchmark convention, docs/formulas.md#flops-causal).
ATTENTION_BWD_FACTOR = 2.5
# Memory-bound kernels per sublayer pass (norm, residual add, activation or rotary, dropout/bias):
# counted for launch overhead. Backward launches about twice as many.
ELEMENTWISE_KERNELS = {"attention": 5, "encoder": 9, "mlp": 4, "moe": 8, "head": 3, "embedding": 1}


@dataclass(frozen=True)
class LayerTime:
    """Device time of one layer for one micro-batch, and the host's dispatch floor under it.

    fwd_s and bwd_s are device time only: callers add the communication that runs in the same pass
    and then take `floored`, so that a faster device or link can never make the pass slower.
    """

    fwd_s: object  # float or ndarray
    bwd_s: object
    attention_fwd_s: object  # the attention core alone (what selective recompute repeats)
    fwd_flops: object
    host_fwd_s: object = 0.0  # host dispatch time of the forward's kernels; backward dispatches twice


def floored(device_s, host_s):
    """A pass takes the longer of its device time and its host dispatch time (they overlap)."""
    return np.maximum(device_s, host_s)


def gemm_time_s(m, n, k, device: Device, dtype: str, count=1):
    """`count` (m x k) @ (k x n) GEMMs: the roofline time plus a launch overhead each.

    FP8 GEMMs (Transformer Engine recipe) also cast their bf16 input to fp8 first, a memory-bound pass
    reading 2 and writing 1 byte per input element, and run at the device's fp8 matmul efficiency.
    """
    e = device.efficiency
    nbytes = BYTES_PER_ELEMENT[dtype]
    flops = 2.0 * m * n * k
    moved = nbytes * (m * k + k * n) + min(nbytes * 2, 4) * m * n  # fp8 GEMMs write bf16 outputs
    eff = e.matmul_fp8 if (dtype == "fp8" and e.matmul_fp8 is not None) else e.matmul
    d = np.minimum(np.minimum(m, n), k)
    shape = d / (d + e.gemm_half_dim)
    compute = flops / (device.peak_flops(dtype) * eff * shape)
    memory = moved / (device.memory_bandwidth_bytes_per_s * e.memory)
    t = np.maximum(compute, memory) + e.kernel_overhead_us * 1e-6
    if dtype == "fp8":
        t = t + 3 * m * k / (device.memory_bandwidth_bytes_per_s * e.memory) + e.kernel_overhead_us * 1e-6
    return count * t


def attention_core_time_s(layer: Layer, b, s, device: Device, tp=1, cp=1, flash=True, dtype="bf16"):
    """Forward time of the attention core (QK^T, softmax, AV) on one device.

    FlashAttention runs in 16 bits (fp8 and 16-bit runs: bf16), at a fitted fraction of the bf16 peak; it has
    no fp32 kernel (FlashAttention-2 README: "Datatype fp16 and bf16"), so an fp32 / tf32 run's fused core
    runs at that dtype's peak (PyTorch SDPA's memory-efficient kernel), never above it. Without
    it (Megatron before 2022) QK^T and AV are batched GEMMs, and scale, mask, softmax and dropout each
    read and write the b*a*s^2 score tensor (Korthikanti 2022 section 4.1 counts 2 + 1 + 2 bytes per score
    kept; the kernels that make them move about twice that).
    """
    e = device.efficiency
    flops = layer.attention_core_flops(b, s, tp, cp)
    peak = device.peak_flops(dtype if dtype in ("fp32", "tf32") else "bf16")
    if flash:
        return flops / (peak * e.attention)
    # unfused: the causal half is not skipped
    full = flops * (2.0 if layer.causal else 1.0)
    heads = max(layer.heads, 1) / tp
    s_eff = layer.fixed_tokens if layer.fixed_tokens is not None else s
    scores = b * heads * (s_eff / cp) * s_eff
    compute = full / (peak * e.matmul)
    memory = scores * 2 * (4 + (3 if layer.dropout else 0)) / (device.memory_bandwidth_bytes_per_s * e.memory)
    return compute + memory + 4 * e.kernel_overhead_us * 1e-6


def elementwise_bytes_fwd(layer: Layer, b, s, tp=1, cp=1, sp=False, dtype_bytes=2):
    """Bytes that norms, activations, residual adds and rotary read and write in one forward pass.

    Per token: a norm reads and writes h; a residual add reads 2h and writes h; SwiGLU reads 2f and
    writes f, GELU reads and writes f; rotary reads and writes q and k; the loss reads the fp32 logits
    a few times (softmax, log, gather, and their backward). Tensor-parallel parts divide by tp; the
    norms and residuals divide by tp only under sequence parallelism.
    """
    t = layer.tokens(b, s) / cp
    h = layer.hidden
    rep = tp if sp else 1
    e = dtype_bytes
    total = 0 * t
    if layer.kind in ("attention", "encoder"):
        if layer.mla is None:
            qk = (layer.heads + layer.kv_heads) * layer.head_dim
        else:
            qk = 2 * layer.heads * (layer.mla.qk_nope_head_dim + layer.mla.qk_rope_head_dim)
        total = total + t * (2 * h + 3 * h) * e / rep + t * 2 * qk * e / tp
        if layer.dropout:
            total = total + t * 3 * h * e / rep
    if layer.kind in ("mlp", "encoder", "moe"):
        f = layer.ffn_hidden * (layer.topk if layer.kind == "moe" else 1)
        act = (3 if layer.gated else 2) * f
        total = total + t * (2 * h + 3 * h) * e / rep + t * act * e / tp
        if layer.kind == "moe":
            # permute / unpermute of the dispatched tokens, read and written once each way
            total = total + t * layer.topk * h * e * 4 / tp
            if layer.shared_experts:
                total = total + t * (3 if layer.gated else 2) * layer.shared_ffn_hidden * e / tp
        if layer.dropout:
            total = total + t * 3 * h * e / rep
    if layer.kind == "head":
        total = total + t * 2 * h * e / rep + t * layer.vocab * 4 * 3 / tp
    if layer.kind == "embedding":
        total = total + t * h * e / rep
    return total


def layer_time(layer: Layer, b, s, device: Device, dtype: str = "bf16", tp=1, cp=1, sp=False, ep=1,
               flash=True, etp=1, expert_load=1.0, seq_chunks=1, attention_scale=1.0) -> LayerTime:
    """Forward and backward time of `layer` for one micro-batch on one device (recompute not included).

    etp: expert tensor parallel degree (GEMM shapes only). expert_load: the busiest rank's routed tokens
    over the balanced share (moe.rank_load_factor), scaling its expert GEMM rows. seq_chunks n: `s` is one
    chunk of a sequence split into n (sequence-chunked pipelines), and the result is the mean chunk's:
    the attention core is `chunk_attention_factor` times an isolated chunk's. attention_scale: the attention
    core's time relative to one causal document per sequence (documents of varying length, attention_balance;
    FLOPs are left to the caller), for layers whose tokens follow the sequence."""
    e = device.efficiency
    if layer.kind == "vae":
        flops = layer.flops_fwd(b, s)
        fwd = flops / (device.peak_flops(dtype) * e.matmul)
        return LayerTime(fwd_s=fwd, bwd_s=0.0 * fwd, attention_fwd_s=0.0 * fwd, fwd_flops=flops)
    gemm_fwd = 0.0
    gemm_bwd = 0.0
    local_experts = max(1, layer.experts // ep) if layer.kind == "moe" else 1
    for name, m, n, k in layer.gemms(b, s, tp, cp, etp):
        count = 1
        if name.startswith("expert_"):
            # Each local expert is its own (grouped) GEMM over its share of the routed tokens; the busiest
            # rank's share is expert_load times the balanced one (planner/cost/moe.py).
            count, m = local_experts, m * expert_load / local_experts
        gemm_fwd = gemm_fwd + gemm_time_s(m, n, k, device, dtype, count)
        gemm_bwd = gemm_bwd + gemm_time_s(m, k, n, device, dtype, count) + \
            gemm_time_s(k, n, m, device, dtype, count)
    attn_fwd = (attention_core_time_s(layer, b, s, device, tp, cp, flash, dtype)
                * chunk_attention_factor(layer, seq_chunks))
    if layer.fixed_tokens is None:
        attn_fwd = attn_fwd * attention_scale
    ew_bytes = elementwise_bytes_fwd(layer, b, s, tp, cp, sp, 4 if dtype == "fp32" else 2)
    ew_fwd = ew_bytes / (device.memory_bandwidth_bytes_per_s * e.memory)
    kernels = ELEMENTWISE_KERNELS.get(layer.kind, 2) + (2 if layer.kind in ("attention", "encoder") else 0)
    overhead = kernels * e.kernel_overhead_us * 1e-6 + e.layer_overhead_us * 1e-6
    sp_us = e.tp_dispatch_us if e.sp_dispatch_us is None else e.sp_dispatch_us
    if (e.tp_dispatch_us or sp_us or e.tp_dispatch_ns_per_byte) and layer.kind in ("attention", "mlp", "moe", "encoder", "embedding", "head"):
        # a tensor-parallel framework's host cost per sublayer it splits (Efficiency.tp_dispatch_us, or
        # sp_dispatch_us under sequence parallelism), tp > 1 only; the vocabulary-parallel embedding and
        # head are split too (torchtitan's plan, planner/backends/torch/parallel.py)
        overhead = overhead + (np.asarray(tp) > 1) * np.where(sp, sp_us, e.tp_dispatch_us) * 1e-6
        if e.tp_dispatch_ns_per_byte:
            # ... and its part that grows with the activation the sublayer redistributes (t x h)
            act_bytes = layer.tokens(b, s) / cp * layer.hidden * (4 if dtype == "fp32" else 2)
            overhead = overhead + (np.asarray(tp) > 1) * act_bytes * e.tp_dispatch_ns_per_byte * 1e-9
    fwd = gemm_fwd + attn_fwd + ew_fwd + overhead
    bwd = gemm_bwd + ATTENTION_BWD_FACTOR * attn_fwd + 2 * ew_fwd + 2 * overhead
    if e.grad_accum_ns_per_param:
        # unfused gradient accumulation: every backward adds its weight gradients into .grad (Efficiency)
        bwd = bwd + layer.params_per_device(tp=tp, ep=ep, etp=etp) * e.grad_accum_ns_per_param * 1e-9
    # The host dispatches kernels while the device runs earlier ones: the slower of the two sets the pace.
    n_kernels = kernels + len(layer.gemms(1, 1)) * (local_experts if layer.kind == "moe" else 1) + \
        (0 if flash else 4)
    host_fwd = n_kernels * e.host_dispatch_us * 1e-6
    if not layer.trainable:
        # Frozen layers run forward only (no_grad): nothing to backpropagate into them.
        bwd = 0.0 * fwd
    flops = layer.flops_fwd(b, s, tp, cp)
    if np.any(np.asarray(seq_chunks) > 1):  # the rest of the mean chunk's attention (chunk_attention_factor)
        flops = flops + (chunk_attention_factor(layer, seq_chunks) - 1) * layer.attention_core_flops(b, s, tp, cp)
    return LayerTime(fwd_s=fwd, bwd_s=bwd, attention_fwd_s=attn_fwd + 0.0 * fwd,
                     fwd_flops=flops, host_fwd_s=host_fwd)


def chunk_attention_factor(layer: Layer, seq_chunks):
    """The mean sequence chunk's causal attention core over an isolated chunk's, when a sequence of n chunks
    of c tokens runs chunk by chunk: chunk i's queries attend to i whole earlier chunks and its own causal
    half, c^2 (i + 1/2) pairs; summed over i that is c^2 n^2 / 2, the unchunked (nc)^2 / 2 (TeraPipe, Li et
    al. 2021 section 3), so the mean chunk costs n times an isolated chunk's c^2 / 2. 1 for layers whose
    tokens do not follow the sequence (fixed_tokens) or that are not causal (estimate refuses chunks then)."""
    if layer.fixed_tokens is not None or not layer.causal or layer.kind not in ("attention", "encoder"):
        return 1
    return seq_chunks


def recompute_time_s(lt: LayerTime, layer: Layer, policy: Recompute):
    """Extra forward work in backward: full recompute repeats the layer's forward (Korthikanti 2022
    section 5); selective repeats only the attention core."""
    if not layer.trainable or policy == "none":
        return 0.0 * lt.fwd_s
    if policy == "full":
        return lt.fwd_s
    return lt.attention_fwd_s
