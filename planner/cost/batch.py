"""estimate_batch: the formulas of estimate() evaluated for many plans at once, with numpy arrays over plans.

docs/ARCHITECTURE.md#data-flow "A vectorized form of the same formulas may evaluate many plans at once, but a test holds it equal
to the scalar form" (tests/test_batch.py holds every output equal to `estimate` within rel 1e-9, `fits`
exactly). Nothing here re-derives a cost formula: per-layer costs call compute.py / comm.py / memory.py with
arrays, and the logic that estimate.py (and estimate_layer.py, estimate_memory.py) writes inline is mirrored
line by line, each block citing the function it mirrors. When they change, the equality test fails until these
files (batch*.py) follow.

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
  4. Per plan: DP exposure, optimizer step and the outputs, vectorized over plans. Memory per distinct
     (problem, ZeRO stage, offload fractions), in one block per (pp, ZeRO stage): (rows x stages) arrays
     gathered from the count groups' per-stage tables stacked together, one model_state_parts call each.
  5. Between calls (_Ctx, per model, cluster, seq_len, dtype, grad_dtype): layer values per layer tuple,
     count group sums over every tuple seen, makespans per pipeline problem (packed int64 keys, sorted). A
     later call evaluates only what is new to it (a search calls estimate_batch again and again).

Falls back to calling the scalar `estimate` (one call per plan) for plans with an explicit
`plan.partition` or with optimizer offload (`plan.offload.optimizer > 0`), and for every plan on a cluster of
several device types (each stage timed on its own devices), for activation offload (its per-layer
host-transfer time is modelled in estimate._layer_step only), and for workloads with documents of varying
length and plans with the DistCA attention pool (estimate._attention_factors and the pool's all-to-all).

Where the pieces live: the plan columns in batch_plans.py, the per-layer values and link caches in
batch_layers.py, what is kept between calls and the count-group sums in batch_context.py, the pipeline DAG in
batch_dag.py, the row-id helpers in batch_ids.py; this module checks the plans and assembles the outputs.
"""
from __future__ import annotations

import time

import numpy as np

from planner.cost import memory
from planner.cost.batch_context import _PER_COLUMN, _PIPE_MEMO_MAX, _ctx, _group_entry
from planner.cost.batch_dag import _dag, _inflight, _makespan
from planner.cost.batch_ids import _float_ids, _ranges, _row_ids
from planner.cost.batch_plans import SCHEDULES, PlanArrays
from planner.cost.schedules import get_schedule
from planner.core import dtypes
from planner.cost.estimate import (
    EXPOSED_TAIL_FRACTION, _check_deepep, _check_expert_parallel, _check_seq_chunks, estimate, shard_copy_s,
)
from planner.core.dims import microbatches_fit_schedule, quoted_names, seq_chunks_fit_schedule, vpp_fits_schedule
from planner.core.errors import BadInput
from planner.core.hardware import Cluster
from planner.cost.stages import _homogeneous
from planner.core.model import ModelGraph
from planner.core.plan import ParallelPlan, Workload

# Re-exported, each the same object as in its module: the search, tests and benchmarks import POLICIES from
# here, and benchmarks/bench_batch.py clears the caches (_LINKS, _CHUNKS, _COUNTS, _LEVELS, _CTX, _INFL, _dag)
# through this module.
from planner.cost.batch_context import _CHUNKS, _COUNTS, _CTX, _IDS_MAX, _Ctx, _counts, _split  # noqa: F401
from planner.cost.batch_dag import _INFL, _LEVELS, _Dag, _levels  # noqa: F401
from planner.cost.batch_layers import _LINKS, _collective, _layer_values, _links, _p2p  # noqa: F401
from planner.cost.batch_plans import POLICIES  # noqa: F401

OUTPUTS = ("step_time_s", "tokens_per_s", "mfu", "hfu", "peak_memory_bytes", "fits", "pipeline_s",
           "pp_comm_s", "dp_comm_exposed_s", "optimizer_s", "offload_s")


# ----------------------------------------------------------------------------------------------------------
# the batch estimate


