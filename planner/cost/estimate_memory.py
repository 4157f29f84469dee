"""Memory per device of one plan (_memory), per stage and of the worst stage: the per-stage sums of its
layers' bytes (_LayerBytes over the plan's _Structure), handed as one row to the memory phase that the batch
path runs too (planner/cost/memory_phase.py), and that row's parts as the estimate's per-stage breakdown.

Separate from planner/cost/estimate.py, which times the step: memory reads the same _Structure and the
pipeline's in-flight micro-batches but none of the timing.
"""
from __future__ import annotations

import numpy as np

from planner.core import dtypes
from planner.core.plan import ParallelPlan
from planner.cost import longctx, memory, memory_phase, moe
from planner.cost.estimate_structure import _BY_MODEL, _cache_for, _partition_key, _Structure


def expert_data_parallel(plan: ParallelPlan) -> int:
    """The plan's expert-data-parallel degree (memory_phase.expert_data_parallel)."""
    return memory_phase.expert_data_parallel(plan.dp, plan.cp, plan.tp, plan.ep, plan.etp or plan.tp)


class _LayerBytes:
    """Bytes per device of each distinct (layer shape, policy) of a structure (st.reps indices): activations
    kept under its policy and with none (what its backward materialises), one sequence chunk's K/V, the ring's
    forward buffers (looked up lazily), and each distinct block's backward working set."""

    def __init__(self, model, st: _Structure, workload, plan, e_act: int):
        cache = _cache_for(_BY_MODEL, model)
        # activation bytes of each (shape, policy) of the structure, cached per model (its layers stay alive
        # with it, so their ids are stable): they depend on nothing but these arguments
        tp_slice = plan.moe_dispatch == "tp_slice"
        s_item = workload.seq_len // plan.seq_chunks  # tokens of one work item (ParallelPlan.seq_chunks)
        act_args = (plan.mbs, s_item, plan.tp, plan.cp, plan.sp, e_act, plan.flash_attention, tp_slice)

        def act(layer, policy):
            key = ("act", id(layer), policy, act_args)
            hit = cache.get(key)
            if hit is None:
                # a tp_slice MoE layer keeps its replicated input's activations whole (moe.layer_sp)
                hit = cache[key] = float(layer.activation_bytes(
                    plan.mbs, s_item, plan.tp, plan.cp, moe.layer_sp(layer.kind, plan.sp, tp_slice), policy,
                    e_act, flash=plan.flash_attention))
            return hit

        self.st, self.workload, self.plan, self.e_act, self.s_item = st, workload, plan, e_act, s_item
        self.act_of = [act(layer, policy) for layer, policy in st.reps]
        self.act_none = [act(layer, "none") for layer, _ in st.reps]  # what each layer materialises in backward
        self.kv_of = [0.0] * len(st.reps)  # one chunk's K/V per layer, when the sequence runs in chunks
        if plan.seq_chunks > 1:
            self.kv_of = [float(longctx.chunk_kv_bytes(layer, plan.mbs, s_item, plan.tp, plan.cp, e_act))
                          for layer, _ in st.reps]
        self._ring: dict = {}
        # the backward working set of each distinct block (reps indices) of any stage: re-materialised
        # activations and activation gradients (memory.backward_working_bytes)
        self.working_of: dict = {}
        for blocks in st.blocks:
            for blk in blocks:
                if blk not in self.working_of:
                    self.working_of[blk] = float(memory.backward_working_bytes(
                        [self.act_none[k] for k in blk], [self.act_of[k] for k in blk]))

    def ring(self, k: int) -> float:
        """A chunk's ring pass: its own queries, its whole prefix's K/V (the last chunk's: s)."""
        if k not in self._ring:
            plan = self.plan
            self._ring[k] = float(longctx.ring_forward_buffers_bytes(
                self.st.reps[k][0], plan.mbs, self.s_item, self.workload.seq_len, plan.tp, plan.cp, self.e_act))
        return self._ring[k]




