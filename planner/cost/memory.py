"""Memory per device: model states (ZeRO / Megatron), GPT-layer activations (Korthikanti), the backward
working set of one block, pipeline in-flight activations, allocator overhead. Pure functions
(docs/formulas.md#memory).

Arguments may be numpy arrays where noted (params, dp, sizes) so the search can evaluate many plans at
once; schedule names, ZeRO stage and optimizer are scalars.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from planner.cost.pipeline import inflight_microbatches

OptimizerName = Literal["adamw", "adam", "sgd"]
RecomputeName = Literal["none", "selective", "full"]

GiB = 2**30


# ----------------------------------------------------------------------------------------------
# model states

def optimizer_bytes_per_param(optimizer: str = "adamw", weight_dtype_bytes: int = 2,
                              master_weights: bool = True, fp32_main_grads: bool = False) -> int:
    """Bytes per parameter the optimizer holds (ZeRO's K).

    Adam/AdamW: fp32 momentum and variance, 8 B. SGD (plain, no momentum): none. Plus the fp32 master
    copy of the weights, 4 B, when master_weights and the weights are below fp32 (mixed precision):
    K = 12 for mixed-precision Adam (ZeRO section 3.1). fp32_main_grads adds Megatron's separate fp32
    main-grad buffer, 4 B, which it keeps when the model grads are 16-bit (fp16 params + fp16 grads:
    20 B/param vs 4 + 16/d distributed, Megatron dist_optimizer.md); it is sharded like the optimizer.
    """
    if optimizer in ("adam", "adamw"):
        moments = 8
    elif optimizer == "sgd":
        moments = 0
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adamw', 'adam' or 'sgd'")
    master = 4 if (master_weights and weight_dtype_bytes < 4) else 0
    return moments + master + (4 if fp32_main_grads else 0)


def model_state_bytes(params, dp, zero: int, weight_dtype_bytes: int = 2, grad_dtype_bytes: int = 4,
                      optimizer: str = "adamw", master_weights: bool = True,
                      offload_fraction: float = 0.0, fp32_main_grads: bool = False) -> dict:
    """Bytes of weights, gradients and optimizer states on one device.

    params: parameters this model-parallel rank owns (already divided by tp / pp / ep); dp: the
    data-parallel degree the states are sharded over. ZeRO stage (Rajbhandari et al. 2020, section 5):
    0 nothing sharded, 1 optimizer states (P_os), 2 + gradients (P_os+g), 3 + weights (P_os+g+p).
    Megatron's distributed optimizer is stage 1 (docs/formulas.md#memory-states).

    Bytes per parameter, AdamW mixed precision (K = 12):
      2-byte grads (ZeRO paper): 16, 4 + 12/d, 2 + 14/d, 16/d for stages 0-3.
      fp32 grads (Megatron default, bf16 params): 18, 6 + 12/d (distributed optimizer),
        2 + 16/d, 18/d (stages 2 and 3 generalise the same sharding rules; Δ).
    offload_fraction: share of the (sharded) optimizer states kept on the host instead (Megatron
    --optimizer-offload-fraction; ZeRO-Offload with 1.0, except that ZeRO-Offload also moves the
    gradients, which this function keeps on the device).

    Returns {"weights", "gradients", "optimizer", "total", "host"}: the first three are device bytes
    and sum to "total"; "host" is the optimizer bytes offloaded to CPU memory.
    """
    weights, grads, opt = model_state_parts(params, dp, zero, weight_dtype_bytes, grad_dtype_bytes, optimizer,
                                            master_weights, fp32_main_grads)
    if not 0.0 <= offload_fraction <= 1.0:
        raise ValueError(f"offload_fraction must be in [0, 1], got {offload_fraction}")
    opt_device = opt * (1.0 - offload_fraction)
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": opt_device,
        "total": weights + grads + opt_device,
        "host": opt * offload_fraction,
    }


def model_state_parts(params, dp, zero: int, weight_dtype_bytes: int = 2, grad_dtype_bytes: int = 4,
                      optimizer: str = "adamw", master_weights: bool = True, fp32_main_grads: bool = False):
    """(weights, gradients, optimizer) bytes on one device before any optimizer offload: the parts of
    model_state_bytes (which see), without its totals, for callers that evaluate large arrays
    (estimate_batch)."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero!r}")
    k = optimizer_bytes_per_param(optimizer, weight_dtype_bytes, master_weights, fp32_main_grads)
    return (_shard(params * weight_dtype_bytes, dp, zero >= 3), _shard(params * grad_dtype_bytes, dp, zero >= 2),
            _shard(params * k, dp, zero >= 1))


def _shard(x, dp, sharded: bool):
    """x / dp where sharded, else x / 1 -- which returns a float array's x itself, bit for bit, so that
    division is skipped there (ints and Python numbers still go through / to become floats)."""
    if sharded:
        return x / dp
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return x
    return x / 1


# ----------------------------------------------------------------------------------------------
# activations

