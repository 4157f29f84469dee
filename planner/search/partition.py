"""Uneven pipeline stage partition by dynamic programming.

The even split (`split_chunks` with no partition) gives every pipeline chunk the same number of
transformer blocks, but the embedding rides on the first chunk and the final norm + LM head on the last;
with a 128k vocabulary the head of Llama 3.1 405B costs about half a block and holds a quarter-billion
parameters per tp rank, and under 1F1B the first stage also holds the most micro-batches in flight.
Llama 3 therefore trains 126 blocks on pp=16 as 7 + 14 x 8 + 7 (Llama 3 paper, section 3.3.2).

Three pieces:
  block_costs     per-block (and per head/tail extra) time, parameters, model-state and activation bytes,
                  every number taken from the cost model's own functions (the estimate's per-layer column,
                  Layer.activation_bytes, Layer.params_per_device, memory_phase.stage_memory).
  partition_dp    an exact DP over contiguous splits of n blocks into k chunks: minimise the slowest
                  chunk's time per micro-batch, then (ties) its largest parameter count, then its peak
                  memory, subject to every chunk fitting in memory. O(k (n - k + 1)^2) numpy work over
                  prefix sums (about 10 ms for 126 blocks on 64 chunks).
  best_partition  runs the DP, evaluates its plan and the even split with the real `estimate`, returns
                  the better one.

Why that objective: for 1F1B with m >> p the simulated step is about (m - 1) x the slowest stage plus one
pass through all stages (Narayanan et al. 2021, section 2.2.1), and that pass does not depend on the split;
what is left of the step (the data-parallel gradient reduction and the optimizer step) follows the stage
with the most parameters (`estimate` takes that stage), hence the first tie-break. Peak memory is the last
tie-break so that, among equally fast splits, the one with the most headroom wins. The objective is not
the simulated step itself: the 1F1B simulation charges a lighter first stage about one block's time more
than a lighter last one, which no per-chunk objective sees. That is why best_partition keeps the even
split when estimate() finds it faster.

With vpp = 1 a chunk is a stage, so the DP is exact for this objective. With vpp > 1 (interleaving) a
stage runs vpp chunks, and the DP balances chunks rather than stages: an approximation. Its memory
check is then conservative (each chunk must fit in 1/vpp of the device, allocator constant included).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from planner.core import dtypes
from planner.core.dims import RECOMPUTE_POLICIES as POLICIES
from planner.core.errors import BadInput, Infeasible
from planner.core.hardware import Cluster
from planner.core.model import Layer, ModelGraph
from planner.core.plan import Estimate, ParallelPlan, Workload
from planner.cost import memory, memory_phase, pipeline
from planner.cost.batch_context import cost_context
from planner.cost.chunks import policies as _policies
from planner.cost.chunks import split_chunks
from planner.cost.estimate import estimate, layer_tuple

OBJECTIVES = ("time", "params", "memory")
# Relative slack when a lexicographic pass keeps the optimum of the previous one: prefix-sum differences
# and direct sums of the same floats can differ in the last bits.
_RTOL = 1e-9


@dataclass(frozen=True)
class BlockCosts:
    """Per transformer block (arrays of length n, in block order) and per extra, on one device.

    time_s / act_bytes: forward + backward time and saved activations for one micro-batch, for a block
    at a position >= recompute_cut of its chunk; early_time_s / early_act_bytes: the same at a position
    < recompute_cut (Megatron's block method recomputes the first N blocks of every chunk; cut 0: every
    position is "late"). params: trainable parameters per device. state_bytes: weights, gradients and
    optimizer states on the device (after ZeRO sharding and optimizer offload) plus frozen weights.
    head_*: layers before the first block (embedding, frozen encoders), carried by the first chunk;
    tail_*: layers after the last block (final norm, LM head), carried by the last chunk.
    work_bytes / early_work_bytes: each block's backward working set (memory.backward_working_bytes) at a
    late / early position; a chunk holds its largest block's, once (None: zeros). *_logit_bytes: the loss
    logits copy (Layer.logits_transient_bytes) the head / tail extras add to their chunk, once.
    """

    time_s: np.ndarray
    act_bytes: np.ndarray
    early_time_s: np.ndarray
    early_act_bytes: np.ndarray
    params: np.ndarray
    state_bytes: np.ndarray
    recompute_cut: int = 0
    head_time_s: float = 0.0
    head_act_bytes: float = 0.0
    head_params: float = 0.0
    head_state_bytes: float = 0.0
    tail_time_s: float = 0.0
    tail_act_bytes: float = 0.0
    tail_params: float = 0.0
    tail_state_bytes: float = 0.0
    work_bytes: np.ndarray | None = None
    early_work_bytes: np.ndarray | None = None
    head_logit_bytes: float = 0.0
    tail_logit_bytes: float = 0.0

    @property
    def n(self) -> int:
        return len(self.time_s)


@dataclass(frozen=True)
class Partition:
    """A split of n blocks into k chunks: ranges[c] = [first, last) of chunk c, and the DP's view of it."""

    ranges: tuple[tuple[int, int], ...]
    chunk_time_s: tuple[float, ...]
    chunk_params: tuple[float, ...]
    chunk_memory_bytes: tuple[float, ...]

    @property
    def max_time_s(self) -> float:
        return max(self.chunk_time_s)

    @property
    def max_params(self) -> float:
        return max(self.chunk_params)

    @property
    def max_memory_bytes(self) -> float:
        return max(self.chunk_memory_bytes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in self.ranges)


