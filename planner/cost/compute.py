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

from planner.hardware import Device
from planner.model import Layer, Recompute

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}

# Backward of a GEMM is two GEMMs of the same size (input grad and weight grad): 2x forward FLOPs
# (Narayanan et al. 2021, Appendix). FlashAttention's backward does 2.5x its forward work, recomputing the
# scores (FlashAttention benchmark convention, reference formulas.md 1.3).
ATTENTION_BWD_FACTOR = 2.5
# Memory-bound kernels per sublayer pass (norm, residual add, activation or rotary, dropout/bias):
# counted for launch overhead. Backward launches about twice as many.
ELEMENTWISE_KERNELS = {"attention": 5, "encoder": 9, "mlp": 4, "moe": 8, "head": 3, "embedding": 1}


@dataclass(frozen=True)
class LayerTime:
    fwd_s: object  # float or ndarray
    bwd_s: object
    attention_fwd_s: object  # the attention core alone (what selective recompute repeats)
    fwd_flops: object


def gemm_time_s(m, n, k, device: Device, dtype: str):
    """One (m x k) @ (k x n) GEMM: the roofline time plus a launch overhead."""
    e = device.efficiency
    nbytes = DTYPE_BYTES[dtype]
    flops = 2.0 * m * n * k
    moved = nbytes * (m * k + k * n + m * n)
    compute = flops / (device.peak_flops(dtype) * e.matmul)
    memory = moved / (device.memory_bandwidth_bytes_per_s * e.memory)
    return np.maximum(compute, memory) + e.kernel_overhead_us * 1e-6


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


def layer_time(layer: Layer, b, s, device: Device, dtype: str = "bf16", tp=1, cp=1, sp=False) -> LayerTime:
    """Forward and backward time of `layer` for one micro-batch on one device (recompute not included)."""
    e = device.efficiency
    if layer.kind == "vae":
        flops = layer.flops_fwd(b, s)
        fwd = flops / (device.peak_flops(dtype) * e.matmul)
        return LayerTime(fwd_s=fwd, bwd_s=0.0 * fwd, attention_fwd_s=0.0 * fwd, fwd_flops=flops)
    gemm_fwd = 0.0
    gemm_bwd = 0.0
    n_gemms = 0
    for _, m, n, k in layer.gemms(b, s, tp, cp):
        gemm_fwd = gemm_fwd + gemm_time_s(m, n, k, device, dtype)
        gemm_bwd = gemm_bwd + gemm_time_s(m, k, n, device, dtype) + gemm_time_s(k, n, m, device, dtype)
        n_gemms += 1
    attn_flops = layer.attention_core_flops(b, s, tp, cp)
    attn_fwd = attn_flops / (device.peak_flops(dtype) * e.attention)
    ew_bytes = elementwise_bytes_fwd(layer, b, s, tp, cp, sp, DTYPE_BYTES.get(dtype, 2) if dtype != "fp8" else 2)
    ew_fwd = ew_bytes / (device.memory_bandwidth_bytes_per_s * e.memory)
    kernels = ELEMENTWISE_KERNELS.get(layer.kind, 2) + (2 if layer.kind in ("attention", "encoder") else 0)
    overhead = kernels * e.kernel_overhead_us * 1e-6 + e.layer_overhead_us * 1e-6
    fwd = gemm_fwd + attn_fwd + ew_fwd + overhead
    bwd = gemm_bwd + ATTENTION_BWD_FACTOR * attn_fwd + 2 * ew_fwd + 2 * overhead
    if not layer.trainable:
        # Frozen layers run forward only (no_grad): nothing to backpropagate into them.
        bwd = 0.0 * fwd
    return LayerTime(fwd_s=fwd, bwd_s=bwd, attention_fwd_s=attn_fwd + 0.0 * fwd,
                     fwd_flops=layer.flops_fwd(b, s, tp, cp))


def recompute_time_s(lt: LayerTime, layer: Layer, policy: Recompute):
    """Extra forward work in backward: full recompute repeats the layer's forward (Korthikanti 2022
    section 5); selective repeats only the attention core."""
    if not layer.trainable or policy == "none":
        return 0.0 * lt.fwd_s
    if policy == "full":
        return lt.fwd_s
    return lt.attention_fwd_s
