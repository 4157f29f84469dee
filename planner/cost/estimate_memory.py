"""Memory per device of a plan (_memory): model states, frozen weights, activations in flight, the backward
working set, logits, chunked-sequence K/V and ring buffers, per stage, and the worst stage.

Separate from planner/cost/estimate.py, which times the step: memory reads the same _Structure and the
pipeline's in-flight micro-batches but none of the timing, and planner/cost/memory.py's formulas per piece.
"""
from __future__ import annotations

from planner.core import dtypes
from planner.core.plan import ParallelPlan
from planner.cost import longctx, memory, moe
from planner.cost.estimate_structure import _BY_MODEL, _cache_for, _Structure


def expert_data_parallel(plan: ParallelPlan) -> int:
    """EDP = dp*cp*tp / (ep*etp): the ranks that hold the same experts (Megatron parallel_state.py; MoE
    Parallel Folding, docs/formulas.md#moe-folding)."""
    return plan.dp * plan.cp * plan.tp // (plan.ep * (plan.etp or plan.tp))


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


def _model_states(workload, plan, params: float, expert_params: float | None, e_w: int, g: int) -> dict:
    """Weights, gradients and optimizer states per device of one stage: dense parameters shard over dp x cp,
    routed experts over EDP (Megatron's expert-data group)."""
    states = memory.model_state_bytes(params, plan.dp * plan.cp, plan.zero, weight_dtype_bytes=e_w,
                                      grad_dtype_bytes=g, optimizer=workload.optimizer)
    edp = expert_data_parallel(plan)
    if expert_params is not None and expert_params > 0 and edp != plan.dp * plan.cp:
        dense = memory.model_state_bytes(params - expert_params, plan.dp * plan.cp,
                                         plan.zero, weight_dtype_bytes=e_w, grad_dtype_bytes=g,
                                         optimizer=workload.optimizer)
        routed = memory.model_state_bytes(expert_params, edp, plan.zero, weight_dtype_bytes=e_w,
                                          grad_dtype_bytes=g, optimizer=workload.optimizer)
        states = {k: dense[k] + routed[k] for k in ("weights", "gradients", "optimizer")}
    return states


def _stage_transients(st: _Structure, plan, stage: int, sizes: _LayerBytes, inflight: float) -> tuple:
    """(chunked-sequence K/V, backward working set, ring buffers, loss logits) bytes of one stage."""
    # chunked sequences: K/V later chunks read and dK/dV earlier ones wait for (longctx.seq_chunk_kv_bytes)
    kv = 0.0
    if plan.seq_chunks > 1:
        for k in st.acts[stage]:
            share = 1.0 if st.reps[k][1] == "full" else plan.offload.activations
            kv += longctx.seq_chunk_kv_bytes(sizes.kv_of[k], inflight, plan.seq_chunks, share)
    # the block in backward, once per stage, on the device whatever is offloaded
    working = 0.0
    working_of = sizes.working_of
    for blk in st.blocks[stage]:
        working = max(working, working_of[blk])
    # ring context parallelism: one attention forward's retained K/V, partial outputs and LSEs
    # (longctx.ring_forward_buffers_bytes), freed before the backward's working set is built: only what
    # exceeds that working set adds to the peak
    ring = 0.0
    for k in (st.acts[stage] if plan.cp > 1 and plan.cp_comm == "ring" else ()):
        ring = max(ring, sizes.ring(k))
    ring = max(0.0, ring - working)
    # the loss's 16-bit logits copy beside the saved fp32 ones, one micro-batch (Layer.logits_transient_bytes)
    logits = 0.0
    for layer in st.heads[stage]:
        logits += float(layer.logits_transient_bytes(plan.mbs, sizes.s_item, plan.tp, plan.cp, sizes.e_act))
    return kv, working, ring, logits


def _memory(model, st: _Structure, workload, plan, pipe, params_dev, stage_params, dev, stage_expert=None) -> dict:
    """Bytes per device of every stage (model states, frozen weights, activations in flight, transients,
    allocator overhead) and of the worst one: {**worst stage, "stages": [...]}."""
    e_w = dtypes.weight_bytes(workload.dtype)
    g = dtypes.gradient_bytes(workload.grad_dtype)
    sizes = _LayerBytes(model, st, workload, plan, dtypes.activation_bytes(workload.dtype))
    stages = []
    for stage in range(plan.pp):
        states = _model_states(workload, plan, stage_params[stage],
                               None if stage_expert is None else stage_expert[stage], e_w, g)
        frozen = sum(float(layer.params_per_device(tp=plan.tp)) * e_w for layer in st.frozen[stage])
        act_one = 0.0
        act_of = sizes.act_of
        for k in st.acts[stage]:
            act_one += act_of[k]
        inflight = pipe.peak_inflight[stage] / plan.vpp if plan.vpp > 1 else pipe.peak_inflight[stage]
        acts = act_one * inflight * (1 - plan.offload.activations)
        kv, working, ring, logits = _stage_transients(st, plan, stage, sizes, inflight)
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