# ----------------------------------------------------------------------------------------------
# block costs from the cost model


def _dtype_bytes(workload: Workload) -> tuple[int, int, int, int]:
    """(activation bytes in CostContext, weight bytes, saved-activation bytes, gradient bytes) as estimate() uses
    them: planner/core/dtypes.py declares them for every module."""
    dtype = workload.dtype
    e_act = dtypes.activation_bytes(dtype)
    return e_act, dtypes.weight_bytes(dtype), e_act, dtypes.gradient_bytes(workload.grad_dtype)


class _LayerTerms:
    """One plan's per-layer cost terms, read from the estimate's own column of per-layer values
    (batch_context.CostContext.columns: the same numbers estimate() sums), by layer shape."""

    def __init__(self, model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan):
        self.workload, self.plan = workload, plan
        _, self.e_w, self.e_act, _ = _dtype_bytes(workload)
        self.ctx = cost_context(model, cluster, workload)
        self.col = int(self.ctx.columns(layer_tuple(plan, workload))[0])

    def _at(self, name: str, layer: Layer, policy: str | None = None) -> float:
        si = self.ctx.shape_of[layer.shape_key]
        lv = self.ctx.lv[name]
        return float(lv[si, self.col] if policy is None else lv[si, POLICIES.index(policy), self.col])

    def time_s(self, layer: Layer, policy: str) -> float:
        """Forward + backward seconds of one micro-batch."""
        return self._at("fwd", layer, policy) + self._at("bwd", layer, policy)

    def act_bytes(self, layer: Layer, policy: str) -> float:
        """Saved activations of one micro-batch (one work item of a chunked sequence)."""
        return self._at("act", layer, policy)

    def params(self, layer: Layer) -> float:
        """Trainable parameters per device, as estimate() shards them."""
        return self._at("par", layer)

    def expert_params(self, layer: Layer) -> float:
        """The routed experts' share of params(layer)."""
        return self._at("parx", layer)

    def frozen_bytes(self, layer: Layer) -> float:
        """Frozen weights: split tp ways, no gradients or optimizer states, not ZeRO-sharded."""
        return self._at("froz", layer)

    def working_bytes(self, layers: list[Layer], policy: str) -> float:
        """A block's backward working set: its trainable layers, what they materialise vs what the policy
        keeps (estimate._stage_memory)."""
        ls = [x for x in layers if x.trainable]
        return float(memory.backward_working_bytes([self.act_bytes(x, "none") for x in ls],
                                                   [self.act_bytes(x, policy) for x in ls]))