def estimate_batch(model: ModelGraph, cluster: Cluster, workload: Workload,
                   plans: list[ParallelPlan] | PlanArrays, timings: dict | None = None) -> dict[str, np.ndarray]:
    """estimate() for every plan, as arrays in the order of `plans`.

    Returns {name: ndarray}: step_time_s, tokens_per_s, mfu, hfu, peak_memory_bytes, fits (bool), and from the
    breakdown pipeline_s (the pipeline's makespan), pp_comm_s, dp_comm_exposed_s, optimizer_s, offload_s.
    Equal to estimate() within floating-point rounding (tests/test_batch.py: rel 1e-9, fits exactly).

    Plans with an explicit partition or optimizer offload are handed to the scalar estimate, one call each.
    Raises BadInput, as estimate() would, for the first plan whose degrees do not match the cluster or the
    batch. `timings`, when given, receives seconds per phase.
    """
    t_start = time.perf_counter()
    tm = timings if timings is not None else {}
    for k in ("prepare", "layers", "chunks", "pipeline", "step+memory", "fallback"):
        tm.setdefault(k, 0.0)
    n_all = len(plans)
    # Several device types: every stage is timed on its own devices (planner/cost/stages.py), which only
    # the scalar estimate does; every plan takes the scalar path there.
    mixed = not _homogeneous(cluster)
    # Documents of varying length (Workload.documents) and the DistCA attention pool (plan.attention_pool) are
    # modelled in estimate() only (attention_balance's per-replica work and the pool's all-to-all): every such
    # plan takes the scalar path, one estimate() call each, which the search then pays for these workloads.
    mixed = mixed or workload.documents is not None
    if isinstance(plans, PlanArrays):
        # activation offload adds per-layer transfer time only estimate._layer_step models: scalar path
        slow = np.flatnonzero((plans.offload_optimizer > 0) | (plans.offload_activations > 0) | plans.attention_pool
                              | mixed)
        slow_plans = [plans.plan(int(i)) for i in slow]
        fast_rows = np.flatnonzero((plans.offload_optimizer <= 0) & (plans.offload_activations <= 0)
                                   & ~plans.attention_pool & (not mixed))
        pa = plans.take(fast_rows) if len(slow) else plans
    else:
        is_slow = [mixed or p.partition is not None or p.offload.optimizer > 0 or p.offload.activations > 0
                   or p.attention_pool for p in plans]
        slow = np.flatnonzero(np.array(is_slow, dtype=bool))
        slow_plans = [plans[int(i)] for i in slow]
        fast_rows = np.flatnonzero(~np.array(is_slow, dtype=bool))
        pa = PlanArrays.from_plans([plans[int(i)] for i in fast_rows])
    out = {k: np.zeros(n_all, dtype=bool if k == "fits" else float) for k in OUTPUTS}
    tm["prepare"] += time.perf_counter() - t_start

    t0 = time.perf_counter()
    for i, plan in zip(slow.tolist(), slow_plans):
        est = estimate(model, cluster, workload, plan)
        out["step_time_s"][i] = est.step_time_s
        out["tokens_per_s"][i] = est.tokens_per_s
        out["mfu"][i] = est.mfu
        out["hfu"][i] = est.hfu
        out["peak_memory_bytes"][i] = est.peak_memory_bytes
        out["fits"][i] = est.fits
        # not in Estimate: estimate() adds the exposed DP traffic, optimizer step and offload to the pipeline's
        # makespan; taken back off (to rounding), it stays usable for the search's step-time bound
        bd = est.breakdown
        out["pipeline_s"][i] = est.step_time_s - bd["dp_comm_exposed_s"] - bd["optimizer_s"] - bd["offload_s"]
        for k in ("pp_comm_s", "dp_comm_exposed_s", "optimizer_s", "offload_s"):
            out[k][i] = est.breakdown[k]
    tm["fallback"] += time.perf_counter() - t0
    if len(pa):
        res = _estimate_arrays(model, cluster, workload, pa, tm)
        for k in OUTPUTS:
            out[k][fast_rows] = res[k]
    return out