def activation_bytes_gpt_layer(s, b, h, a, t=1, sp: bool = False, recompute: str = "none",
                               flash: bool = False):
    """Activation bytes one GPT transformer layer keeps for backward, per device, per micro-batch.

    Korthikanti et al. 2022, Eqs. 1-4 and Table 2, as printed: 16-bit activations, 1-byte dropout
    masks, a GPT layer (MHA, 4h GeLU MLP, LayerNorm, dropout), small buffers ignored.
      no parallelism                 sbh(34 + 5as/h)                 (Eq. 1; t = 1)
      TP                             sbh(10 + 24/t + 5as/(ht))       (Eq. 2)
      TP + SP                        sbh(34/t + 5as/(ht))            (Eq. 4)
      TP + selective recompute       sbh(10 + 24/t)                  (Table 2)
      TP + SP + selective recompute  34 sbh / t                      (Table 2)
      full recompute                 2 sbh                           (Table 2)
    flash=True drops the 5as/h score term as selective recompute does ("we can drop this term ... if
    we do flash attention", docs/formulas.md#memory-activations). With full recompute and SP the stored layer input is
    the sequence-sharded tensor, 2sbh/t (Megatron; Table 2 prints only 2sbh; Δ).
    """
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    base = 34 / t if sp else 10 + 24 / t
    score = 0 if (recompute == "selective" or flash) else 5 * a * s / (h * t)
    return sbh * (base + score)


def backward_working_bytes(full_bytes, kept_bytes):
    """Transient bytes of the one block whose backward is running, beyond what its micro-batch keeps saved:
    once per pipeline stage (the block in backward), not per micro-batch in flight.

    full_bytes: each layer of the block's activations without recompute (Layer.activation_bytes, policy
    "none"); kept_bytes: what its policy keeps saved (the same with the policy in force). Axis 0 is the
    block's layers; further axes (plans) broadcast.

      re-materialised: sum(full - kept). Recomputation keeps the checkpoints plus one segment's
        activations while that segment runs backward (Chen et al. 2016, "Training Deep Nets with Sublinear
        Memory Cost", section 4.1: cost O(n/k) + O(k)); Korthikanti et al. 2022 section 5: full recompute
        still materialises one transformer layer's activations for its backward. The checkpointed block
        input is already among the kept bytes, hence full - kept. Zero without recompute.
      activation gradients: the gradients of the largest layer's saved tensors, max(full). Each saved
        tensor feeds an op whose backward returns a gradient of its shape (e.g. a SwiGLU MLP: the gradients
        of the activation output and of both up projections, 3 t f / tp, beside the incoming t h); autograd
        frees them once consumed, so about one layer's worth is live at a time (Δ: an estimate, the largest
        layer stands for the peak inside it). Present under every policy, so more recompute never adds
        memory: the extra re-materialised bytes are at most what the saved ones shrink by.
    """
    full = np.asarray(full_bytes, dtype=float)
    kept = np.asarray(kept_bytes, dtype=float)
    if full.shape[0] == 0:
        return np.zeros(full.shape[1:]) if full.ndim > 1 else 0.0
    return np.sum(full - kept, axis=0) + np.max(full, axis=0)


def pipeline_activation_bytes(per_microbatch_bytes, schedule: str, p: int, m: int, stage: int = 0,
                              v: int = 1, offload_fraction: float = 0.0):
    """Peak activation bytes on one pipeline device: the activations of one micro-batch through all
    layers on that device (all v chunks) times the micro-batches in flight at its peak
    (`inflight_microbatches`, docs/formulas.md#memory-inflight). offload_fraction: share moved to host memory
    (ignores the prefetch buffer; Δ)."""
    if not 0.0 <= offload_fraction <= 1.0:
        raise ValueError(f"offload_fraction must be in [0, 1], got {offload_fraction}")
    n = inflight_microbatches(schedule, p, m, stage, v)
    return per_microbatch_bytes * n * (1.0 - offload_fraction)


# ----------------------------------------------------------------------------------------------
# allocator

DEFAULT_FRAGMENTATION = 0.07
DEFAULT_CONTEXT_BYTES = 0.75 * GiB


def allocator_overhead_bytes(allocated_bytes, fragmentation: float = DEFAULT_FRAGMENTATION,
                             context_bytes: float = DEFAULT_CONTEXT_BYTES):
    """Device memory the framework uses beyond the tensors it allocates.

    fragmentation * allocated_bytes for the PyTorch caching allocator (reserved minus allocated:
    freed blocks kept cached, block rounding, splits that cannot be reused), plus a constant for the
    CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers.

    ASSUMPTION (✖, not from a cited measurement; calibrate against torch.cuda.max_memory_reserved()
    and nvidia-smi): fragmentation 5-10% (default 7%) and a context of 0.5-1 GiB (default 0.75 GiB)
    are typical figures seen on recent PyTorch/CUDA builds. PyTorch's expandable_segments allocator
    option reduces fragmentation.
    """
    if fragmentation < 0 or context_bytes < 0:
        raise ValueError("fragmentation and context_bytes must be >= 0")
    return allocated_bytes * fragmentation + context_bytes