def _state_bytes(workload: Workload, plan: ParallelPlan, params, expert_params, frozen) -> np.ndarray:
    """Weights, gradients and the optimizer's on-device share (memory_phase.stage_memory's model-state parts,
    routed experts sharded over EDP) plus frozen weights, of each entry. They are linear in the parameters,
    so per-block states add up to a chunk's."""
    _, e_w, _, g = _dtype_bytes(workload)
    row = lambda a: np.asarray(a, dtype=float).reshape(1, -1)  # noqa: E731  one row, an entry per stage
    one = lambda v: np.full((1, 1), v, dtype=float)  # noqa: E731  a plan column
    none = one(0.0)
    x = memory_phase.StageInputs(
        params_count=row(params), expert_params_count=row(expert_params), frozen_bytes=row(frozen),
        activation_bytes=none, inflight_items=none, working_bytes=none, logits_bytes=none, ring_bytes=none,
        kv_full_bytes=none, kv_rest_bytes=none, dp_cp=one(plan.dp * plan.cp),
        edp=one(memory_phase.expert_data_parallel(plan.dp, plan.cp, plan.tp, plan.ep, plan.etp or plan.tp)),
        seq_chunks=one(1), offload_activations=none, offload_optimizer=one(plan.offload.optimizer))
    mem = memory_phase.stage_memory(x, plan.zero, e_w, g, workload.optimizer)
    return (mem.weights_bytes + mem.gradients_bytes + mem.optimizer_bytes + mem.frozen_bytes)[0]


def _extras(terms: _LayerTerms, layers: list[Layer]) -> dict:
    """The head or tail extra: the layers of a chunk outside every block, under their own policies."""
    plan, workload = terms.plan, terms.workload
    layers = [layer for layer in layers if layer.block is None]
    pol = _policies(layers, plan)
    p = sum(terms.params(x) for x in layers)
    logit = 0.0
    for x in layers:  # estimate._stage_memory sums them in layer order
        logit += float(x.logits_transient_bytes(plan.mbs, workload.seq_len, plan.tp, plan.cp, terms.e_act))
    frozen = sum(terms.frozen_bytes(x) for x in layers)
    return {"time_s": float(sum(terms.time_s(x, pol[x.name]) for x in layers)),
            "act_bytes": float(sum(terms.act_bytes(x, pol[x.name]) for x in layers)),
            "params": float(p), "state_bytes": float(_state_bytes(workload, plan, p, 0.0, frozen)[0]),
            "logit_bytes": logit}


def block_costs(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan) -> BlockCosts:
    """Cost terms of every block and of the head/tail extras under `plan` (its partition is ignored)."""
    plan = plan.model_copy(update={"partition": None})
    chunks = split_chunks(model, plan)  # BadInput when the model has fewer blocks than pp*vpp chunks
    terms = _LayerTerms(model, cluster, workload, plan)
    cut = plan.recompute_num_layers or 0
    early_policy = plan.layer_recompute(0)
    late_policy = plan.layer_recompute(cut)

    order = model.topological()
    block_ids = sorted({layer.block for layer in order if layer.block is not None})
    index = {blk: i for i, blk in enumerate(block_ids)}
    n = len(block_ids)
    late_t, early_t, late_a, early_a, par, froz, parx = (np.zeros(n) for _ in range(7))
    in_block: list = [[] for _ in range(n)]  # each block's layers, for its backward working set
    for layer in order:
        if layer.block is None:
            continue
        i = index[layer.block]
        in_block[i].append(layer)
        late_t[i] += terms.time_s(layer, late_policy)
        early_t[i] += terms.time_s(layer, early_policy)
        late_a[i] += terms.act_bytes(layer, late_policy)
        early_a[i] += terms.act_bytes(layer, early_policy)
        par[i] += terms.params(layer)
        parx[i] += terms.expert_params(layer)
        froz[i] += terms.frozen_bytes(layer)
    late_w = np.array([terms.working_bytes(ls, late_policy) for ls in in_block])
    early_w = np.array([terms.working_bytes(ls, early_policy) for ls in in_block])

    # split_chunks puts what precedes the first block on chunk 0 and what follows the last on chunk k-1;
    # with one chunk both sit on it, and counting them all as head gives the same chunk totals.
    head = _extras(terms, chunks[0])
    tail = _extras(terms, chunks[-1]) if len(chunks) > 1 else _extras(terms, [])
    return BlockCosts(time_s=late_t, act_bytes=late_a, early_time_s=early_t, early_act_bytes=early_a,
                      params=par, state_bytes=_state_bytes(workload, plan, par, parx, froz), recompute_cut=cut,
                      work_bytes=late_w, early_work_bytes=early_w,
                      **{f"head_{k}": v for k, v in head.items()}, **{f"tail_{k}": v for k, v in tail.items()})


