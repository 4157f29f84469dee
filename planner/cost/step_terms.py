"""The step-level terms that follow the pipeline: data-parallel gradient sync and the part of it compute does
not hide, the sharded framework's host copies, the optimizer step, and the step's outputs (step time,
throughput, MFU / HFU, pipeline p2p seconds).

One implementation for both callers: estimate() calls each function with one plan's Python numbers,
estimate_batch with numpy columns over plans (a column may mix ZeRO stages, so a branch on a plan field is an
np.where, evaluated on both sides). On Python numbers the functions return numpy scalars; estimate() turns
them into floats.
"""
from __future__ import annotations

import numpy as np

from planner.cost import comm
from planner.cost.layer_terms import EXPOSED_TAIL_FRACTION

# AdamW streams fp32 master weights, gradients and two moments, read and written: 32 bytes per owned
# parameter (ZeRO section 3.1's 16 bytes of states, twice; docs/formulas.md#memory-states).
OPTIMIZER_BYTES_PER_PARAM = 32


def layer_sync_sums_s(layer_params, grad_bytes: int, weight_bytes: int, link, layer_counts=None, zero=None):
    """(all-reduce, reduce-scatter, all-gather) seconds over `link`, one collective per layer (Megatron and DDP
    reduce in buckets of about a layer's size), summed over the layers.

    layer_params: trainable parameters per device of each layer (1-D), or of each layer shape with
    `layer_counts` layers of that shape (shapes x columns). zero: the plan's ZeRO stage, to time only the
    collectives that stage runs (the others are 0.0); None times all three (a column mixing stages)."""
    def summed(collective, nbytes):
        t = collective(nbytes, link)
        return np.sum(t if layer_counts is None else layer_counts * t, axis=0)

    reduce_only = zero is None or zero == 0
    sharded = zero is None or zero != 0
    all_reduce = summed(comm.all_reduce_time_s, layer_params * grad_bytes) if reduce_only else 0.0
    reduce_scatter = summed(comm.reduce_scatter_time_s, layer_params * grad_bytes) if sharded else 0.0
    all_gather = summed(comm.all_gather_time_s, layer_params * weight_bytes) if sharded else 0.0
    return all_reduce, reduce_scatter, all_gather


def zero_sync_s(all_reduce_s, reduce_scatter_s, all_gather_s, zero, items, dev):
    """Seconds of gradient reduction and ZeRO traffic per step from layer_sync_sums_s: ZeRO-0 all-reduces the
    gradients; ZeRO-1/2 reduce-scatter them and gather the updated weights once (ZeRO section 7.1-7.2.1);
    ZeRO-3 / FSDP gathers each layer's weights for every work item's forward and again for its backward
    (ZeRO section 7.2.2; FSDP reshard_after_forward=True)."""
    sharded = reduce_scatter_s + np.where(zero < 3, all_gather_s, 2 * items * all_gather_s)
    return np.where(zero == 0, all_reduce_s, sharded) / dev.efficiency.dp_collective


def dp_sync_s(per_layer_params, g_bytes: int, e: int, zero: int, m: int, dp_link, dev) -> float:
    """Seconds of data-parallel gradient reduction and ZeRO traffic per step over `dp_link` for one plan:
    per_layer_params are the stage's trainable parameters per device, by layer; e the weight bytes."""
    sums = layer_sync_sums_s(per_layer_params, g_bytes, e, dp_link, zero=zero)
    return float(zero_sync_s(*sums, zero, m, dev))


def shard_copy_s(params_dev, e: int, g_bytes: int, zero, m, dev):
    """Host copies around a sharded-data-parallel framework's collectives (Efficiency.shard_copy_ns_per_byte):
    every gathered weight byte and every reduce-scattered gradient byte, with zero_sync_s's gather count
    (ZeRO-3: 2 per micro-batch, ZeRO-2: 1 per step), not overlapped. 0 below ZeRO-2."""
    gathers = np.where(zero == 3, 2 * m, 1)
    copied = params_dev * (gathers * e + g_bytes)
    return np.where(zero >= 2, copied * dev.efficiency.shard_copy_ns_per_byte * 1e-9, 0.0)


