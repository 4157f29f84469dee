"""Planning on a cluster of several device types (A100 nodes beside H100 nodes).

Two ways to use every device, both costed by the cost model (estimate(), which times each stage on its own
devices, planner/cost/stages.py):

  pipeline   each pipeline stage runs on whole nodes of one device type; the blocks are split unevenly
             in proportion to each stage's speed, subject to each stage's memory, by an exact dynamic
             program over (blocks x stages) whose per-stage costs come from that stage's device
             (`hetero_partition`; the bottleneck-partition recurrence of planner/search/partition.py with
             one cost table per stage). The idea of per-device-type stages with uneven layers is Metis's
             (Um et al., USENIX ATC'24, section 4); the code is ours.
  shares     every device type runs whole replicas of the same (tp, pp) structure; replicas of unequal
             speed get unequal shares of the global batch, so all finish their micro-batches at about the
             same time, and the gradients are all-reduced over every replica (HetPipe, Park et al., USENIX
             ATC'20; Whale, Jia et al., USENIX ATC'22, section 3.3, balance the batch by device speed). The
             step is the slowest group's pipeline plus the all-reduce over all replicas and the optimizer.

and two baselines the result is compared with: the best plan on the fastest device group alone (the other
devices idle), and the naive even split (the ordinary search over all devices: equal layers and equal batch
per device, so the slowest device paces every step).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from planner.core.errors import BadInput, Infeasible
from planner.core.hardware import Cluster
from planner.core.model import ModelGraph
from planner.core.plan import Estimate, ParallelPlan, StageAssignment, Workload
from planner.cost.estimate import estimate
from planner.cost.memory import allocator_overhead_bytes
from planner.cost.pipeline import inflight_microbatches
from planner.cost.stages import device_speed_key
from planner.search.partition import band, block_costs, extra_bytes, minimax, segments

_RTOL = 1e-9


# ---------------------------------------------------------------------------------------------------------
# device groups and sub-clusters


@dataclass(frozen=True)
class DeviceGroup:
    """All devices of one type (whole nodes), in index order."""

    device_type: str
    devices: tuple[int, ...]
    devices_per_node: int

    @property
    def size(self) -> int:
        return len(self.devices)


def device_groups(cluster: Cluster, dtype: str = "bf16") -> list[DeviceGroup]:
    """The cluster's device types, fastest first (achievable matmul FLOP/s)."""
    by_type: dict[str, list[int]] = {}
    for d in cluster.devices:
        by_type.setdefault(d.device.name, []).append(d.index)
    out = []
    for name, ids in by_type.items():
        per_node = min(len(cluster.nodes[n].devices) for n in {cluster.devices[i].node for i in ids})
        out.append(DeviceGroup(name, tuple(ids), per_node))
    prof = {d.device.name: d.device for d in cluster.devices}
    return sorted(out, key=lambda g: device_speed_key(prof[g.device_type], dtype), reverse=True)


def subcluster(cluster: Cluster, device_ids) -> Cluster:
    """The cluster restricted to these devices (with the nodes they sit on, renumbered from 0; the same
    links, fabric and islands)."""
    ids = sorted(int(i) for i in device_ids)
    keep = set(ids)
    node_ids = sorted({cluster.devices[i].node for i in ids})
    node_map = {n: k for k, n in enumerate(node_ids)}
    dev_map = {i: k for k, i in enumerate(ids)}
    devices = [cluster.devices[i].model_copy(update={"index": dev_map[i], "node": node_map[cluster.devices[i].node]})
               for i in ids]
    nodes = []
    for n in node_ids:
        node = cluster.nodes[n]
        nodes.append(node.model_copy(update={"index": node_map[n],
                                             "devices": [dev_map[i] for i in node.devices if i in keep]}))
    return Cluster(name=f"{cluster.name}[{len(ids)}]", spec=cluster.spec, nodes=nodes, devices=devices,
                   fabric=cluster.fabric, island_link=cluster.island_link,
                   island_ports_per_node=cluster.island_ports_per_node)


# ---------------------------------------------------------------------------------------------------------
# the DP over blocks and heterogeneous stages