# ----------------------------------------------------------------------------------------------
# the DP


def segments(late: np.ndarray, early: np.ndarray, cut: int, head: float, tail: float) -> np.ndarray:
    """S[l, i]: the chunk sum over blocks l..i-1, the first `cut` of them taking `early`, the rest `late`,
    plus the head extra when the chunk starts at block 0 and the tail extra when it ends at block n
    (meaningless where l >= i; callers mask those)."""
    n = len(late)
    pl = np.concatenate(([0.0], np.cumsum(late)))  # prefix sums: sum(x[l:i]) = P[i] - P[l]
    pe = np.concatenate(([0.0], np.cumsum(early)))
    lo = np.arange(n + 1)[:, None]
    hi = np.arange(n + 1)[None, :]
    mid = np.clip(lo + cut, None, hi)  # end of the chunk's early (recomputed) positions
    seg = (pe[mid] - pe[lo]) + (pl[hi] - pl[mid])
    seg[0, :] += head
    seg[:, n] += tail
    return seg


def _segment_max(late: np.ndarray, early: np.ndarray, cut: int, head: float, tail: float) -> np.ndarray:
    """M[l, i]: the largest of blocks l..i-1, the first `cut` of them taking `early`, the rest `late` (0 for
    an empty range; the values are >= 0), plus the head extra when the chunk starts at block 0 and the tail
    extra when it ends at block n: a chunk's backward working set and loss logits copy."""
    n = len(late)
    lo = np.arange(n + 1)[:, None]
    hi = np.arange(n + 1)[None, :]

    def running(x):  # R[l, i] = max(x[l:i]), 0 where i <= l
        y = np.where(hi > lo, np.concatenate(([0.0], np.asarray(x, dtype=float)))[hi], 0.0)
        return np.maximum.accumulate(y, axis=1)

    mid = np.clip(lo + cut, None, hi)
    seg = np.maximum(running(early)[lo, mid], running(late)[mid, hi])
    seg[0, :] += head
    seg[:, n] += tail
    return seg


def extra_bytes(costs: BlockCosts) -> np.ndarray:
    """_segment_max of costs' backward working set (zeros where costs carries none) and logits copy."""
    zero = np.zeros(costs.n)
    late = zero if costs.work_bytes is None else costs.work_bytes
    early = late if costs.early_work_bytes is None else costs.early_work_bytes
    return _segment_max(late, early, costs.recompute_cut, costs.head_logit_bytes, costs.tail_logit_bytes)


def band(full: np.ndarray, k: int) -> np.ndarray:
    """View of S[l, i] in band coordinates: out[c, a, b] = S[c + a, c + 1 + b], a, b in 0..n-k (the
    starts and ends chunk c can take when each of k chunks keeps at least one block). No copy."""
    n = full.shape[0] - 1
    w = n - k + 1
    s0, s1 = full.strides
    return np.lib.stride_tricks.as_strided(full[:, 1:], shape=(k, w, w), strides=(s0 + s1, s0, s1),
                                           writeable=False)