def exposed_sync_s(sync_s, zero, overlap_grad_reduce, stage_busy_s, last_backward_s, dev, *, params_dev,
                   weight_bytes: int, grad_bytes: int, items, replicas):
    """The data-parallel seconds compute does not hide, plus the host copies of a sharded framework.

    ZeRO-3 / FSDP prefetches the next layer's gather during this layer's compute (the stage's busy time); an
    overlapped gradient reduction runs during the last micro-batch's backward; either way the first gather or
    the last bucket stays exposed (EXPOSED_TAIL_FRACTION, docs/formulas.md#comm-overlap). Without overlap
    all of it is exposed (Megatron's default). replicas: dp x cp, the ranks the states shard over."""
    hide = dev.efficiency.comm_overlap
    tail = EXPOSED_TAIL_FRACTION * sync_s
    exposed = np.where(zero == 3, np.maximum(sync_s - hide * stage_busy_s, tail),
                       np.where(overlap_grad_reduce, np.maximum(sync_s - hide * last_backward_s, tail), sync_s))
    if dev.efficiency.shard_copy_ns_per_byte:  # adds exactly 0.0 when the device measured no copy cost
        copies = shard_copy_s(params_dev, weight_bytes, grad_bytes, zero, items, dev)
        exposed = exposed + np.where(replicas > 1, copies, 0.0)
    return exposed


def state_shards(zero, replicas):
    """Ranks the optimizer states shard over: dp x cp from ZeRO-1 on (ZeRO section 5.1), else 1."""
    return np.where(zero >= 1, replicas, 1)


def optimizer_step_s(params_dev, shards, offload_fraction, dev):
    """Seconds of the optimizer step on the device: AdamW's states of the owned parameters streamed through
    device memory once; the offloaded fraction steps on the host instead (offload_exposed_s)."""
    on_device = params_dev / shards * (1 - offload_fraction)
    return on_device * OPTIMIZER_BYTES_PER_PARAM / (dev.memory_bandwidth_bytes_per_s * dev.efficiency.memory)


# Host-side AdamW (ZeRO-Offload's CPU-Adam) streams the same 32 bytes per parameter through host DRAM.
# ASSUMPTION: 100 GB/s of usable host memory bandwidth per GPU's share of a dual-socket server (8-channel
# DDR4-3200 is 205 GB/s per socket by spec); replace with a measured figure from `calibrate`.
HOST_MEMORY_BYTES_PER_S = 100e9


def offload_exposed_s(fraction, owned_params, weight_bytes: int, grad_bytes: int, stage_busy_s, host_bytes_per_s):
    """Exposed time of optimizer offload: gradients go down and updated weights come back over the host link
    (4 bytes per parameter at 16-bit, ZeRO-Offload section 3.3-3.5), and the CPU runs the update. The
    gradient copy overlaps backward (ZeRO-Offload section 4.1); the update and the upload do not. 0 where
    nothing is offloaded; host_bytes_per_s None (no host link) only where nothing is."""
    if host_bytes_per_s is None:
        return np.zeros(np.shape(fraction)) if np.ndim(fraction) else 0.0
    owned = fraction * owned_params
    upload = owned * weight_bytes / host_bytes_per_s
    cpu_step = owned * OPTIMIZER_BYTES_PER_PARAM / HOST_MEMORY_BYTES_PER_S
    download = owned * grad_bytes / host_bytes_per_s
    return np.where(fraction > 0, upload + cpu_step + np.maximum(0.0, download - stage_busy_s), 0.0)


def step_time_s(pipeline_s, dp_exposed_s, optimizer_s, offload_s):
    """The pipeline's makespan, then what follows it and does not overlap it."""
    return pipeline_s + dp_exposed_s + optimizer_s + offload_s


def tokens_per_s(global_batch: int, seq_len: int, step_s):
    """Training throughput: the tokens of one global batch per step."""
    return global_batch * seq_len / step_s


def utilisation(flops_model_per_item, flops_hw_per_item, items, tp, cp, dp, step_s, peak_flops):
    """(MFU, HFU): model FLOPs (no recompute) and hardware FLOPs (recompute included) per second over the peak
    of every device (docs/formulas.md#mfu-hfu). FLOPs are per device of one work item through every chunk; a
    step runs `items` work items on the tp x cp x dp devices of each stage."""
    scale = items * tp * cp * dp
    return (flops_model_per_item * scale / (step_s * peak_flops),
            flops_hw_per_item * scale / (step_s * peak_flops))