def _stage_sums(st: _Structure, plan, sizes: _LayerBytes, e_w: int) -> np.ndarray:
    """(frozen, one micro-batch's activations, working set, logits, ring buffers, full-recompute K/V, other
    K/V) bytes of every stage, (7, 1, stages): its layers' bytes summed, or their largest where one at a time is
    live."""
    rows = []
    act_of, working_of, kv_of, reps = sizes.act_of, sizes.working_of, sizes.kv_of, st.reps
    ring_on = plan.cp > 1 and plan.cp_comm == "ring"
    for stage in range(plan.pp):
        acts = st.acts[stage]
        frozen = 0
        for layer in st.frozen[stage]:
            frozen += float(layer.params_per_device(tp=plan.tp)) * e_w
        act_one = 0.0
        for k in acts:
            act_one += act_of[k]
        # the block in backward, once per stage, on the device whatever is offloaded
        working = 0.0
        for blk in st.blocks[stage]:
            working = max(working, working_of[blk])
        # the loss's 16-bit logits copy beside the saved fp32 ones, one micro-batch
        logits = 0.0
        for layer in st.heads[stage]:
            logits += float(layer.logits_transient_bytes(plan.mbs, sizes.s_item, plan.tp, plan.cp, sizes.e_act))
        # ring context parallelism: the largest attention forward's retained K/V, partial outputs and LSEs
        ring = 0.0
        for k in (acts if ring_on else ()):
            ring = max(ring, sizes.ring(k))
        # chunked sequences: a chunk's K/V, by whether its layer's saved activations hold it (not under "full")
        kv_full = kv_rest = 0.0
        for k in (acts if plan.seq_chunks > 1 else ()):
            if reps[k][1] == "full":
                kv_full += kv_of[k]
            else:
                kv_rest += kv_of[k]
        rows.append((frozen, act_one, working, logits, ring, kv_full, kv_rest))
    return np.array(rows).T[:, None, :]


def _stage_sums_of(model, st: _Structure, workload, plan) -> np.ndarray:
    """_stage_sums, cached per model: they depend on the structure (its own cache key's fields) and the
    per-layer byte arguments only, which many plans of a search share (ZeRO stage, schedule, batch, dp and
    offload do not enter)."""
    cache = _cache_for(_BY_MODEL, model)
    key = ("stage_sums", plan.pp, plan.vpp, _partition_key(plan), plan.recompute, plan.recompute_num_layers,
           plan.mbs, plan.tp, plan.cp, plan.sp, plan.flash_attention, plan.moe_dispatch, plan.seq_chunks,
           plan.cp_comm, workload.seq_len, workload.dtype)
    sums = cache.get(key)
    if sums is None:
        sizes = _LayerBytes(model, st, workload, plan, dtypes.activation_bytes(workload.dtype))
        sums = cache[key] = _stage_sums(st, plan, sizes, dtypes.weight_bytes(workload.dtype))
        sums.flags.writeable = False  # shared by every plan with this key
    return sums


_PARTS = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "backward_working_bytes",
          "logits_transient_bytes", "seq_chunk_kv_bytes", "cp_ring_buffers_bytes", "overhead_bytes", "total_bytes")


def _memory(model, st: _Structure, workload, plan, pipe, params_dev, stage_params, dev, stage_expert=None) -> dict:
    """Bytes per device of every stage (model states, frozen weights, activations in flight, transients,
    allocator overhead) and of the worst one: {**worst stage, "stages": [...]}."""
    # one row: per-stage inputs and the plan's columns, built as one array each
    expert = [0.0] * plan.pp if stage_expert is None else stage_expert[:plan.pp]
    inflight = pipe.peak_inflight[:plan.pp]  # the pipeline's in-flight micro-batches per stage, per chunk
    per_stage = np.array([stage_params[:plan.pp], expert, inflight], dtype=float)[:, None, :]
    if plan.vpp > 1:
        per_stage[2] /= plan.vpp
    sums = _stage_sums_of(model, st, workload, plan)
    columns = [plan.dp * plan.cp, expert_data_parallel(plan), plan.seq_chunks, plan.offload.activations,
               plan.offload.optimizer]
    dp_cp, edp, seq_chunks, off_act, off_opt = np.array(columns, dtype=float)[:, None, None]
    inputs = memory_phase.StageInputs(
        params_count=per_stage[0], expert_params_count=per_stage[1], frozen_bytes=sums[0],
        activation_bytes=sums[1], inflight_items=per_stage[2], working_bytes=sums[2], logits_bytes=sums[3],
        ring_bytes=sums[4], kv_full_bytes=sums[5], kv_rest_bytes=sums[6], dp_cp=dp_cp, edp=edp,
        seq_chunks=seq_chunks, offload_activations=off_act, offload_optimizer=off_opt)
    mem = memory_phase.stage_memory(inputs, plan.zero, dtypes.weight_bytes(workload.dtype),
                                    dtypes.gradient_bytes(workload.grad_dtype), workload.optimizer)
    overhead = mem.overhead_bytes()
    # the rows of _PARTS, stage by stage
    table = np.concatenate([mem.weights_bytes + mem.frozen_bytes, mem.gradients_bytes, mem.optimizer_bytes,
                            mem.activations_bytes, mem.backward_working_bytes, mem.logits_transient_bytes,
                            mem.seq_chunk_kv_bytes, mem.cp_ring_buffers_bytes, overhead, mem.subtotal_bytes + overhead])
    stages = [dict(zip(_PARTS, row)) for row in table.T.tolist()]
    totals = [d["total_bytes"] for d in stages]
    worst = stages[totals.index(max(totals))]  # the first of equal stages, as max() picks
    return {**worst, "stages": stages}
