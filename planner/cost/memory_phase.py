"""The memory phase of the estimate: bytes per device of every pipeline stage of many plans at once, written
once for one plan (one row, estimate._stage_memory) and for many (one row per distinct
plan, batch._peak_memory).

Inputs are (rows x stages) arrays of per-stage sums the caller's layers phase already has (parameters, kept
activations, working sets, ...) and per-row plan columns; the ZeRO stage is one scalar per call (callers
group their rows by it). The formulas per piece are planner/cost/memory.py's and planner/cost/longctx.py's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost import longctx, memory


def expert_data_parallel(dp, cp, tp, ep, etp):
    """EDP = dp*cp*tp / (ep*etp): the ranks that hold the same experts (Megatron parallel_state.py; MoE
    Parallel Folding, docs/formulas.md#moe-folding). Integers or integer arrays."""
    return dp * cp * tp // (ep * etp)


@dataclass(slots=True)
class StageInputs:
    """What the memory phase reads. (rows, stages) arrays, per device of a stage:
      params_count         trainable parameters;  expert_params_count  the routed-expert share of them
      frozen_bytes         frozen weights;        activation_bytes     one micro-batch's kept activations
      inflight_items       micro-batches (work items) in flight at the stage's peak, per pipeline chunk
      working_bytes        the largest block's backward working set (memory.backward_working_bytes)
      logits_bytes         the loss's 16-bit logits copy (Layer.logits_transient_bytes)
      ring_bytes           the largest ring forward buffers of a layer (longctx.ring_forward_buffers_bytes)
      kv_full_bytes        one sequence chunk's K/V of the full-recompute layers, kv_rest_bytes of the others
    (rows, 1) arrays: dp_cp (dense states shard over dp x cp), edp (routed ones over expert_data_parallel),
    seq_chunks, offload_activations and offload_optimizer (fractions); weight_versions, the copies of the
    weights the schedule keeps (dims.ScheduleRules.weight_versions; None: one)."""
    params_count: np.ndarray
    expert_params_count: np.ndarray
    frozen_bytes: np.ndarray
    activation_bytes: np.ndarray
    inflight_items: np.ndarray
    working_bytes: np.ndarray
    logits_bytes: np.ndarray
    ring_bytes: np.ndarray
    kv_full_bytes: np.ndarray
    kv_rest_bytes: np.ndarray
    dp_cp: np.ndarray
    edp: np.ndarray
    seq_chunks: np.ndarray
    offload_activations: np.ndarray
    offload_optimizer: np.ndarray
    weight_versions: np.ndarray | None = None


@dataclass(slots=True)
class StageMemory:
    """Device bytes of each part, (rows, stages): model states (weights, gradients, the optimizer's on-device
    share), frozen weights, activations in flight, and the transients (backward working set, logits,
    chunked-sequence K/V, ring buffers beyond the working set). subtotal_bytes is their sum, before the
    allocator's overhead."""
    weights_bytes: np.ndarray
    gradients_bytes: np.ndarray
    optimizer_bytes: np.ndarray
    frozen_bytes: np.ndarray
    activations_bytes: np.ndarray
    backward_working_bytes: np.ndarray
    logits_transient_bytes: np.ndarray
    seq_chunk_kv_bytes: np.ndarray
    cp_ring_buffers_bytes: np.ndarray
    subtotal_bytes: np.ndarray

    def overhead_bytes(self) -> np.ndarray:
        """The allocator's and CUDA context's bytes on each stage (memory.allocator_overhead_bytes)."""
        return memory.allocator_overhead_bytes(self.subtotal_bytes)

    def peak_bytes(self) -> np.ndarray:
        """Each row's worst stage, overhead included. allocator_overhead_bytes (x + (0.07 x + c)) is
        nondecreasing in x, also in floating point, so it is applied to the largest subtotal only."""
        top = self.subtotal_bytes.max(axis=1)
        return top + memory.allocator_overhead_bytes(top)


def model_states(params, expert_params, dp_cp, edp, zero: int, weight_bytes: int, grad_bytes: int,
                 optimizer: str) -> tuple:
    """(weights, gradients, optimizer) bytes per device before any offload: dense parameters shard over
    dp x cp, routed experts over EDP (Megatron's expert-data group); rows whose EDP is dp x cp, or that have
    no experts, take one model_state_parts over all parameters."""
    states = memory.model_state_parts(params, dp_cp, zero, weight_dtype_bytes=weight_bytes,
                                      grad_dtype_bytes=grad_bytes, optimizer=optimizer)
    if not (edp != dp_cp).any() or not expert_params.any():
        return states
    split = (expert_params > 0) & (edp != dp_cp)
    dense = memory.model_state_parts(params - expert_params, dp_cp, zero, weight_dtype_bytes=weight_bytes,
                                     grad_dtype_bytes=grad_bytes, optimizer=optimizer)
    routed = memory.model_state_parts(expert_params, edp, zero, weight_dtype_bytes=weight_bytes,
                                      grad_dtype_bytes=grad_bytes, optimizer=optimizer)
    return tuple(np.where(split, d + r, x) for d, r, x in zip(dense, routed, states))


def _seq_chunk_kv(x: StageInputs) -> np.ndarray:
    """Chunked sequences' K/V beyond the saved activations (longctx.seq_chunk_kv_bytes): all of a chunk's
    K/V in full-recompute layers (only the block input is saved), the offloaded share in the others."""
    kv = longctx.seq_chunk_kv_bytes(x.kv_full_bytes, x.inflight_items, x.seq_chunks, 1.0)
    # the (n - 1) dK/dV term holds for every layer whatever its share: with no offload the rest adds only it
    return kv + longctx.seq_chunk_kv_bytes(x.kv_rest_bytes, x.inflight_items, x.seq_chunks, x.offload_activations)


def stage_memory(x: StageInputs, zero: int, weight_bytes: int, grad_bytes: int, optimizer: str) -> StageMemory:
    """Every stage's memory parts for every row (see StageMemory). Terms that are zero on every row (no
    offload, no ring context parallelism, no sequence chunks) are skipped: adding or scaling by them would
    change no bit."""
    weights, grads, optim = model_states(x.params_count, x.expert_params_count, x.dp_cp, x.edp, zero,
                                         weight_bytes, grad_bytes, optimizer)
    if x.weight_versions is not None and (x.weight_versions > 1).any():
        # PipeDream-2BW (Narayanan et al. 2021 section 3.1): the stage keeps the weights of the previous
        # update for the micro-batches in flight beside the new ones: (versions - 1) more copies of its weights
        # as the device holds them (after any ZeRO sharding); gradients and optimizer states stay one copy
        weights = weights * x.weight_versions
    acts = x.activation_bytes * x.inflight_items
    if x.offload_activations.any():
        acts = acts * (1 - x.offload_activations)
    if x.offload_optimizer.any():
        optim = optim * (1 - x.offload_optimizer)
    work = x.working_bytes
    subtotal = weights + grads + optim + x.frozen_bytes + acts + work + x.logits_bytes
    # ring context parallelism: one attention forward's buffers are freed before the backward's working set
    # is built, so only what exceeds that working set adds to the peak
    none = np.zeros(subtotal.shape)  # a skipped term
    ring = none
    if x.ring_bytes.any():  # bytes are >= 0: any() is "some > 0"
        ring = np.maximum(0.0, x.ring_bytes - work)
        subtotal = subtotal + ring
    kv = none
    if x.seq_chunks.max() > 1:
        kv = _seq_chunk_kv(x)
        subtotal = subtotal + kv
    return StageMemory(weights_bytes=weights, gradients_bytes=grads, optimizer_bytes=optim,
                       frozen_bytes=x.frozen_bytes, activations_bytes=acts, backward_working_bytes=work,
                       logits_transient_bytes=x.logits_bytes, seq_chunk_kv_bytes=kv, cp_ring_buffers_bytes=ring,
                       subtotal_bytes=subtotal)