def pp_comm_s(pp, vpp, items, p2p_s):
    """Seconds of stage-to-stage transfers per step: every work item crosses each of the vpp chunk
    boundaries of a stage forward and back (Narayanan 2021 section 3.2); none without a pipeline."""
    return np.where(pp > 1, 2 * items * vpp * p2p_s, 0.0)


# ---------------------------------------------------------------------------------------------------------
# low-bandwidth data parallelism (docs/guide/low_bandwidth_and_cost.md)
#
# DiLoCo (Douillard et al. 2023, arXiv 2311.08105, Algorithm 1): each replica takes H = local_steps inner
# optimizer steps alone, then the replicas all-reduce the pseudo-gradient (global weights - local weights) and
# an outer Nesterov step updates the global weights. SparseLoCo (2025) sends a top-k share of
# it, quantised, with error feedback: R = grad_compression of the bytes. Charged per step, amortised over H:
#   sync    R x the data-parallel sync of one step (same collectives, R of the bytes: exact for the bandwidth
#           term; the per-collective latency is scaled by R too, an under-count that matters only on small
#           layers over high-latency links), fully exposed when H > 1 (the outer sync runs between inner loops,
#           nothing to hide behind), with the usual overlap when H = 1 (a compressed per-step all-reduce);
#   outer   H > 1: the outer Nesterov step streams the global copy, the local weights and the outer momentum in
#           and the global copy and momentum out, fp32: OUTER_STEP_BYTES_PER_PARAM through device memory;
#   compress R < 1: the error-feedback buffer read and written and one read for the top-k selection:
#           COMPRESS_BYTES_PER_PARAM through device memory.
# Not modelled: loss. Both papers report the trade-off: DiLoCo at H = 500 matches synchronous training's
# perplexity with 8 replicas while communicating 500x less (Douillard et al. 2023, abstract); quality falls
# as H or the sparsity grows (both papers' ablations); more steps to the same loss are the user's to weigh.
OUTER_STEP_BYTES_PER_PARAM = 20  # 5 fp32 tensors: global, local, momentum read; global, momentum written
COMPRESS_BYTES_PER_PARAM = 12  # ASSUMPTION: error feedback fp32 read + write, one fp32 read to select top-k


def pseudo_gradient_bytes_per_step(params_dev, grad_bytes: int, replicas, local_steps, grad_compression):
    """Bytes each rank sends per step, amortised, for the outer sync: a ring all-reduce sends 2(n-1)/n of the
    buffer (Patarasuk & Yuan 2009), here params_dev x grad_bytes x R once every H steps."""
    return 2 * (replicas - 1) / replicas * params_dev * grad_bytes * grad_compression / local_steps


def low_bandwidth_exposed_s(sync_s, exposed_s, local_steps, grad_compression, params_dev, dev):
    """Exposed data-parallel seconds per step with DiLoCo / SparseLoCo (the block comment above): sync_s and
    exposed_s are the step's sync and its exposed part at R of the bytes (exposed_sync_s of R x sync). Where
    H = 1 and R = 1 exposed_s comes back unchanged."""
    lowbw = (local_steps > 1) | (grad_compression < 1)
    per_outer = np.where(local_steps > 1, sync_s, exposed_s)
    bytes_per_param = np.where(local_steps > 1, OUTER_STEP_BYTES_PER_PARAM, 0) + np.where(
        grad_compression < 1, COMPRESS_BYTES_PER_PARAM, 0)
    overhead = params_dev * bytes_per_param / (dev.memory_bandwidth_bytes_per_s * dev.efficiency.memory)
    return np.where(lowbw, (per_outer + overhead) / local_steps, exposed_s)


def compressed_p2p_bytes(nbytes, act_compression):
    """Pipeline activation (and activation-gradient) bytes after subspace compression: R of them
    ("Heterogeneous Low-Bandwidth Pre-Training of LLMs" projects each boundary's activations onto a
    low-rank subspace; the projection's own FLOPs are not charged, k x hidden per token, small beside a block)."""
    return nbytes * act_compression