def minimax(obj: np.ndarray, allowed: np.ndarray) -> tuple[float, np.ndarray]:
    """min over splits of max_c obj[c, a_c, b_c] with allowed[c, a_c, b_c], and the chunk edges.

    Band coordinates: chunk c (of k) starts at block c + a and ends before block c + 1 + b, a, b in
    0..w-1 with w = n - k + 1 (every chunk keeps at least one block, so no other start or end can lead
    to a full split). The end of chunk c - 1 at local b is the start of chunk c at local a = b.
    f_c[b] = min_a max(f_{c-1}[a], obj[c, a, b]): the bottleneck (linear) partition recurrence
    (Skiena, The Algorithm Design Manual, section 8.5), O(k w^2). Ties go to the smallest a, so the
    answer is deterministic. Returns (inf, _) when nothing is allowed.
    """
    k, w, _ = obj.shape
    masked = np.where(allowed, obj, np.inf)
    f = masked[0, 0]  # chunk 0 starts at block 0 (a = 0)
    choice = np.zeros((k, w), dtype=np.int64)
    cols = np.arange(w)
    for c in range(1, k):
        cand = np.maximum(f[:, None], masked[c])
        choice[c] = np.argmin(cand, axis=0)
        f = cand[choice[c], cols]
    best = float(f[w - 1])  # the last chunk ends at block n
    edges = np.zeros(k + 1, dtype=np.int64)
    edges[k] = k - 1 + w
    b = w - 1
    for c in range(k - 1, 0, -1):
        b = int(choice[c, b])
        edges[c] = c + b
    return best, edges


def partition_dp(costs: BlockCosts, k: int, inflight: Sequence[float] | None = None,
                 capacity_bytes: float = math.inf,
                 overhead: Callable = memory.allocator_overhead_bytes,
                 order: Sequence[str] = OBJECTIVES) -> Partition:
    """Split costs.n blocks into k contiguous non-empty chunks, exactly optimal for `order`.

    Chunk c's memory: x = model states + activations x inflight[c] (micro-batches it holds at its peak,
    net of activation offload), plus overhead(x) (the allocator's), must be <= capacity_bytes. Among the
    splits that fit, minimise lexicographically the max over chunks of each objective in `order`
    ("time": fwd+bwd per micro-batch, "params", "memory"). Raises Infeasible when no split fits.
    """
    n = costs.n
    if k < 1 or k > n:
        raise BadInput(f"cannot split {n} blocks into {k} non-empty pipeline chunks")
    if sorted(order) != sorted(OBJECTIVES):
        raise ValueError(f"order must be a permutation of {OBJECTIVES}, got {tuple(order)}")
    infl = np.ones(k) if inflight is None else np.asarray(inflight, dtype=float)
    if infl.shape != (k,):
        raise ValueError(f"inflight needs one entry per chunk ({k}), got {infl.shape}")
    w = n - k + 1
    valid = np.arange(w)[:, None] <= np.arange(w)[None, :]  # start c + a before end c + 1 + b
    valid = np.broadcast_to(valid, (k, w, w))
    cut = costs.recompute_cut
    time = band(segments(costs.time_s, costs.early_time_s, cut, costs.head_time_s, costs.tail_time_s), k)
    par = band(segments(costs.params, costs.params, 0, costs.head_params, costs.tail_params), k)
    state = band(segments(costs.state_bytes, costs.state_bytes, 0, costs.head_state_bytes,
                            costs.tail_state_bytes), k)
    act = band(segments(costs.act_bytes, costs.early_act_bytes, cut, costs.head_act_bytes,
                          costs.tail_act_bytes), k)
    extra = band(extra_bytes(costs), k)  # the largest block's backward working set, the loss logits copy
    # allocated bytes of chunk c: states + in-flight activations + backward working set + logits copy
    held = state + act * infl[:, None, None] + extra
    mem = held + overhead(held)  # estimate._stage_memory: total = subtotal + allocator overhead
    objs = {"time": time, "params": par, "memory": mem}
    allowed = valid & (mem <= capacity_bytes)
    edges = None
    for name in order:
        best, edges = minimax(objs[name], allowed)
        if not math.isfinite(best):
            least = minimax(mem, valid)[0]
            raise Infeasible(f"no split of {n} blocks into {k} pipeline chunks fits in "
                             f"{capacity_bytes / 1e9:.1f} GB per chunk (the best needs {least / 1e9:.1f} GB)")
        # the next objective only breaks ties of this one
        allowed = allowed & (objs[name] <= best + _RTOL * abs(best))
    ranges = tuple((int(edges[c]), int(edges[c + 1])) for c in range(k))
    at = [(c, lo_ - c, hi_ - c - 1) for c, (lo_, hi_) in enumerate(ranges)]  # band coordinates
    return Partition(ranges=ranges,
                     chunk_time_s=tuple(float(time[x]) for x in at),
                     chunk_params=tuple(float(par[x]) for x in at),
                     chunk_memory_bytes=tuple(float(mem[x]) for x in at))