def _check(pa: PlanArrays, cluster: Cluster, workload: Workload, model: ModelGraph, m: np.ndarray) -> None:
    """The refusals of estimate.estimate, split_chunks, ParallelPlan and pipeline._check_args."""
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
    # ParallelPlan._check and estimate._check_seq_chunks: chunked sequences
    chunked = pa.seq_chunks > 1
    first(~seq_chunks_fit_schedule(pa.schedule, pa.seq_chunks) | (chunked & ~pa.flash_attention),
          lambda i: f"seq_chunks={pa.seq_chunks[i]} needs schedule {quoted_names('sequence_chunks')} and flash "
                    "attention")
    first(chunked & (workload.seq_len % (pa.seq_chunks * np.where(pa.cp > 1, 2 * pa.cp, 1)) != 0),
          lambda i: f"seq_chunks {pa.seq_chunks[i]}: sequence {workload.seq_len} must divide into {pa.seq_chunks[i]} "
                    f"chunks" + (f" of 2*cp = {2 * pa.cp[i]} parts" if pa.cp[i] > 1 else ""))
    if chunked.any():
        _check_seq_chunks(model, pa.plan(int(np.flatnonzero(chunked)[0])), workload.seq_len)
    # ParallelPlan._check: Pipeline MoE puts E/tp whole experts on each TP rank
    first(pa.moe_tp_slice & ((pa.tp == 1) | (pa.ep != pa.tp) | (pa.etp != 1)),
          lambda i: f"moe_dispatch 'tp_slice' needs tp > 1, ep = tp and etp = 1; got tp={pa.tp[i]}, ep={pa.ep[i]}, "
                    f"etp={pa.etp[i] or None}")
    first(pa.moe_deepep & (pa.ep == 1), lambda i: "moe_dispatch 'deepep' needs ep > 1")
    _check_deepep(pa.moe_deepep, workload)
    # estimate._check_expert_parallel, once per distinct (ep, etp, dp, cp, tp); it accepts ep = 1 without
    # looking further, so only plans with ep > 1 are checked. _row_ids lists the distinct rows in the
    # lexicographic order np.unique(axis=...) would, without its argsort of a structured view (which took
    # most of a hot 100k-plan call).
    moe_rows = np.flatnonzero(pa.ep != 1)
    firsts = _row_ids([pa.ep[moe_rows], pa.etp[moe_rows], pa.dp[moe_rows], pa.cp[moe_rows], pa.tp[moe_rows]])[0]
    for i in moe_rows[firsts]:
        try:
            _check_expert_parallel(model, pa.plan(int(i)))
        except BadInput as e:
            raise BadInput(f"plan {int(i)}: {e}") from None
    first(~microbatches_fit_schedule(pa.schedule, m, pa.pp),
          lambda i: f"{SCHEDULES[pa.schedule[i]]} needs the number of micro-batches ({m[i]}) to be a multiple of pp")
    blocks = model.num_blocks
    if blocks:
        first(pa.pp * pa.vpp > blocks,
              lambda i: f"pp*vpp = {pa.pp[i] * pa.vpp[i]} pipeline chunks but the model has only {blocks} blocks")
    for name in ("dp", "tp", "pp", "vpp", "cp", "ep", "mbs"):
        first(getattr(pa, name) < 1, lambda i, name=name: f"{name} must be >= 1")
    first((pa.zero < 0) | (pa.zero > 3), lambda i: "zero must be 0-3")


