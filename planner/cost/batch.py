"""estimate_batch: the formulas of estimate() evaluated for many plans at once, with numpy arrays over plans.

docs/ARCHITECTURE.md#data-flow "A vectorized form of the same formulas may evaluate many plans at once, but a
test holds it equal to the scalar form" (tests/test_batch.py holds every output equal to `estimate` within
rel 1e-9, `fits` exactly). Nothing here re-derives a cost formula: the layer terms come from layer_terms.py,
the step terms (DP sync and its exposure, the optimizer step, step time, throughput, MFU / HFU, pp_comm)
from step_terms.py and memory from memory_phase.py, the same functions the scalar estimate calls, here with
arrays. What remains this path's own is how plans share work (below) and the sums over layer counts that
replace the scalar estimate's loops over layers (batch_context.py), each citing the phase it sums for.

How the work is shared between plans (the scalar estimate redoes all of it per plan):

  1. Per layer: layers with the same `Layer.shape_key` cost the same. The layer terms depend on a plan only
     through (mbs, tp, cp, sp, flash_attention, ep, etp, overlap_tp_comm, cp_comm, moe_dispatch) -- the "layer
     tuple". Distinct tuples are few
     (hundreds in a batch of 100k plans); each distinct shape is evaluated once per policy (none,
     selective, full) with arrays over the distinct tuples. Collective links depend only on (tp, cp, dp,
     ep): Cluster.collective is called once per distinct group, cached per cluster.
  2. Per chunk: which layers a pipeline chunk holds depends on pp * vpp, and their recompute policies on
     (recompute, recompute_num_layers) -- a "count group". Per count group a matrix of layer counts
     (chunk x shape x policy) turns the per-shape values into per-chunk and per-stage sums by a matmul.
  3. Pipeline: per (schedule, pp, vpp, m) the op DAG is built once (cached) from the per-device orders of
     pipeline.schedule_order, as pipeline.simulate times them, and the makespan of every distinct
     pipeline problem of the group (chunk times + p2p time) is evaluated together by max-plus over the
     DAG's topological levels: end(op) = max(end(prev op on device), end(dependency) + p2p) + duration,
     with arrays over problems -- the same float operations, in the same order, as simulate.
     Peak in-flight micro-batches per stage are the same for every plan of a group: taken from the one
     simulate call that also yields the levels.
  4. Per plan: DP exposure, optimizer step and the outputs (step_terms.py), vectorized over plans. Memory per distinct
     (problem, ZeRO stage, offload fractions), in one block per (pp, ZeRO stage): (rows x stages) arrays
     gathered from the count groups' per-stage tables stacked together, one model_state_parts call each.
  5. Between calls (CostContext, per model, cluster, seq_len, dtype, grad_dtype): layer values per layer tuple,
     count group sums over every tuple seen, makespans per pipeline problem (packed int64 keys, sorted). A
     later call evaluates only what is new to it (a search calls estimate_batch again and again).

Plans on a cluster of several device types, and plans that place their stages, go through estimate() one at
a time: each of their stages has its own device and links, which estimate() reads per stage from the same
columns. Explicit partitions (ParallelPlan.partition) are one more count-group key.

Where the pieces live: the plan columns in batch_plans.py, the per-layer values and link caches in
batch_layers.py, what is kept between calls and the count-group sums in batch_context.py, the pipeline DAG in
batch_dag.py, the row-id helpers in batch_ids.py; this module checks the plans and assembles the outputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from planner.core import dtypes
from planner.core.dims import (WEIGHT_VERSIONS, microbatches_fit_schedule, quoted_names, seq_chunks_fit_schedule,
                                vpp_fits_schedule)
from planner.core.errors import BadInput, Infeasible
from planner.core.hardware import Cluster
from planner.core.layout import has_placement, one_device_type
from planner.core.model import ModelGraph
from planner.core.plan import ParallelPlan, Workload
from planner.cost import memory_phase
from planner.cost.batch_context import PER_COLUMN, PIPE_MEMO_MAX, CostContext, cost_context, group_sums
from planner.cost.batch_dag import dag_of, inflight_items, makespans
from planner.cost.batch_ids import float_ids, group_ranges, row_ids
from planner.cost.batch_layers import float_bits
from planner.cost.batch_plans import SCHEDULES, PlanArrays
from planner.cost.checks import check_context_parallel, check_deepep, check_expert_parallel, check_seq_chunks
from planner.cost.chunks import partition_key
from planner.cost.estimate import estimate
from planner.cost.schedules import get_schedule
from planner.cost.step_terms import (
    exposed_sync_s,
    low_bandwidth_exposed_s,
    offload_exposed_s,
    optimizer_step_s,
    pp_comm_s,
    state_shards,
    step_time_s,
    tokens_per_s,
    utilisation,
    zero_sync_s,
)

OUTPUTS = ("step_time_s", "tokens_per_s", "mfu", "hfu", "peak_memory_bytes", "fits", "pipeline_s",
           "pp_comm_s", "dp_comm_exposed_s", "optimizer_s", "offload_s")


# ----------------------------------------------------------------------------------------------------------
# the batch estimate


def estimate_batch(model: ModelGraph, cluster: Cluster, workload: Workload,
                   plans: list[ParallelPlan] | PlanArrays, timings: dict | None = None) -> dict[str, np.ndarray]:
    """estimate() for every plan, as arrays in the order of `plans`.

    Returns {name: ndarray}: step_time_s, tokens_per_s, mfu, hfu, peak_memory_bytes, fits (bool), and from the
    breakdown pipeline_s (the pipeline's makespan), pp_comm_s, dp_comm_exposed_s, optimizer_s, offload_s.
    The same phases as estimate(), on columns (tests/test_batch.py: equal within rel 1e-9, fits exactly).

    On a cluster of several device types, and for plans that place their stages, every stage has its own
    device and links (planner/cost/stages.py): those plans go through estimate() one at a time.
    Raises BadInput, as estimate() would, for the first plan whose degrees do not match the cluster or the
    batch. `timings`, when given, receives seconds per phase.
    """
    t_start = time.perf_counter()
    tm = timings if timings is not None else {}
    for k in ("prepare", "layers", "chunks", "pipeline", "step+memory", "one by one"):
        tm.setdefault(k, 0.0)
    n_all = len(plans)
    mixed = not one_device_type(cluster)
    # frozen work filled into the bubbles (frozen_fill.py) needs the per-op timeline: estimate() one at a time
    if isinstance(plans, PlanArrays):
        is_slow = np.full(n_all, mixed) | plans.fill_frozen
        slow = np.flatnonzero(is_slow)
        slow_plans = [plans.plan(int(i)) for i in slow]
        fast_rows = np.flatnonzero(~is_slow)
        pa = plans.take(fast_rows) if len(slow) else plans
        part_keys = None
    else:
        is_slow = np.array([mixed or has_placement(p) or p.fill_frozen for p in plans], dtype=bool)
        slow = np.flatnonzero(is_slow)
        slow_plans = [plans[int(i)] for i in slow]
        fast_rows = np.flatnonzero(~is_slow)
        fast = [plans[int(i)] for i in fast_rows]
        pa = PlanArrays.from_plans(fast, partitions=True)
        part_keys = [partition_key(p) for p in fast]
    out = {k: np.zeros(n_all, dtype=bool if k == "fits" else float) for k in OUTPUTS}
    tm["prepare"] += time.perf_counter() - t_start

    t0 = time.perf_counter()
    for i, plan in zip(slow.tolist(), slow_plans):
        est = estimate(model, cluster, workload, plan)
        for k in ("step_time_s", "tokens_per_s", "mfu", "hfu", "peak_memory_bytes", "fits"):
            out[k][i] = getattr(est, k)
        # not in Estimate: estimate() adds the exposed DP traffic, optimizer step and offload to the pipeline's
        # makespan; taken back off (to rounding), it stays usable for the search's step-time bound
        bd = est.breakdown
        out["pipeline_s"][i] = est.step_time_s - bd["dp_comm_exposed_s"] - bd["optimizer_s"] - bd["offload_s"]
        for k in ("pp_comm_s", "dp_comm_exposed_s", "optimizer_s", "offload_s"):
            out[k][i] = bd[k]
    tm["one by one"] += time.perf_counter() - t0
    if len(pa):
        res = _estimate_arrays(model, cluster, workload, pa, part_keys, tm)
        for k in OUTPUTS:
            out[k][fast_rows] = res[k]
    return out


def _check(pa: PlanArrays, cluster: Cluster, workload: Workload, model: ModelGraph, m: np.ndarray) -> None:
    """The refusals of checks.check_plan, split_chunks, ParallelPlan and pipeline.check_schedule_args."""
    n = pa.dp * pa.tp * pa.pp * pa.cp

    def first(mask, msg):
        bad = np.flatnonzero(mask)
        if len(bad):
            i = int(bad[0])
            raise BadInput(f"plan {i}: {msg(i)}")

    first(n != cluster.device_count, lambda i: f"plan uses dp*tp*pp*cp = {pa.dp[i]}*{pa.tp[i]}*{pa.pp[i]}*"
          f"{pa.cp[i]} = {n[i]} devices, cluster {cluster.name} has {cluster.device_count}")
    first(workload.global_batch % (pa.mbs * pa.dp) != 0,
          lambda i: f"global batch {workload.global_batch} is not divisible by mbs*dp = {pa.mbs[i]}*{pa.dp[i]}")
    first(~vpp_fits_schedule(pa.schedule, pa.vpp),
          lambda i: f"vpp={pa.vpp[i]} needs schedule {quoted_names('virtual_stages')}")
    first(pa.sp & (pa.tp == 1), lambda i: "sequence parallel (sp) needs tp > 1")
    # ParallelPlan._check and estimate.check_seq_chunks: chunked sequences
    chunked = pa.seq_chunks > 1
    first(~seq_chunks_fit_schedule(pa.schedule, pa.seq_chunks) | (chunked & ~pa.flash_attention),
          lambda i: f"seq_chunks={pa.seq_chunks[i]} needs schedule {quoted_names('sequence_chunks')} and flash "
                    "attention")
    first(chunked & (workload.seq_len % (pa.seq_chunks * np.where(pa.cp > 1, 2 * pa.cp, 1)) != 0),
          lambda i: f"seq_chunks {pa.seq_chunks[i]}: sequence {workload.seq_len} must divide into {pa.seq_chunks[i]} "
                    f"chunks" + (f" of 2*cp = {2 * pa.cp[i]} parts" if pa.cp[i] > 1 else ""))
    if chunked.any():
        check_seq_chunks(model, pa.plan(int(np.flatnonzero(chunked)[0])), workload.seq_len)
        if workload.documents is not None:
            first(chunked, lambda i: "seq_chunks > 1 with Workload.documents is not modelled (chunk costs assume one "
                                     "causal document per sequence); use seq_chunks 1")
    if cluster.nodes[0].host_link is None and ((pa.offload_optimizer > 0) | (pa.offload_activations > 0)).any():
        raise Infeasible(f"node type {cluster.nodes[0].node_type.name} has no host_link: offload needs one")
    # estimate.check_context_parallel, once per distinct (tp, cp) of the Ulysses plans
    a2a = np.flatnonzero(pa.cp_a2a)
    for i in a2a[row_ids([pa.tp[a2a], pa.cp[a2a]])[0]]:
        try:
            check_context_parallel(model, pa.plan(int(i)))
        except BadInput as e:
            raise BadInput(f"plan {int(i)}: {e}") from None
    # ParallelPlan._check: Pipeline MoE puts E/tp whole experts on each TP rank
    first(pa.moe_tp_slice & ((pa.tp == 1) | (pa.ep != pa.tp) | (pa.etp != 1)),
          lambda i: f"moe_dispatch 'tp_slice' needs tp > 1, ep = tp and etp = 1; got tp={pa.tp[i]}, ep={pa.ep[i]}, "
                    f"etp={pa.etp[i] or None}")
    first(pa.moe_deepep & (pa.ep == 1), lambda i: "moe_dispatch 'deepep' needs ep > 1")
    check_deepep(pa.moe_deepep, workload)
    # estimate.check_expert_parallel, once per distinct (ep, etp, dp, cp, tp); it accepts ep = 1 without
    # looking further, so only plans with ep > 1 are checked. row_ids lists the distinct rows in the
    # lexicographic order np.unique(axis=...) would, without its argsort of a structured view (which took
    # most of a hot 100k-plan call).
    moe_rows = np.flatnonzero(pa.ep != 1)
    firsts = row_ids([pa.ep[moe_rows], pa.etp[moe_rows], pa.dp[moe_rows], pa.cp[moe_rows], pa.tp[moe_rows]])[0]
    for i in moe_rows[firsts]:
        try:
            check_expert_parallel(model, pa.plan(int(i)))
        except BadInput as e:
            raise BadInput(f"plan {int(i)}: {e}") from None
    first(~microbatches_fit_schedule(pa.schedule, m, pa.pp),
          lambda i: f"{SCHEDULES[pa.schedule[i]]} needs at least as many micro-batches ({m[i]}) as pipeline stages ({pa.pp[i]})")
    blocks = model.num_blocks
    if blocks:
        first(pa.pp * pa.vpp > blocks,
              lambda i: f"pp*vpp = {pa.pp[i] * pa.vpp[i]} pipeline chunks but the model has only {blocks} blocks")
    for name in ("dp", "tp", "pp", "vpp", "cp", "ep", "mbs"):
        first(getattr(pa, name) < 1, lambda i, name=name: f"{name} must be >= 1")
    first((pa.zero < 0) | (pa.zero > 3), lambda i: "zero must be 0-3")


@dataclass(slots=True)
class _Batch:
    """What the phases of one _estimate_arrays call share: the plans, columns derived from them, the ids that
    group them, and what each phase adds for the next (read-only once set)."""

    pa: PlanArrays
    ctx: CostContext
    device: object  # every plan's device (the batch path serves one device type only)
    items: np.ndarray  # work items per step: micro-batches * seq_chunks
    etp: np.ndarray  # expert tensor-parallel degree, tp where the plan leaves it 0
    act_bytes: int  # bytes per element of activations and of what the step sends
    weight_bytes: int
    grad_bytes: int
    host_bytes_per_s: float | None  # the host link (optimizer offload), None without one
    tuples: np.ndarray  # the batch's distinct layer tuples, one row each
    column_of: np.ndarray  # every plan's row in `tuples`; after _layers, its column of ctx
    cg_keys: np.ndarray  # distinct count groups (pp, vpp, recompute, recompute_num_layers)
    cg_of: np.ndarray
    pg_keys: np.ndarray  # distinct pipeline groups (schedule, pp, vpp, micro-batches, seq_chunks)
    pg_of: np.ndarray
    groups: list | None = None  # _chunk_sums: batch_context.group_sums of every count group
    cu_of: np.ndarray | None = None  # _chunk_sums: every plan's distinct (count group, column)
    cu_cg: np.ndarray | None = None
    cu_u: np.ndarray | None = None
    per_cu: dict | None = None  # _chunk_sums: PER_COLUMN values per (count group, column)
    pr_of: np.ndarray | None = None  # _pipeline_makespans: every plan's pipeline problem
    pr_pg: np.ndarray | None = None
    pr_cg: np.ndarray | None = None
    pr_u: np.ndarray | None = None
    p2p_pr: np.ndarray | None = None  # per problem: one stage-to-stage transfer, seconds
    pipe_pr: np.ndarray | None = None  # per problem: the pipeline's makespan, seconds


def _estimate_arrays(model, cluster, workload, pa: PlanArrays, part_keys: list | None, tm: dict) -> dict:
    """estimate()'s phases on columns of plans: prepare -> layers -> chunk sums -> pipeline makespans -> step
    -> memory -> outputs; tm receives seconds per phase."""
    t0 = time.perf_counter()
    b = _prepare(model, cluster, workload, pa, part_keys)
    t1 = time.perf_counter()
    _layers(b)
    t2 = time.perf_counter()
    _chunk_sums(b, cluster, workload)
    t3 = time.perf_counter()
    _pipeline_makespans(b)
    t4 = time.perf_counter()
    step = _step(b)
    peak_mem = _peak_memory(pa, workload, b.ctx, b.groups, b.pg_keys, b.pr_of, b.pr_pg, b.pr_cg, b.pr_u, b.etp,
                            b.weight_bytes, b.grad_bytes)
    out = _outputs(b, workload, step, peak_mem, cluster.device_count)
    t5 = time.perf_counter()
    for k, dt in (("prepare", t1 - t0), ("layers", t2 - t1), ("chunks", t3 - t2), ("pipeline", t4 - t3),
                  ("step+memory", t5 - t4)):
        tm[k] += dt
    return out


def _prepare(model, cluster, workload, pa: PlanArrays, part_keys: list | None) -> _Batch:
    """The checks, micro-batches and work items (as ParallelPlan.microbatches and estimate._setup), bytes per
    element, and the ids that group the plans: distinct layer tuples (what the layer terms depend on), count
    groups (which layers each chunk holds) and pipeline groups (one op DAG each)."""
    m = np.where(pa.num_microbatches > 0, pa.num_microbatches,
                 np.maximum(1, workload.global_batch // (pa.mbs * pa.dp)))
    _check(pa, cluster, workload, model, m)
    etp = np.where(pa.etp > 0, pa.etp, pa.tp)
    # the layer tuple (batch_layers.TUPLE)
    lt_cols = [pa.mbs, pa.tp, pa.cp, pa.sp, pa.flash_attention, pa.ep, etp, pa.overlap_tp_comm, pa.cp_a2a,
               pa.moe_tp_slice, pa.seq_chunks, pa.moe_deepep, float_bits(pa.offload_activations),
               pa.dp if workload.documents is not None else np.zeros(len(pa), dtype=np.int64), pa.attention_pool,
               float_bits(pa.act_compression)]
    u_first, u_of = row_ids(lt_cols)
    ctx = cost_context(model, cluster, workload)
    # explicit partitions: one more count-group column, the context's id of each plan's partition (0: even split)
    part = np.zeros(len(pa), dtype=np.int64) if part_keys is None else ctx.partition_ids(part_keys)
    cg_first, cg_of = row_ids([pa.pp, pa.vpp, pa.recompute, pa.recompute_num_layers + 1, part])
    pg_first, pg_of = row_ids([pa.schedule, pa.pp, pa.vpp, m, pa.seq_chunks])
    return _Batch(
        pa=pa, ctx=ctx, device=cluster.devices[0].device, items=m * pa.seq_chunks,
        etp=etp, act_bytes=dtypes.activation_bytes(workload.dtype), weight_bytes=dtypes.weight_bytes(workload.dtype),
        grad_bytes=dtypes.gradient_bytes(workload.grad_dtype),
        host_bytes_per_s=None if cluster.nodes[0].host_link is None else cluster.nodes[0].host_link.bytes_per_s,
        tuples=np.stack([np.asarray(c, dtype=np.int64)[u_first] for c in lt_cols], axis=1), column_of=u_of,
        cg_keys=np.stack([pa.pp[cg_first], pa.vpp[cg_first], pa.recompute[cg_first],
                          pa.recompute_num_layers[cg_first], part[cg_first]], axis=1), cg_of=cg_of,
        pg_keys=np.stack([pa.schedule[pg_first], pa.pp[pg_first], pa.vpp[pg_first], m[pg_first],
                          pa.seq_chunks[pg_first]], axis=1), pg_of=pg_of)


def _layers(b: _Batch) -> None:
    """Layer terms: each plan's column of ctx, evaluating the layer values of tuples new to it."""
    b.column_of = b.ctx.columns(b.tuples)[b.column_of]


def _chunk_sums(b: _Batch, cluster: Cluster, workload: Workload) -> None:
    """Chunk sums: per count group, for every column, the chunk and stage sums, DP traffic and p2p time
    (batch_context.group_sums); gathered per distinct (count group, column) the plans use."""
    ctx, G = b.ctx, len(b.ctx.tuples)
    b.groups = [group_sums(ctx, pp, vpp, rc, rnl, cluster.device_count, b.act_bytes, b.weight_bytes, b.grad_bytes,
                             workload.seq_len, ctx.partitions[pid]) for pp, vpp, rc, rnl, pid in b.cg_keys.tolist()]
    cu_first, b.cu_of = row_ids([b.cg_of, b.column_of])
    b.cu_cg, b.cu_u = b.cg_of[cu_first], b.column_of[cu_first]
    flat = b.cu_cg * G + b.cu_u
    b.per_cu = {k: np.stack([x[k] for x in b.groups]).ravel()[flat] for k in PER_COLUMN}


def _pipeline_makespans(b: _Batch) -> None:
    """Pipeline: the makespan of every distinct problem (pipeline group, count group, column). A problem's
    makespan is fixed by those three once the model, the cluster, seq_len and dtype are: what an earlier call
    on them computed is reused (a search calls estimate_batch again and again on one cluster; most of its
    pipeline problems repeat). Keys: the three ids packed in an int64."""
    ctx = b.ctx
    pr_first, b.pr_of = row_ids([b.pg_of, b.cu_of])
    b.pr_pg, pr_cu = b.pg_of[pr_first], b.cu_of[pr_first]
    b.pr_cg, b.pr_u = b.cu_cg[pr_cu], b.cu_u[pr_cu]
    b.p2p_pr = b.per_cu["p2p"][pr_cu]
    key = (ctx.ids(ctx.pg_id, b.pg_keys)[b.pr_pg] << 42) | (ctx.ids(ctx.cg_id, b.cg_keys)[b.pr_cg] << 21) | b.pr_u
    b.pipe_pr = np.full(len(pr_first), np.nan)
    miss = np.ones(len(pr_first), dtype=bool)
    if len(ctx.pipe_keys):
        at = np.minimum(np.searchsorted(ctx.pipe_keys, key), len(ctx.pipe_keys) - 1)
        hit = ctx.pipe_keys[at] == key
        b.pipe_pr[hit] = ctx.pipe_vals[at[hit]]
        miss = ~hit
    if not miss.any():
        return
    _time_problems(b, miss)
    if len(ctx.pipe_keys) + int(miss.sum()) > PIPE_MEMO_MAX:
        ctx.pipe_keys, ctx.pipe_vals = ctx.pipe_keys[:0], ctx.pipe_vals[:0]
    keys = np.concatenate([ctx.pipe_keys, key[miss]])
    order = np.argsort(keys, kind="stable")
    ctx.pipe_keys, ctx.pipe_vals = keys[order], np.concatenate([ctx.pipe_vals, b.pipe_pr[miss]])[order]


def _time_problems(b: _Batch, todo: np.ndarray) -> None:
    """Makespans of the problems marked in `todo`, one pipeline group's DAG at a time (batch_dag.makespans)."""
    pr_ranges = group_ranges(b.pr_pg, len(b.pg_keys))
    for gk, (sch, pp, vpp, mm, nc) in enumerate(b.pg_keys.tolist()):
        lo, hi = pr_ranges[gk]
        rows = lo + np.flatnonzero(todo[lo:hi])
        if not len(rows):
            continue
        schedule = SCHEDULES[sch]
        spec = get_schedule(schedule)
        durations = _op_durations(b, rows, pp * vpp, spec.splits_backward)
        if spec.steady_state:  # no flush: its closed form, as pipeline.simulate_times (schedules/base.py)
            fb = durations[:, :pp] + durations[:, pp:2 * pp]
            b.pipe_pr[rows] = spec.steady_step_s(fb, b.p2p_pr[rows], mm)
            continue
        b.pipe_pr[rows] = makespans(dag_of(schedule, pp, vpp, mm, nc), durations, b.p2p_pr[rows])


def _op_durations(b: _Batch, rows: np.ndarray, n_chunks: int, splits_backward: bool) -> np.ndarray:
    """Per problem in `rows`, the duration row batch_dag.makespans reads: [F per chunk, B per chunk, W per
    chunk]; a schedule that splits the backward gives half of it to W (pipeline.simulate: w = bwd / 2,
    B op = bwd - w), the others have no W."""
    durations = np.zeros((len(rows), 3 * n_chunks))
    cgs, us = b.pr_cg[rows], b.pr_u[rows]
    for gi in np.unique(cgs).tolist():
        sel = cgs == gi
        fwd = b.groups[gi]["Fc"][:, us[sel]].T
        bwd = b.groups[gi]["Bc"][:, us[sel]].T
        durations[sel, :n_chunks] = fwd
        if splits_backward:
            w = bwd / 2
            durations[sel, n_chunks:2 * n_chunks] = bwd - w
            durations[sel, 2 * n_chunks:] = w
        else:
            durations[sel, n_chunks:2 * n_chunks] = bwd
    return durations


def _step(b: _Batch) -> dict:
    """Step: the data-parallel sync and its exposed part, the optimizer step and the step time per plan
    (planner/cost/step_terms.py, as estimate._data_parallel_sync and estimate._optimizer_s call it)."""
    pa, dev, items, per_cu, cu_of = b.pa, b.device, b.items, b.per_cu, b.cu_of
    replicas = pa.dp * pa.cp
    pipe_s = b.pipe_pr[b.pr_of]
    # columns whose worst stage syncs over no rank carry 0 seconds of traffic (batch_context._dp_collective_sums)
    sync_s = zero_sync_s(per_cu["ar"][cu_of], per_cu["rs"][cu_of], per_cu["ag"][cu_of], pa.zero, items, dev)
    params_dev = per_cu["params_dev"][cu_of]
    stage_busy = np.where(pa.pp > 1, items * per_cu["busy_worst"][cu_of], pipe_s)
    sync_s = sync_s * pa.grad_compression  # DiLoCo / SparseLoCo, as estimate._data_parallel_sync
    dp_exposed = exposed_sync_s(sync_s, pa.zero, pa.overlap_grad_reduce, stage_busy, per_cu["last_bwd"][cu_of], dev,
                                params_dev=params_dev, weight_bytes=b.weight_bytes, grad_bytes=b.grad_bytes,
                                items=items, replicas=replicas)
    dp_exposed = low_bandwidth_exposed_s(sync_s, dp_exposed, pa.local_steps, pa.grad_compression, params_dev, dev)
    shards = state_shards(pa.zero, replicas)
    opt_s = optimizer_step_s(params_dev, shards, pa.offload_optimizer, dev)
    offload_s = offload_exposed_s(pa.offload_optimizer, params_dev / shards, b.weight_bytes, b.grad_bytes, stage_busy,
                                  b.host_bytes_per_s)
    return {"pipeline_s": pipe_s, "dp_comm_exposed_s": dp_exposed, "optimizer_s": opt_s, "offload_s": offload_s,
            "step_time_s": step_time_s(pipe_s, dp_exposed, opt_s, offload_s)}


def _outputs(b: _Batch, workload: Workload, step: dict, peak_mem: np.ndarray, n_dev: int) -> dict:
    """Outputs per plan: throughput, MFU / HFU, the fit and pp_comm_s beside the step terms of _step."""
    pa, dev, items = b.pa, b.device, b.items
    step_s = step["step_time_s"]
    mfu, hfu = utilisation(b.per_cu["fm"][b.cu_of], b.per_cu["fh"][b.cu_of], items, pa.tp, pa.cp, pa.dp, step_s,
                           dev.peak_flops(workload.dtype) * n_dev)
    return {**step, "tokens_per_s": tokens_per_s(workload.global_batch, workload.seq_len, step_s), "mfu": mfu,
            "hfu": hfu, "peak_memory_bytes": peak_mem, "fits": peak_mem <= dev.memory_bytes,
            "pp_comm_s": pp_comm_s(pa.pp, pa.vpp, items, b.p2p_pr[b.pr_of])}


def _peak_memory(pa: PlanArrays, workload: Workload, ctx, cg: list, pg_keys, pr_of, pr_pg, pr_cg, pr_u, etp,
                 e_w: int, g_bytes: int) -> np.ndarray:
    """Peak bytes per plan (its worst stage): the memory phase (memory_phase.stage_memory) over the distinct
    (pipeline problem, ZeRO stage, offload fractions) of the batch, in blocks of one (pp, ZeRO stage)."""
    G = len(ctx.tuples)
    NPG = len(pg_keys)
    oa_first, oa_of = row_ids([float_ids(pa.offload_activations), float_ids(pa.offload_optimizer)])
    me_first, me_of = row_ids([pr_of, pa.zero, oa_of])
    me_pr = pr_of[me_first]
    me_zero = pa.zero[me_first]
    me_dp = (pa.dp * pa.cp)[me_first]  # ZeRO shards over dp x cp
    me_edp = memory_phase.expert_data_parallel(pa.dp, pa.cp, pa.tp, pa.ep, etp)[me_first]
    me_oact = pa.offload_activations[me_first]
    me_oopt = pa.offload_optimizer[me_first]
    me_pg = pr_pg[me_pr]
    par_t, froz_t, act_t, parx_t, work_t, logit_t, kvf_t, kva_t, ring_t = ctx.stage_tables()
    me_nc = pa.seq_chunks[me_first]
    me_row = np.array([x["row"] for x in cg], dtype=np.int64)[pr_cg[me_pr]]
    me_u = pr_u[me_pr]
    me_pp = pg_keys[me_pg, 1]
    max_pp = int(pg_keys[:, 1].max())
    infl_t = np.zeros((NPG, max_pp))  # the pipeline's in-flight work items per stage, per chunk
    for gk, (sch, pp, vpp, mm, nc) in enumerate(pg_keys.tolist()):
        infl_t[gk, :pp] = inflight_items(SCHEDULES[sch], pp, vpp, mm, nc)
    infl_t = infl_t.ravel()
    order = np.lexsort((me_zero, me_pp))
    o_pp, o_zero = me_pp[order], me_zero[order]
    cut = np.flatnonzero((o_pp[1:] != o_pp[:-1]) | (o_zero[1:] != o_zero[:-1])) + 1
    mem_me = np.empty(len(me_first))
    no_kv = np.zeros((1, 1))  # sequence-chunk K/V are read only where some row runs chunks
    for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(order)]):
        idx = order[a:b]
        pp, zz = int(o_pp[a]), int(o_zero[a])
        st = np.arange(pp)
        at = (me_row[idx][:, None] + st) * G + me_u[idx][:, None]  # (plans, stages) in the stacked tables
        nc = me_nc[idx][:, None]
        chunked = bool((nc > 1).any())
        kv_full = kvf_t.take(at) if chunked else no_kv
        inputs = memory_phase.StageInputs(
            params_count=par_t.take(at), expert_params_count=parx_t.take(at), frozen_bytes=froz_t.take(at),
            activation_bytes=act_t.take(at), inflight_items=infl_t.take(me_pg[idx][:, None] * max_pp + st),
            working_bytes=work_t.take(at), logits_bytes=logit_t.take(at), ring_bytes=ring_t.take(at),
            kv_full_bytes=kv_full, kv_rest_bytes=kva_t.take(at) - kv_full if chunked else no_kv,
            dp_cp=me_dp[idx][:, None], edp=me_edp[idx][:, None], seq_chunks=nc,
            offload_activations=me_oact[idx][:, None], offload_optimizer=me_oopt[idx][:, None],
            weight_versions=WEIGHT_VERSIONS[pg_keys[me_pg[idx], 0]][:, None])
        mem_me[idx] = memory_phase.stage_memory(inputs, zz, e_w, g_bytes, workload.optimizer).peak_bytes()
    return mem_me[me_of]
