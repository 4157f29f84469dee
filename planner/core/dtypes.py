"""Number formats, declared once: their names, bytes per element, and the bytes of each kind of tensor a
training dtype implies (activations and the tensors a step sends, 16-bit weights, gradients).

Data only: the cost model, the search's memory bound, the partition DP, the ILP, the viewer and the readers of
published runs all take their sizes from here, so a new format is one line in each table below.
"""
from __future__ import annotations

# Bytes of one element of each format a device's peak table may name (hardware.Dtype): IEEE 754 binary32 and
# binary16, bfloat16, TF32 (stored as fp32), and OCP FP8 (E4M3 / E5M2).
BYTES_PER_ELEMENT = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}

# The training dtypes a Workload may name (plan.TrainDtype), and its gradient dtypes (Workload.grad_dtype).
TRAIN_DTYPES = ("bf16", "fp16", "fp8", "fp32")
GRAD_DTYPES = ("fp32", "bf16", "fp16")

# Bytes per element of the activations a training dtype keeps between kernels, and of what the step sends
# (pipeline transfers, TP/CP/EP collectives, K/V). fp8 training casts each GEMM's inputs to fp8 inside the
# GEMM and keeps everything between kernels in bf16 (Micikevicius et al. 2022, "FP8 Formats for Deep
# Learning", section 4; Transformer Engine's fp8 autocast), so fp8 costs 2 bytes here, not 1.
_ACTIVATION_BYTES = {"bf16": 2, "fp16": 2, "fp8": 2, "fp32": 4}

# Bytes per element of the working weights: mixed precision keeps a 16-bit copy beside the fp32 master
# weights (Micikevicius et al. 2018, "Mixed Precision Training", section 3.1); fp8 keeps that copy in bf16 and
# casts it per GEMM (as above); fp32 training has only the fp32 weights.
_WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp8": 2, "fp32": 4}


def element_bytes(dtype: str) -> int:
    """Bytes of one element of `dtype` (a GEMM's operands in that format)."""
    return BYTES_PER_ELEMENT[dtype]


def activation_bytes(train_dtype: str) -> int:
    """Bytes per element of activations, and of the tensors a step sends, when training in `train_dtype`."""
    return _ACTIVATION_BYTES[train_dtype]


def weight_bytes(train_dtype: str) -> int:
    """Bytes per parameter of the working (forward/backward) weights when training in `train_dtype`."""
    return _WEIGHT_BYTES[train_dtype]


def gradient_bytes(grad_dtype: str) -> int:
    """Bytes per parameter of the gradients kept for the reduction and the optimizer (Workload.grad_dtype)."""
    return BYTES_PER_ELEMENT[grad_dtype]


def train_dtype_or(name: str, default: str = "bf16") -> str:
    """`name` when it is a training dtype, else `default`: published runs list precisions such as 'unknown'
    or 'tf32' that no Workload takes."""
    return name if name in TRAIN_DTYPES else default