def _estimate_arrays(model, cluster, workload, pa: PlanArrays, tm: dict) -> dict:
    t0 = time.perf_counter()
    P = len(pa)
    n_dev = cluster.device_count
    dev = cluster.devices[0].device
    dtype = workload.dtype
    # estimate.estimate: e, b, s, m
    e = dtypes.activation_bytes(dtype)
    s = workload.seq_len
    m = np.where(pa.num_microbatches > 0, pa.num_microbatches,
                 np.maximum(1, workload.global_batch // (pa.mbs * pa.dp)))
    _check(pa, cluster, workload, model, m)
    items = m * pa.seq_chunks  # estimate.estimate: work items per step (ParallelPlan.seq_chunks)
    # estimate._memory: dtype sizes
    e_w = dtypes.weight_bytes(workload.dtype)
    e_act = dtypes.activation_bytes(workload.dtype)
    g_bytes = dtypes.gradient_bytes(workload.grad_dtype)
    ctx = _ctx(model, cluster, workload)

    # distinct layer tuples -> columns of ctx (u_of: every plan's column), count groups cg, pipeline groups pg
    etp = np.where(pa.etp > 0, pa.etp, pa.tp)
    lt_cols = [pa.mbs, pa.tp, pa.cp, pa.sp, pa.flash_attention, pa.ep, etp, pa.overlap_tp_comm, pa.cp_a2a,
               pa.moe_tp_slice, pa.seq_chunks, pa.moe_deepep]
    u_first, u_of = _row_ids(lt_cols)
    tuples_b = np.stack([np.asarray(c, dtype=np.int64)[u_first] for c in lt_cols], axis=1)
    cg_first, cg_of = _row_ids([pa.pp, pa.vpp, pa.recompute, pa.recompute_num_layers + 1])
    cg_keys = np.stack([pa.pp[cg_first], pa.vpp[cg_first], pa.recompute[cg_first],
                        pa.recompute_num_layers[cg_first]], axis=1)
    pg_first, pg_of = _row_ids([pa.schedule, pa.pp, pa.vpp, m, pa.seq_chunks])
    pg_keys = np.stack([pa.schedule[pg_first], pa.pp[pg_first], pa.vpp[pg_first], m[pg_first],
                        pa.seq_chunks[pg_first]], axis=1)
    NPG = len(pg_keys)
    tm["prepare"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    u_of = ctx.columns(tuples_b, (cluster, dev, dtype, e, e_act, e_w, s,
                                  (workload.moe_imbalance, workload.moe_capacity_factor)))[u_of]
    G = len(ctx.tuples)
    tm["layers"] += time.perf_counter() - t0

    # ---- per count group, for every column: chunk and stage sums, DP traffic, p2p ------------------------
    t0 = time.perf_counter()
    cg = [_group_entry(ctx, pp, vpp, rc, rnl, n_dev, e, g_bytes, s) for pp, vpp, rc, rnl in cg_keys.tolist()]
    # distinct (count group, column) pairs
    cu_first, cu_of = _row_ids([cg_of, u_of])
    cu_cg, cu_u = cg_of[cu_first], u_of[cu_first]
    flat = cu_cg * G + cu_u
    per_cu = {k: np.stack([x[k] for x in cg]).ravel()[flat] for k in _PER_COLUMN}
    tm["chunks"] += time.perf_counter() - t0

    # ---- pipeline: distinct problems (pipeline group, count group, column) --------------------------------
    t0 = time.perf_counter()
    pr_first, pr_of = _row_ids([pg_of, cu_of])
    pr_pg, pr_cu = pg_of[pr_first], cu_of[pr_first]
    pr_cg, pr_u = cu_cg[pr_cu], cu_u[pr_cu]
    NPR = len(pr_first)
    p2p_pr = per_cu["p2p"][pr_cu]
    # A problem's makespan is fixed by its (pipeline group, count group, column) once the model, the cluster,
    # seq_len and dtype are: reuse what an earlier call on them computed (a search calls estimate_batch again
    # and again on one cluster; most of its pipeline problems repeat). Keys: the three ids packed in an int64.
    key = (ctx.ids(ctx.pg_id, pg_keys)[pr_pg] << 42) | (ctx.ids(ctx.cg_id, cg_keys)[pr_cg] << 21) | pr_u
    pipe_pr = np.full(NPR, np.nan)
    miss = np.ones(NPR, dtype=bool)
    if len(ctx.pipe_keys):
        at = np.minimum(np.searchsorted(ctx.pipe_keys, key), len(ctx.pipe_keys) - 1)
        hit = ctx.pipe_keys[at] == key
        pipe_pr[hit] = ctx.pipe_vals[at[hit]]
        miss = ~hit
    if miss.any():
        pr_ranges = _ranges(pr_pg, NPG)
        for gk, (sch, pp, vpp, mm, nc) in enumerate(pg_keys.tolist()):
            a, b = pr_ranges[gk]
            rows = a + np.flatnonzero(miss[a:b])
            if not len(rows):
                continue
            schedule = SCHEDULES[sch]
            dag = _dag(schedule, pp, vpp, mm, nc)
            n_st = pp * vpp
            D = np.zeros((len(rows), 3 * n_st))
            cgs, us = pr_cg[rows], pr_u[rows]
            for gi in np.unique(cgs).tolist():
                sel = cgs == gi
                F = cg[gi]["Fc"][:, us[sel]].T
                B = cg[gi]["Bc"][:, us[sel]].T
                D[sel, :n_st] = F
                if get_schedule(schedule).splits_backward:
                    # pipeline.simulate: w = bwd / 2, B op = bwd - w, W op = w
                    w = B / 2
                    D[sel, n_st:2 * n_st] = B - w
                    D[sel, 2 * n_st:] = w
                else:
                    D[sel, n_st:2 * n_st] = B
            pipe_pr[rows] = _makespan(dag, D, p2p_pr[rows])
        if len(ctx.pipe_keys) + int(miss.sum()) > _PIPE_MEMO_MAX:
            ctx.pipe_keys, ctx.pipe_vals = ctx.pipe_keys[:0], ctx.pipe_vals[:0]
        keys = np.concatenate([ctx.pipe_keys, key[miss]])
        order = np.argsort(keys, kind="stable")
        ctx.pipe_keys, ctx.pipe_vals = keys[order], np.concatenate([ctx.pipe_vals, pipe_pr[miss]])[order]
    tm["pipeline"] += time.perf_counter() - t0

    # ---- step time, per plan --------------------------------------------------------------------------
    t0 = time.perf_counter()
    dp = pa.dp
    pipe_s = pipe_pr[pr_of]
    p2p_s = p2p_pr[pr_of]
    ar, rs, ag = per_cu["ar"][cu_of], per_cu["rs"][cu_of], per_cu["ag"][cu_of]
    dp_s = np.where(pa.zero == 0, ar, rs + np.where(pa.zero < 3, ag, 2 * items * ag))
    # estimate: grad_ranks > 1, or routed experts syncing over their own EDP group
    dp_s = np.where((dp * pa.cp > 1) | (pa.ep * etp != pa.tp), dp_s, 0.0) / dev.efficiency.dp_collective
    busy = per_cu["busy_worst"][cu_of]
    last_bwd = per_cu["last_bwd"][cu_of]
    params_dev = per_cu["params_dev"][cu_of]
    stage_busy = np.where(pa.pp > 1, items * busy, pipe_s)
    hide = dev.efficiency.comm_overlap
    dp_exposed = np.where(
        pa.zero == 3, np.maximum(dp_s - hide * stage_busy, EXPOSED_TAIL_FRACTION * dp_s),
        np.where(pa.overlap_grad_reduce, np.maximum(dp_s - hide * last_bwd, EXPOSED_TAIL_FRACTION * dp_s), dp_s))
    if dev.efficiency.shard_copy_ns_per_byte:
        dp_exposed = dp_exposed + np.where(dp * pa.cp > 1, shard_copy_s(params_dev, e, g_bytes, pa.zero, items, dev),
                                           0.0)
    # optimizer step (offload_s is 0: plans with optimizer offload went to the scalar estimate)
    owned = params_dev / np.where(pa.zero >= 1, dp * pa.cp, 1)
    on_device = owned * (1 - pa.offload_optimizer)
    opt_s = on_device * 32 / (dev.memory_bandwidth_bytes_per_s * dev.efficiency.memory)
    offload_s = np.zeros(P)
    step = pipe_s + dp_exposed + opt_s + offload_s
    tokens = workload.global_batch * workload.seq_len
    scale = items * pa.tp * pa.cp * dp
    fm = per_cu["fm"][cu_of] * scale
    fh = per_cu["fh"][cu_of] * scale
    peak = dev.peak_flops(dtype) * n_dev

    peak_mem = _peak_memory(pa, workload, ctx, cg, pg_keys, pr_of, pr_pg, pr_cg, pr_u, etp, e_w, g_bytes)
    out = {
        "step_time_s": step, "tokens_per_s": tokens / step, "mfu": fm / (step * peak), "hfu": fh / (step * peak),
        "peak_memory_bytes": peak_mem, "fits": peak_mem <= dev.memory_bytes, "pipeline_s": pipe_s,
        "pp_comm_s": np.where(pa.pp > 1, 2 * items * pa.vpp * p2p_s, 0.0), "dp_comm_exposed_s": dp_exposed,
        "optimizer_s": opt_s, "offload_s": offload_s,
    }
    tm["step+memory"] += time.perf_counter() - t0
    return out


def _peak_memory(pa: PlanArrays, workload: Workload, ctx, cg: list, pg_keys, pr_of, pr_pg, pr_cg, pr_u, etp,
                 e_w: int, g_bytes: int) -> np.ndarray:
    """Peak bytes per plan (its worst stage), over the distinct (pipeline problem, ZeRO stage, offload
    fractions) of the batch, evaluated in blocks of one (pp, ZeRO stage)."""
    dp = pa.dp
    G = len(ctx.tuples)
    NPG = len(pg_keys)
    oa_first, oa_of = _row_ids([_float_ids(pa.offload_activations), _float_ids(pa.offload_optimizer)])
    me_first, me_of = _row_ids([pr_of, pa.zero, oa_of])
    me_pr = pr_of[me_first]
    me_zero = pa.zero[me_first]
    me_dp = (dp * pa.cp)[me_first]  # ZeRO shards over dp x cp (estimate._memory)
    me_oact = pa.offload_activations[me_first]
    me_oopt = pa.offload_optimizer[me_first]
    oact_any, oopt_any = bool(me_oact.any()), bool(me_oopt.any())  # x * (1 - 0) is x: skipped when all 0
    me_pg = pr_pg[me_pr]
    par_t, froz_t, act_t, parx_t, work_t, logit_t, kvf_t, kva_t, ring_t = ctx.stage_tables()
    me_nc = pa.seq_chunks[me_first]
    # estimate.expert_data_parallel: the ranks sharing the same experts
    me_edp = (dp * pa.cp * pa.tp // (pa.ep * etp))[me_first]
    me_row = np.array([x["row"] for x in cg], dtype=np.int64)[pr_cg[me_pr]]
    me_u = pr_u[me_pr]
    me_pp = pg_keys[me_pg, 1]
    max_pp = int(pg_keys[:, 1].max())
    infl_t = np.zeros((NPG, max_pp))
    for gk, (sch, pp, vpp, mm, nc) in enumerate(pg_keys.tolist()):
        infl_t[gk, :pp] = _inflight(SCHEDULES[sch], pp, vpp, mm, nc)  # mirrors estimate._memory
    infl_t = infl_t.ravel()
    order = np.lexsort((me_zero, me_pp))
    o_pp, o_zero = me_pp[order], me_zero[order]
    cut = np.flatnonzero((o_pp[1:] != o_pp[:-1]) | (o_zero[1:] != o_zero[:-1])) + 1
    mem_me = np.empty(len(me_first))
    for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(order)]):
        idx = order[a:b]
        pp, zz = int(o_pp[a]), int(o_zero[a])
        st = np.arange(pp)
        at = (me_row[idx][:, None] + st) * G + me_u[idx][:, None]  # (plans, stages) in the stacked tables
        # --- mirrors estimate._memory ---
        weights, grads, optim = memory.model_state_parts(par_t.take(at), me_dp[idx][:, None], zz,
                                                         weight_dtype_bytes=e_w, grad_dtype_bytes=g_bytes,
                                                         optimizer=workload.optimizer)
        parx = parx_t.take(at)
        split = (parx > 0) & (me_edp[idx] != me_dp[idx])[:, None]
        if split.any():  # estimate._memory: dense states over dp x cp, routed experts over EDP
            dense = memory.model_state_parts(par_t.take(at) - parx, me_dp[idx][:, None], zz, weight_dtype_bytes=e_w,
                                             grad_dtype_bytes=g_bytes, optimizer=workload.optimizer)
            routed = memory.model_state_parts(parx, me_edp[idx][:, None], zz, weight_dtype_bytes=e_w,
                                              grad_dtype_bytes=g_bytes, optimizer=workload.optimizer)
            weights, grads, optim = (np.where(split, d + r, x) for d, r, x in
                                     zip(dense, routed, (weights, grads, optim)))
        infl = infl_t.take(me_pg[idx][:, None] * max_pp + st)
        acts = act_t.take(at) * infl
        if oact_any:
            acts = acts * (1 - me_oact[idx])[:, None]
        if oopt_any:
            optim = optim * (1 - me_oopt[idx])[:, None]
        work = work_t.take(at)
        subtotal = weights + grads + optim + froz_t.take(at) + acts + work + logit_t.take(at)
        ring = ring_t.take(at)
        if (ring > 0).any():  # estimate._memory: ring buffers beyond the backward working set
            subtotal = subtotal + np.maximum(0.0, ring - work)
        nc = me_nc[idx][:, None]
        if (nc > 1).any():  # estimate._memory: chunked sequences' K/V (longctx.seq_chunk_kv_bytes)
            subtotal = subtotal + np.where(nc > 1, kvf_t.take(at) * infl + kva_t.take(at) * (nc - 1), 0.0)
        # the worst stage's total: allocator_overhead_bytes (x + (0.07 x + c)) is nondecreasing in x, also
        # in floating point, so it is applied to the largest subtotal only
        top = subtotal.max(axis=1)
        mem_me[idx] = top + memory.allocator_overhead_bytes(top)
    return mem_me[me_of]