@dataclass(frozen=True)
class HeteroPartition:
    ranges: tuple[tuple[int, int], ...]
    stage_time_s: tuple[float, ...]
    stage_memory_bytes: tuple[float, ...]


def hetero_partition(costs: list, capacity_bytes: list[float], inflight) -> HeteroPartition:
    """Split n blocks into k = len(costs) contiguous non-empty stages, stage c costed by costs[c] (a
    partition.BlockCosts computed on stage c's device), minimising the slowest stage's time per micro-batch
    and then its memory, subject to every stage fitting capacity_bytes[c]. Exact: the bottleneck
    partition recurrence (Skiena, The Algorithm Design Manual, section 8.5) over per-stage tables,
    O(k n^2). Raises Infeasible when no split fits."""
    k = len(costs)
    n = costs[0].n
    if k < 1 or k > n:
        raise BadInput(f"cannot split {n} blocks into {k} non-empty pipeline stages")
    infl = np.asarray(inflight, dtype=float)
    w = n - k + 1
    valid = np.broadcast_to(np.arange(w)[:, None] <= np.arange(w)[None, :], (k, w, w))

    def banded(fn):
        # stage c's table in band coordinates, from its own costs (partition.band of each, row c)
        return np.stack([band(fn(cs), k)[c] for c, cs in enumerate(costs)])

    time_ = banded(lambda cs: segments(cs.time_s, cs.early_time_s, cs.recompute_cut, cs.head_time_s,
                                        cs.tail_time_s))
    state = banded(lambda cs: segments(cs.state_bytes, cs.state_bytes, 0, cs.head_state_bytes,
                                        cs.tail_state_bytes))
    act = banded(lambda cs: segments(cs.act_bytes, cs.early_act_bytes, cs.recompute_cut, cs.head_act_bytes,
                                      cs.tail_act_bytes))
    extra = banded(extra_bytes)  # backward working set and loss logits copy (partition_dp)
    held = state + act * infl[:, None, None] + extra
    mem = held + allocator_overhead_bytes(held)  # as estimate._stage_memory
    cap = np.asarray(capacity_bytes, dtype=float)[:, None, None]
    allowed = valid & (mem <= cap)
    best, edges = minimax(time_, allowed)
    if not math.isfinite(best):
        raise Infeasible(f"no split of {n} blocks over {k} heterogeneous stages fits their memory")
    allowed = allowed & (time_ <= best + _RTOL * abs(best))
    _, edges = minimax(mem / cap, allowed)  # tie-break: the most headroom relative to each device
    ranges = tuple((int(edges[c]), int(edges[c + 1])) for c in range(k))
    at = [(c, lo - c, hi - c - 1) for c, (lo, hi) in enumerate(ranges)]
    return HeteroPartition(ranges, tuple(float(time_[x]) for x in at), tuple(float(mem[x]) for x in at))


# ---------------------------------------------------------------------------------------------------------
# candidates


@dataclass
class HeteroCandidate:
    """One way to run the workload: a plan (kind 'pipeline', 'even' or 'group') or per-group plans with
    batch shares (kind 'shares')."""

    kind: str
    label: str
    step_time_s: float
    tokens_per_s: float
    fits: bool
    plan: ParallelPlan | None = None
    estimate: Estimate | None = None
    groups: list[dict] = field(default_factory=list)  # kind 'shares': device_type, devices, dp, batch, plan
    breakdown: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {"kind": self.kind, "label": self.label, "step_time_s": self.step_time_s,
               "tokens_per_s": self.tokens_per_s, "fits": self.fits, "breakdown": self.breakdown}
        if self.plan is not None:
            out["plan"] = self.plan.model_dump()
        if self.estimate is not None:
            out["estimate"] = self.estimate.model_dump()
        if self.groups:
            out["groups"] = [{k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in g.items()}
                             for g in self.groups]
        return out


@dataclass
class HeteroResult:
    best: HeteroCandidate
    candidates: list[HeteroCandidate]  # every fitting candidate costed, best first
    best_pipeline: HeteroCandidate | None
    best_shares: HeteroCandidate | None
    even: HeteroCandidate | None  # the naive even split over every device
    alone: dict  # device type -> its best plan on that group alone
    evaluated: int
    wall_s: float


