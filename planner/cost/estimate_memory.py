"""Memory per device of a plan (_memory): model states, frozen weights, activations in flight, the backward
working set, logits, chunked-sequence K/V and ring buffers, per stage, and the worst stage.

Separate from planner/cost/estimate.py, which times the step: memory reads the same _Structure and the
pipeline's in-flight micro-batches but none of the timing, and planner/cost/memory.py's formulas per piece.
"""
from __future__ import annotations

from planner.cost import longctx, memory, moe
from planner.cost.estimate_structure import _BY_MODEL, _cache_for, _Structure
from planner.core.plan import ParallelPlan


def expert_data_parallel(plan: ParallelPlan) -> int:
    """EDP = dp*cp*tp / (ep*etp): the ranks that hold the same experts (Megatron parallel_state.py; MoE
    Parallel Folding, formulas.md section 6)."""
    return plan.dp * plan.cp * plan.tp // (plan.ep * (plan.etp or plan.tp))


def _memory(model, st: _Structure, workload, plan, pipe, params_dev, stage_params, dev, stage_expert=None) -> dict:
    e_w = 2 if workload.dtype in ("bf16", "fp16", "fp8") else 4
    e_act = 2 if workload.dtype != "fp32" else 4
    g = 4 if workload.grad_dtype == "fp32" else 2
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

    act_of = [act(layer, policy) for layer, policy in st.reps]
    act_none = [act(layer, "none") for layer, _ in st.reps]  # what each layer materialises in its backward
    kv_of = [0.0] * len(st.reps)  # one chunk's K/V per layer, when the sequence runs in chunks
    ring_memo: dict = {}

    def ring_of(k):  # a chunk's ring pass: its own queries, its whole prefix's K/V (the last chunk's: s)
        if k not in ring_memo:
            ring_memo[k] = float(longctx.ring_forward_buffers_bytes(st.reps[k][0], plan.mbs, s_item, workload.seq_len,
                                                                    plan.tp, plan.cp, e_act))
        return ring_memo[k]
    if plan.seq_chunks > 1:
        kv_of = [float(longctx.chunk_kv_bytes(layer, plan.mbs, s_item, plan.tp, plan.cp, e_act))
                 for layer, _ in st.reps]
    work_of: dict = {}  # backward working set per distinct block (reps indices)
    stages = []
    for stage in range(plan.pp):
        states = memory.model_state_bytes(stage_params[stage], plan.dp * plan.cp, plan.zero, weight_dtype_bytes=e_w,
                                          grad_dtype_bytes=g, optimizer=workload.optimizer)
        edp = expert_data_parallel(plan)
        if stage_expert is not None and stage_expert[stage] > 0 and edp != plan.dp * plan.cp:
            # dense parameters shard over dp x cp, routed experts over EDP (Megatron's expert-data group)
            dense = memory.model_state_bytes(stage_params[stage] - stage_expert[stage], plan.dp * plan.cp,
                                             plan.zero, weight_dtype_bytes=e_w, grad_dtype_bytes=g,
                                             optimizer=workload.optimizer)
            routed = memory.model_state_bytes(stage_expert[stage], edp, plan.zero, weight_dtype_bytes=e_w,
                                              grad_dtype_bytes=g, optimizer=workload.optimizer)
            states = {k: dense[k] + routed[k] for k in ("weights", "gradients", "optimizer")}
        frozen = sum(float(layer.params_per_device(tp=plan.tp)) * e_w for layer in st.frozen[stage])
        act_one = 0.0
        for k in st.acts[stage]:
            act_one += act_of[k]
        inflight = pipe.peak_inflight[stage] / plan.vpp if plan.vpp > 1 else pipe.peak_inflight[stage]
        acts = act_one * inflight * (1 - plan.offload.activations)
        # chunked sequences: K/V later chunks read and dK/dV earlier ones wait for (longctx.seq_chunk_kv_bytes)
        kv = 0.0
        if plan.seq_chunks > 1:
            for k in st.acts[stage]:
                share = 1.0 if st.reps[k][1] == "full" else plan.offload.activations
                kv += longctx.seq_chunk_kv_bytes(kv_of[k], inflight, plan.seq_chunks, share)
        # the block in backward: re-materialised activations and activation gradients, once per stage, on
        # the device whatever is offloaded (memory.backward_working_bytes)
        working = 0.0
        for blk in st.blocks[stage]:
            hit = work_of.get(blk)
            if hit is None:
                hit = work_of[blk] = float(memory.backward_working_bytes([act_none[k] for k in blk],
                                                                         [act_of[k] for k in blk]))
            working = max(working, hit)
        # ring context parallelism: one attention forward's retained K/V, partial outputs and LSEs
        # (longctx.ring_forward_buffers_bytes), freed before the backward's working set is built: only what
        # exceeds that working set adds to the peak
        ring = 0.0
        for k in (st.acts[stage] if plan.cp > 1 and plan.cp_comm == "ring" else ()):
            ring = max(ring, ring_of(k))
        ring = max(0.0, ring - working)
        # the loss's 16-bit logits copy beside the saved fp32 ones, one micro-batch (Layer.logits_transient_bytes)
        logits = 0.0
        for layer in st.heads[stage]:
            logits += float(layer.logits_transient_bytes(plan.mbs, s_item, plan.tp, plan.cp, e_act))
        opt = states["optimizer"] * (1 - plan.offload.optimizer)
        subtotal = states["weights"] + states["gradients"] + opt + frozen + acts + working + logits + kv + ring
        overhead = memory.allocator_overhead_bytes(subtotal)
        stages.append({"weights_bytes": states["weights"] + frozen, "gradients_bytes": states["gradients"],
                       "optimizer_bytes": opt, "activations_bytes": acts, "backward_working_bytes": working,
                       "logits_transient_bytes": logits, "seq_chunk_kv_bytes": kv, "cp_ring_buffers_bytes": ring,
                       "overhead_bytes": overhead,
                       "total_bytes": subtotal + overhead})
    worst = max(stages, key=lambda d: d["total_bytes"])
    return {**worst, "stages": stages}