# ----------------------------------------------------------------------------------------------
# plans


def chunk_inflight(workload: Workload, plan: ParallelPlan) -> np.ndarray:
    """Micro-batches whose activations chunk c holds at its stage's peak, net of activation offload.

    Taken from the schedule simulation estimate() uses: peak_inflight depends on the op order only, so it
    comes from the cached compiled op order (pipeline.schedule_peaks) rather than from timing a whole
    simulation of m micro-batches per plan; under interleaving its unit is one chunk's activations (divide
    by vpp as estimate._stage_memory does)."""
    k = plan.pp * plan.vpp
    m = plan.microbatches(workload)
    try:
        peak_inflight, _ = pipeline.schedule_peaks(plan.schedule, plan.pp, m, v=plan.vpp,
                                                   seq_chunks=plan.seq_chunks)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    per_stage = np.asarray(peak_inflight, dtype=float) / (plan.vpp if plan.vpp > 1 else 1)
    return per_stage[np.arange(k) % plan.pp] * (1 - plan.offload.activations)


def with_partition(plan: ParallelPlan, ranges: Sequence[tuple[int, int]]) -> ParallelPlan:
    """`plan` with an explicit stage partition (validated like one a user writes)."""
    data = plan.model_dump()
    data["partition"] = [{"layers": (int(lo), int(hi))} for lo, hi in ranges]
    return ParallelPlan.model_validate(data)


def plan_partition(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan) -> Partition:
    """The DP's split for `plan`; when none fits in memory, the split with the least peak memory."""
    k = plan.pp * plan.vpp
    costs = block_costs(model, cluster, workload, plan)
    inflight = chunk_inflight(workload, plan)
    # vpp chunks share a device: each must fit in 1/vpp of it (exact for vpp = 1, conservative above)
    capacity = cluster.devices[0].device.memory_bytes / plan.vpp
    try:
        return partition_dp(costs, k, inflight, capacity)
    except Infeasible:
        return partition_dp(costs, k, inflight, order=("memory", "time", "params"))


def best_partition(model: ModelGraph, cluster: Cluster, workload: Workload,
                   plan: ParallelPlan) -> tuple[ParallelPlan, Estimate]:
    """The better of the DP's partition and the even split, by the real estimate(): the lower step time
    among those that fit, else the lower peak memory (the even split wins ties)."""
    if plan.pp * plan.vpp == 1:
        return plan, estimate(model, cluster, workload, plan)
    even = plan.model_copy(update={"partition": None})
    part = plan_partition(model, cluster, workload, plan)  # BadInput: too few blocks, bad micro-batch count
    even_est = estimate(model, cluster, workload, even)
    dp_plan = with_partition(plan, part.ranges)
    dp_est = estimate(model, cluster, workload, dp_plan)
    if dp_est.fits != even_est.fits:
        return (dp_plan, dp_est) if dp_est.fits else (even, even_est)
    if dp_est.fits:
        better = dp_est.step_time_s < even_est.step_time_s
    else:
        better = dp_est.peak_memory_bytes < even_est.peak_memory_bytes
    return (dp_plan, dp_est) if better else (even, even_est)