def _label(plan: ParallelPlan) -> str:
    parts = [f"tp{plan.tp}", f"pp{plan.pp}", f"dp{plan.dp}", f"zero{plan.zero}", f"mbs{plan.mbs}"]
    if plan.recompute != "none":
        parts.append(plan.recompute)
    if plan.sp:
        parts.append("sp")
    return " ".join(parts)


def _heads_ok(model: ModelGraph, tp: int) -> bool:
    return all((layer.heads % tp == 0 and (layer.kv_heads or layer.heads) % tp == 0)
               for layer in model.layers if layer.kind == "attention")


def _block_count(model: ModelGraph) -> int:
    return len({layer.block for layer in model.layers if layer.block is not None})


_RECOMPUTE = ("none", "selective", "full")


def _configs(model: ModelGraph, stage_size: int, per_node: int, gbs: int, mbs_options):
    """(tp, dp, mbs) of a stage of `stage_size` devices: tp inside a node and dividing the heads."""
    for tp in (1, 2, 4, 8, 16):
        if tp > per_node or stage_size % tp or not _heads_ok(model, tp):
            continue
        dp = stage_size // tp
        for mbs in mbs_options:
            if gbs % (mbs * dp) == 0:
                yield tp, dp, mbs


def pipeline_candidates(model: ModelGraph, cluster: Cluster, workload: Workload, groups: list[DeviceGroup],
                        mbs_options=(1, 2, 4), max_pp: int = 32) -> list[HeteroCandidate]:
    """Per stage size S dividing every group: each group gives size/S stages of its type, in one of the
    group orders; per (tp, dp, mbs, recompute) the heterogeneous DP partition and estimate(). Recompute is
    tried in the order none, selective, full and stops at the first that fits (it only adds time)."""
    out: list[HeteroCandidate] = []
    n_blocks = _block_count(model)
    per_node = min(g.devices_per_node for g in groups)
    sizes = [s for s in range(1, min(g.size for g in groups) + 1) if all(g.size % s == 0 for g in groups)]
    costs_memo: dict = {}
    sub_memo: dict = {}
    for S in sizes:
        pp = sum(g.size // S for g in groups)
        if pp < 2 or pp > min(max_pp, n_blocks):
            continue
        for tp, dp, mbs in _configs(model, S, per_node, workload.global_batch, mbs_options):
            m = workload.global_batch // (mbs * dp)
            if m < pp:  # 1F1B needs at least pp micro-batches to fill the pipeline
                continue
            for order in itertools.permutations(range(len(groups))):
                stage_groups = []
                for gi in order:
                    g = groups[gi]
                    for j in range(g.size // S):
                        stage_groups.append((g.device_type, tuple(g.devices[j * S:(j + 1) * S])))
                for rec in _RECOMPUTE:
                    plan = ParallelPlan(dp=dp, tp=tp, pp=pp, zero=1, mbs=mbs, recompute=rec, sp=tp > 1,
                                        schedule="1f1b")
                    cand = _costed_pipeline(model, cluster, workload, plan, stage_groups, costs_memo, sub_memo)
                    if cand == "pruned":  # more recompute is only slower
                        break
                    if cand is not None:
                        out.append(cand)
                        if cand.fits:
                            break
    return out


def _costed_pipeline(model, cluster, workload, plan, stage_groups, costs_memo, sub_memo):
    per_stage_costs, caps = [], []
    for dtype_name, devs in stage_groups:
        key = (dtype_name, plan.tp, plan.dp, plan.mbs, plan.recompute)
        if key not in costs_memo:
            if (dtype_name, len(devs)) not in sub_memo:
                sub_memo[(dtype_name, len(devs))] = subcluster(cluster, devs)
            sub = sub_memo[(dtype_name, len(devs))]
            # per-block costs on this device type (the stage's own tp / dp groups and links); pp = 2 so
            # that block_costs puts the embedding in the head and the final norm and LM head in the tail
            one = plan.model_copy(update={"pp": 2, "partition": None})
            costs_memo[key] = (block_costs(model, sub, workload, one), sub.devices[0].device.memory_bytes)
        c, cap = costs_memo[key]
        per_stage_costs.append(c)
        caps.append(cap)
    # the head extra belongs to the first stage only, the tail extra to the last only
    fixed = []
    for i, c in enumerate(per_stage_costs):
        upd = {}
        if i != 0:
            upd.update(head_time_s=0.0, head_act_bytes=0.0, head_params=0.0, head_state_bytes=0.0)
        if i != len(per_stage_costs) - 1:
            upd.update(tail_time_s=0.0, tail_act_bytes=0.0, tail_params=0.0, tail_state_bytes=0.0)
        fixed.append(_replace(c, upd))
    ikey = ("inflight", plan.schedule, plan.pp, plan.microbatches(workload))
    if ikey not in costs_memo:  # depends on the schedule's shape only: the closed form (vpp = 1 here)
        m = plan.microbatches(workload)
        costs_memo[ikey] = np.array([inflight_microbatches(plan.schedule, plan.pp, m, st)
                                     for st in range(plan.pp)]) * (1 - plan.offload.activations)
    try:
        part = hetero_partition(fixed, caps, costs_memo[ikey])
    except Infeasible:
        return None
    # the slowest stage runs all m micro-batches: a lower bound of the pipeline (and so of the step)
    bound = plan.microbatches(workload) * max(part.stage_time_s)
    if bound >= costs_memo.get("best_step", math.inf):
        return "pruned"
    placed = plan.model_copy(update={"partition": [
        StageAssignment(layers=r, device_type=t, devices=list(d)) for r, (t, d) in zip(part.ranges, stage_groups)]})
    placed = ParallelPlan.model_validate(placed.model_dump())
    est = estimate(model, cluster, workload, placed)
    if est.fits:
        costs_memo["best_step"] = min(costs_memo.get("best_step", math.inf), est.step_time_s)
    types = " + ".join(f"{sum(1 for t, _ in stage_groups if t == name)}x{name}"
                       for name in dict.fromkeys(t for t, _ in stage_groups))
    sizes = "/".join(str(hi - lo) for lo, hi in part.ranges)
    return HeteroCandidate("pipeline", f"{_label(placed)} stages {types}, blocks {sizes}", est.step_time_s,
                           est.tokens_per_s, est.fits, placed, est, breakdown=dict(est.breakdown))


def _replace(costs, upd: dict):
    from dataclasses import replace
    return replace(costs, **upd)


# ---------------------------------------------------------------------------------------------------------
# unequal data-parallel shares


def shares_candidates(model: ModelGraph, cluster: Cluster, workload: Workload, groups: list[DeviceGroup],
                      mbs_options=(1, 2, 4), pp_options=(1, 2, 4)) -> list[HeteroCandidate]:
    """Every group runs dp_g replicas of one (tp, pp) structure; the batch is shared in proportion to
    speed (`balance_shares`) and the gradients reduced over every replica."""
    out = []
    per_node = min(g.devices_per_node for g in groups)
    n_blocks = _block_count(model)
    subs = {g.device_type: subcluster(cluster, g.devices) for g in groups}
    for pp in pp_options:
        if pp > n_blocks or any(g.size % pp for g in groups):
            continue
        for tp in (1, 2, 4, 8):
            if tp > per_node or not _heads_ok(model, tp) or any((g.size // pp) % tp for g in groups):
                continue
            for mbs in mbs_options:
                for rec in _RECOMPUTE:
                    base = ParallelPlan(tp=tp, pp=pp, zero=1, mbs=mbs, recompute=rec, sp=tp > 1, schedule="1f1b")
                    cand = balance_shares(model, cluster, workload, groups, base, subs)
                    if cand is not None:
                        out.append(cand)
                        if cand.fits:
                            break
    return out


def balance_shares(model, cluster, workload, groups, base: ParallelPlan, subs=None) -> HeteroCandidate | None:
    """Batch shares B_g (multiples of mbs x dp_g, summing to the global batch) that minimise the slowest
    group's pipeline time: start from shares proportional to each group's measured samples/s, then move
    one unit at a time from the slowest group to the one that finishes it soonest while that helps."""
    subs = subs or {g.device_type: subcluster(cluster, g.devices) for g in groups}
    gbs = workload.global_batch
    dps = [g.size // (base.tp * base.pp) for g in groups]
    units = [base.mbs * d for d in dps]  # a group's share moves in whole micro-batches of all its replicas
    memo: dict = {}

    def group_time(i: int, batch: int):
        if batch == 0:
            return 0.0, None
        key = (i, batch)
        if key not in memo:
            g = groups[i]
            plan = base.model_copy(update={"dp": dps[i]})
            m = batch // units[i]
            if base.pp > 1 and m < base.pp:
                memo[key] = (math.inf, None)
                return memo[key]
            try:
                est = estimate(model, subs[g.device_type], workload.model_copy(update={"global_batch": batch}), plan)
            except BadInput:
                memo[key] = (math.inf, None)
                return memo[key]
            bd = est.breakdown
            # the group's own pipeline, without its own gradient reduction and optimizer (done over all)
            t = est.step_time_s - bd["dp_comm_exposed_s"] - bd["optimizer_s"] - bd["offload_s"]
            memo[key] = (t, est)
        return memo[key]

    # proportional start: samples/s of each group at an equal-time probe
    rates = []
    for i in range(len(groups)):
        probe = units[i] * max(base.pp, 1) * 2
        t, _ = group_time(i, probe)
        rates.append(probe / t if t and math.isfinite(t) else 0.0)
    if not any(rates):
        return None
    shares = [0] * len(groups)
    total_rate = sum(rates)
    for i in range(len(groups)):
        shares[i] = int(round(gbs * rates[i] / total_rate / units[i])) * units[i]
    diff = gbs - sum(shares)
    # fix the sum with the group of the finest unit that can absorb it
    for i in sorted(range(len(groups)), key=lambda j: units[j]):
        if diff % units[i] == 0 and shares[i] + diff >= 0:
            shares[i] += diff
            diff = 0
            break
    if diff != 0:
        return None

    def slowest(sh):
        return max(group_time(i, b)[0] for i, b in enumerate(sh))

    improved = True
    guard = 0
    while improved and guard < 200:
        improved = False
        guard += 1
        cur = slowest(shares)
        for i, j in itertools.permutations(range(len(groups)), 2):
            # move lcm(unit_i, unit_j) samples from i to j
            step = units[i] * units[j] // math.gcd(units[i], units[j])
            if shares[i] < step:
                continue
            trial = list(shares)
            trial[i] -= step
            trial[j] += step
            if slowest(trial) < cur * (1 - 1e-9):
                shares, improved = trial, True
                break
    times = [group_time(i, b) for i, b in enumerate(shares)]
    if any(not math.isfinite(t) for t, _ in times):
        return None
    # gradient reduction and optimizer over every replica: estimate() of the whole-cluster plan whose stage
    # st is the union of every group's stage-st devices (planner/cost/stages.py), so the dp group spans both
    # device types on the links they have; its pipeline term is not used.
    dp_total = sum(d for d, b in zip(dps, shares) if b > 0)
    active = [i for i, b in enumerate(shares) if b > 0]
    stage_devs = [[] for _ in range(base.pp)]
    for i in active:
        g = groups[i]
        per_stage = g.size // base.pp
        for st in range(base.pp):
            stage_devs[st].extend(g.devices[st * per_stage:(st + 1) * per_stage])
    if len(active) < len(groups):
        return None  # a group left idle: that is the 'group alone' baseline, not a shares plan
    whole = base.model_copy(update={"dp": dp_total, "partition": [
        StageAssignment(layers=r, devices=d) for r, d in zip(even_ranges(model, base.pp), stage_devs)]})
    whole = ParallelPlan.model_validate(whole.model_dump())
    sync_w = workload.model_copy(update={"global_batch": base.mbs * dp_total * max(base.pp, 1)})
    try:
        sync = estimate(model, cluster, sync_w, whole)
    except BadInput:
        return None
    dp_s = sync.breakdown["dp_comm_exposed_s"]
    opt_s = sync.breakdown["optimizer_s"]
    pipe_s = max(t for t, _ in times)
    step = pipe_s + dp_s + opt_s
    # memory: each group's own estimate (ZeRO over its own dp_g ranks: an upper bound of the sharding over all)
    fits = all(e.fits for _, e in times if e is not None)
    tokens = workload.global_batch * workload.seq_len
    label = f"tp{base.tp} pp{base.pp} zero1 mbs{base.mbs}" + (f" {base.recompute}" if base.recompute != "none" else "")
    label += ", batch " + " + ".join(f"{b} on {dps[i]}x{groups[i].device_type}" for i, b in enumerate(shares))
    gl = [{"device_type": groups[i].device_type, "devices": list(groups[i].devices), "dp": dps[i],
           "global_batch": shares[i], "micro_batches": shares[i] // units[i], "pipeline_s": times[i][0],
           "plan": base.model_copy(update={"dp": dps[i]})} for i in range(len(groups))]
    return HeteroCandidate("shares", label, step, tokens / step, fits, groups=gl,
                           breakdown={"pipeline_s": pipe_s, "dp_comm_exposed_s": dp_s, "optimizer_s": opt_s})


def even_ranges(model, k):
    n = _block_count(model)
    sizes = [len(x) for x in np.array_split(np.arange(n), k)]
    edges = np.cumsum([0] + sizes)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(k)]


# ---------------------------------------------------------------------------------------------------------
# the planner


def _homogeneous_best(model, cluster, workload, top_k=1):
    from planner.search.search import search
    from planner.search.space import Constraints

    try:
        res = search(model, cluster, workload, Constraints(max_pp=8), top_k=top_k, refine_partition=False,
                     progress=False)
    except Infeasible:
        return None
    rp = res.plans[0]
    return rp


def plan_hetero(model: ModelGraph, cluster: Cluster, workload: Workload, baselines: bool = True,
                mbs_options=(1, 2, 4)) -> HeteroResult:
    """The fastest fitting way to use every device group (pipeline or shares), and the baselines."""
    t0 = time.perf_counter()
    groups = device_groups(cluster, workload.dtype)
    cands: list[HeteroCandidate] = []
    if len(groups) > 1:
        cands += pipeline_candidates(model, cluster, workload, groups, mbs_options)
        cands += shares_candidates(model, cluster, workload, groups, mbs_options)
    evaluated = len(cands)
    alone: dict = {}
    even = None
    if baselines or len(groups) == 1:
        for g in groups:
            rp = _homogeneous_best(model, subcluster(cluster, g.devices), workload)
            if rp is not None:
                alone[g.device_type] = HeteroCandidate(
                    "group", f"{rp.label()} on the {g.size} {g.device_type} alone", rp.estimate.step_time_s,
                    rp.estimate.tokens_per_s, rp.estimate.fits, rp.plan, rp.estimate,
                    breakdown=dict(rp.estimate.breakdown))
        rp = _homogeneous_best(model, cluster, workload)
        if rp is not None:
            even = HeteroCandidate("even", f"{rp.label()} even split over all {cluster.device_count}",
                                   rp.estimate.step_time_s, rp.estimate.tokens_per_s, rp.estimate.fits, rp.plan,
                                   rp.estimate, breakdown=dict(rp.estimate.breakdown))
    fitting = sorted((c for c in cands if c.fits), key=lambda c: c.step_time_s)
    pool = fitting + [c for c in list(alone.values()) + ([even] if even else []) if c.fits]
    if not pool:
        raise Infeasible(f"no plan fits on {cluster.name}: neither a heterogeneous pipeline, batch shares, "
                         "a single device group nor the even split")
    best = min(pool, key=lambda c: c.step_time_s)
    return HeteroResult(best=best, candidates=fitting,
                        best_pipeline=next((c for c in fitting if c.kind == "pipeline"), None),
                        best_shares=next((c for c in fitting if c.kind == "shares"), None),
                        even=even, alone=alone, evaluated=evaluated, wall_s=time.perf_counter() - t0)
