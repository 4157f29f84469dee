"""Run the search: enumerate the space, prune by memory, cost the rest in vectorized blocks (best first, with
a step-time lower bound that stops early), keep the top K that fit, refine their stage partitions, rank.

The search is a client of the cost model (docs/ARCHITECTURE.md#data-flow): every number it ranks by comes from
planner.cost.batch.estimate_batch (held equal to estimate() by tests/test_batch.py) or estimate() itself.
Its two bounds are built from the same functions, never from a copy of a formula:

  memory   space.memory_lower_bound: the memory phase (memory_phase.stage_memory) on bound stages;
  time     the pipeline's makespan is at least the busiest stage's busy time, m x (F + B) of that stage,
           which is at least the mean over the pp stages. The sum of F + B over all chunks is what
           estimate_batch reports as the makespan of the same plan with pp = 1 (one device runs every op in
           sequence) on the first dp*tp*cp devices of the cluster (the same tp, cp and ep groups, so the
           same per-layer times). A plan whose bound exceeds the K-th best step time found so far cannot
           enter the top K and is never costed. Plans are costed in order of that bound, so the incumbent
           is good early.

Both bounds are tested (tests/test_search.py) to stay below what estimate() computes, and the search's
best plan is tested equal to brute force over the same space.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from planner.core.errors import BadInput, Infeasible
from planner.core.hardware import Cluster
from planner.core.model import ModelGraph
from planner.core.plan import Estimate, ParallelPlan, Workload
from planner.cost.batch import SCHEDULES, PlanArrays, estimate_batch
from planner.cost.batch_ids import row_ids
from planner.cost.energy import money_terms, priced
from planner.cost.estimate import estimate, split_chunks
from planner.search.objective import PARETO_MAX, Objective, pareto_front
from planner.search.space import Constraints, default_max_cp, enumerate_space, memory_lower_bound

# Relative slack on both bounds: they are sums of the same terms in another order, so they may exceed the
# exact value by a few ulps; pruning only beyond this keeps the search exact.
BOUND_SLACK = 1e-9
# Plans per estimate_batch call: they grow from FIRST_BLOCK by doubling to BLOCK, so that the first (most
# promising) plans set a tight incumbent before many distinct pipelines are built.
FIRST_BLOCK = 64
BLOCK = 8_192
PARTITION_CANDIDATES = 8  # top plans with pp > 1 whose stage partition the DP refines


@dataclass
class RankedPlan:
    plan: ParallelPlan
    estimate: Estimate

    def label(self) -> str:
        """Short name of a plan, as the infeasible message and the table print it."""
        p = self.plan
        parts = [f"tp{p.tp}", f"pp{p.pp}", f"dp{p.dp}"]
        if p.vpp > 1:
            parts.append(f"vpp{p.vpp}")
        if p.cp > 1:
            parts.append(f"cp{p.cp}" + (" ulysses" if p.cp_comm == "a2a" else ""))
        if p.ep > 1:
            parts.append(f"ep{p.ep}" + (f" etp{p.etp}" if p.etp else "")
                         + {"tp_slice": " tp-slice", "deepep": " deepep"}.get(p.moe_dispatch, ""))
        parts += [f"zero{p.zero}", f"mbs{p.mbs}"]
        rec = p.recompute if p.recompute_num_layers is None else f"full{p.recompute_num_layers}"
        if rec != "none":
            parts.append(rec)
        if p.sp:
            parts.append("sp")
        if p.pp > 1:
            parts.append(p.schedule)
        if p.seq_chunks > 1:
            parts.append(f"seq-chunks{p.seq_chunks}")
        if p.attention_pool:
            parts.append("attn-pool")
        if p.offload.optimizer > 0:
            parts.append("offload")
        if p.offload.activations > 0:
            parts.append(f"act-offload{p.offload.activations:g}")
        return " ".join(parts)

    def as_dict(self, model: ModelGraph) -> dict:
        """The plan entry of `plan --json` (docs/ARCHITECTURE.md#contracts), plus etp, recompute_num_layers, why."""
        p = self.plan
        return {
            "tp": p.tp, "pp": p.pp, "dp": p.dp, "vpp": p.vpp, "cp": p.cp, "ep": p.ep, "etp": p.etp or p.tp,
            "zero": p.zero, "sp": p.sp, "mbs": p.mbs, "recompute": p.recompute,
            "recompute_num_layers": p.recompute_num_layers, "schedule": p.schedule,
            "offload_optimizer": p.offload.optimizer, "offload_activations": p.offload.activations,
            "cp_comm": p.cp_comm, "moe_dispatch": p.moe_dispatch, "seq_chunks": p.seq_chunks,
            "attention_pool": p.attention_pool,
            "flash_attention": p.flash_attention,
            "overlap_grad_reduce": p.overlap_grad_reduce, "partition": partition_of(model, p),
            "why": self.estimate.why, "estimate": self.estimate.model_dump(),
        }


@dataclass
class SearchResult:
    plans: list[RankedPlan]  # best first
    enumerated: int  # plans in the space
    pruned_memory: int  # dropped by the memory lower bound
    pruned_bound: int  # dropped by the step-time lower bound (could not enter the top K)
    evaluated: int  # costed by estimate_batch
    wall_s: float
    partition_refined: int = 0  # plans whose DP stage partition beat the even split
    filters: list = field(default_factory=list)
    objective: str = "time"  # what ranks the plans (planner/search/objective.py)
    pareto: list = field(default_factory=list)  # the costed plans no other beats on time, cost and energy

    def summary(self) -> dict:
        return {"evaluated": self.evaluated, "wall_s": self.wall_s, "enumerated": self.enumerated,
                "pruned_memory": self.pruned_memory, "pruned_bound": self.pruned_bound,
                "partition_refined": self.partition_refined}


class NoPlanFits(Infeasible):
    """Infeasible, with the closest plans (least memory) attached for callers that want them."""

    def __init__(self, message: str, closest: list[RankedPlan], suggestions: list[str] = ()):
        super().__init__(message, closest=closest, suggestions=suggestions)


def partition_of(model: ModelGraph, plan: ParallelPlan) -> list[list[int]]:
    """[first, last) block range of each pipeline chunk: the plan's own, or estimate's even split."""
    if plan.partition is not None:
        return [list(a.layers) for a in plan.partition]
    blocks = sorted({layer.block for layer in model.layers if layer.block is not None})
    pos = {b: i for i, b in enumerate(blocks)}
    out = []
    for chunk in split_chunks(model, plan):
        idx = [pos[layer.block] for layer in chunk if layer.block is not None]
        out.append([min(idx), max(idx) + 1] if idx else [])
    return out


# ---------------------------------------------------------------------------------------------------------
# the step-time lower bound


def prefix_cluster(cluster: Cluster, count: int) -> Cluster:
    """The first `count` devices of the cluster with the nodes they sit on (a node cut short keeps its
    first devices, as catalog.part_of_node does). Groups inside the prefix see the same links."""
    if count == cluster.device_count:
        return cluster
    devices = cluster.devices[:count]
    last = devices[-1].node
    nodes = list(cluster.nodes[:last + 1])
    keep = {d.index for d in devices}
    nodes[-1] = nodes[-1].model_copy(update={"devices": [i for i in nodes[-1].devices if i in keep]})
    return Cluster(name=f"{cluster.name}[{count}]", spec=cluster.spec, nodes=nodes, devices=devices,
                   fabric=cluster.fabric, island_link=cluster.island_link,
                   island_ports_per_node=cluster.island_ports_per_node)


# The columns the step-time bound's pp = 1 proxy fixes (1F1B, no virtual stages, ZeRO 0, no offload, no
# partial recompute): a step time depends on them only through the pipeline and the states, which the bound
# leaves out or keeps below. Every other column of core/dims.py's table is copied from the plan.
_PROXY_FIXED = {"pp": 1, "vpp": 1, "zero": 0, "recompute_num_layers": -1, "schedule": SCHEDULES.index("1f1b"),
                "overlap_grad_reduce": False, "offload_optimizer": 0.0, "offload_activations": 0.0}


def _proxy_keys(pa: PlanArrays) -> dict[str, np.ndarray]:
    """The columns a proxy copies, as int64 keys: partial recompute is bounded by no recompute
    (recomputing never makes a layer faster; POLICIES[0] == "none"); pp picks the proxy's cluster."""
    keys = {name: col for name, col in pa.columns().items() if name not in _PROXY_FIXED}
    keys["recompute"] = np.where(pa.recompute_num_layers >= 0, 0, pa.recompute)
    return {"pp": pa.pp, **keys}


def step_lower_bound(model: ModelGraph, cluster: Cluster, workload: Workload, pa: PlanArrays,
                     proxies: dict | None = None) -> np.ndarray:
    """Seconds every plan's step time is at least: the mean stage's busy time (module docstring).

    Per distinct pp and proxy columns (_proxy_keys) one pp = 1 plan is costed on the first n/pp devices.
    """
    proxies = {} if proxies is None else proxies
    keys = _proxy_keys(pa)
    first, inv = row_ids(list(keys.values()))  # np.unique(axis=0)'s rows without its structured sort
    uniq = {name: col[first] for name, col in keys.items()}
    out_u = np.empty(len(first))
    for pp in np.unique(uniq["pp"]).tolist():
        rows = np.flatnonzero(uniq["pp"] == pp)
        if pp not in proxies:
            proxies[pp] = prefix_cluster(cluster, cluster.device_count // pp)
        proxy = PlanArrays(**{**{name: col[rows] for name, col in uniq.items()}, **_PROXY_FIXED})
        res = estimate_batch(model, proxies[pp], workload, proxy)
        out_u[rows] = res["pipeline_s"] / pp
    return out_u[inv]


# ---------------------------------------------------------------------------------------------------------
# the search


def check_constraints(c: Constraints) -> None:
    """A fixed degree above its own cap (--cp 4 --max-cp 2) is a contradiction: refuse it the same way for
    tp, pp and cp, naming both flags (BadInput), rather than search an empty space or ignore the cap."""
    for name in ("tp", "pp", "cp"):
        fixed, cap = getattr(c, name), getattr(c, f"max_{name}")
        if fixed is not None and cap is not None and fixed > cap:
            raise BadInput(f"--{name} {fixed} is above --max-{name} {cap}; drop one of them or make them agree")


def check_inputs(cluster: Cluster, workload: Workload, constraints: Constraints, top_k: int) -> None:
    """What search() takes, held to planner.core.limits' caps before anything is allocated (BadInput, one line):
    callers of the Python API get the same refusals as the command line."""
    from planner.core.limits import MAX_DEVICES, MAX_TOP, check_int, check_microbatches, check_workload

    check_int("--top", top_k, MAX_TOP)
    check_workload(workload.global_batch, workload.seq_len)
    if cluster.device_count > MAX_DEVICES:
        raise BadInput(f"cluster {cluster.name}: {cluster.device_count:,} devices, past the cap of "
                       f"{MAX_DEVICES:,}; lower --nodes")
    constraints.check()
    check_constraints(constraints)
    check_microbatches(workload.global_batch, cluster.device_count,
                       mbs=constraints.mbs or constraints.max_mbs or workload.global_batch, dp=constraints.dp)


def search(model: ModelGraph, cluster: Cluster, workload: Workload, constraints: Constraints = Constraints(),
           top_k: int = 5, refine_partition: bool = True, progress: bool | None = None,
           use_time_bound: bool = True, objective: str = "time", price_per_hour: float | None = None) -> SearchResult:
    """The top_k fastest plans that fit, best first (NoPlanFits when none does; BadInput when the rules and
    constraints leave no plan at all). progress: tqdm on stderr (None: only on a terminal, after 1 s).
    objective "cost" or "energy" ranks by dollars or joules per step instead (planner/search/objective.py);
    price_per_hour replaces the catalog's price of every device-hour."""
    check_inputs(cluster, workload, constraints, top_k)
    goal = Objective(objective, cluster, workload.tokens_per_step, price_per_hour)
    money: list[tuple] = []  # (step, cost, energy) of every costed plan that fits: the Pareto front's points
    t_start = time.perf_counter()
    space = enumerate_space(model, cluster, workload, constraints)
    pa_all = space.plans
    capacity = float(cluster.devices[0].device.memory_bytes)
    mem_lb = memory_lower_bound(model, workload, pa_all)
    may_fit = mem_lb <= capacity * (1 + BOUND_SLACK)
    idx = np.flatnonzero(may_fit)
    pruned_memory = len(pa_all) - len(idx)

    steps: list[np.ndarray] = []  # step time of every costed plan that fits, and its row in pa_all
    rows: list[np.ndarray] = []
    mems: list[np.ndarray] = []
    mem_rows: list[np.ndarray] = []
    evaluated = 0
    pruned_bound = 0
    if len(idx):
        pa = pa_all.take(idx)
        if use_time_bound:
            t_lb = step_lower_bound(model, cluster, workload, pa)
            t_lb = t_lb * goal.bound_factor  # the objective's bound (objective.py)
            order = np.lexsort((idx, t_lb))  # ascending bound; ties in enumeration order
        else:
            t_lb = np.zeros(len(idx))
            order = np.arange(len(idx))
        kth = math.inf
        best_k = np.empty(0)
        from tqdm import tqdm

        # how many plans will be costed is not known ahead (the bound prunes more as the incumbent improves),
        # so a counter of the plans costed and pruned, not a bar whose total is mostly never reached
        bar = tqdm(total=None, desc="costing plans", unit=" plans", disable=None if progress is None else not progress,
                   delay=1.0, leave=False, file=None)
        pos = 0
        size = FIRST_BLOCK // 2
        while pos < len(order):
            size = min(2 * size, BLOCK)
            chunk = order[pos:pos + size]
            live = chunk[t_lb[chunk] <= kth * (1 + BOUND_SLACK)]
            if len(live) == 0:  # sorted by bound: nothing later can enter the top K either
                pruned_bound += len(order) - pos
                break
            pruned_bound += len(chunk) - len(live)
            out = estimate_batch(model, cluster, workload, pa.take(live))
            evaluated += len(live)
            fits = out["fits"]
            key = goal.values(out)
            steps.append(key[fits])
            rows.append(idx[live[fits]])
            terms = money_terms(cluster, out["step_time_s"][fits], out["hfu"][fits], workload.tokens_per_step,
                                price_per_hour)
            money.append((out["step_time_s"][fits], terms["cost_usd_per_step"], terms["energy_j_per_step"]))
            mems.append(out["peak_memory_bytes"])
            mem_rows.append(idx[live])
            best_k = np.concatenate([best_k, key[fits]])
            if len(best_k) > top_k:
                best_k = np.partition(best_k, top_k - 1)[:top_k]
            if len(best_k) >= top_k:
                kth = float(best_k.max())
            pos += size
            bar.set_postfix_str(f"{pruned_memory + pruned_bound:,} pruned", refresh=False)
            bar.update(len(live))
        bar.close()

    step_all = np.concatenate(steps) if steps else np.empty(0)
    row_all = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
    if len(step_all) == 0:
        raise _no_plan_fits(model, cluster, workload, constraints, pa_all, mem_lb,
                            np.concatenate(mems) if mems else np.empty(0),
                            np.concatenate(mem_rows) if mem_rows else np.empty(0, dtype=np.int64), capacity)

    # top K by step time, ties broken by enumeration order (deterministic); scalar estimates for the output
    extra = PARTITION_CANDIDATES if refine_partition else 0
    take = np.lexsort((row_all, step_all))[:top_k + extra]
    ranked = []
    for r in row_all[take].tolist():
        plan = pa_all.plan(int(r))
        ranked.append(RankedPlan(plan, estimate(model, cluster, workload, plan)))
    refined = 0
    if refine_partition:
        ranked, refined = _refine_partitions(model, cluster, workload, ranked)
    if price_per_hour is not None:  # the user's price replaces the catalog's in every estimate shown
        ranked = [RankedPlan(rp.plan, priced(rp.estimate, cluster, workload.tokens_per_step, price_per_hour))
                  for rp in ranked]
    ranked.sort(key=lambda rp: goal.of_estimate(rp.estimate))  # stable: ties keep enumeration order
    return SearchResult(plans=ranked[:top_k], enumerated=len(pa_all), pruned_memory=pruned_memory,
                        pruned_bound=pruned_bound, evaluated=evaluated, wall_s=time.perf_counter() - t_start,
                        partition_refined=refined, filters=space.filters, objective=objective,
                        pareto=_pareto(pa_all, row_all, money))


def _pareto(pa_all, row_all: np.ndarray, money: list[tuple]) -> list[dict]:
    """The Pareto front (time vs cost vs energy per step) of the costed plans that fit, fastest first, at most
    PARETO_MAX points: {label, step_time_s, cost_usd_per_step, energy_j_per_step} each."""
    if not money:
        return []
    step = np.concatenate([m[0] for m in money])
    cost = None if any(m[1] is None for m in money) else np.concatenate([m[1] for m in money])
    joules = None if any(m[2] is None for m in money) else np.concatenate([m[2] for m in money])
    front = pareto_front(step, cost, joules)[:PARETO_MAX]
    return [{"label": RankedPlan(pa_all.plan(int(row_all[i])), None).label(), "step_time_s": float(step[i]),
             "cost_usd_per_step": None if cost is None else float(cost[i]),
             "energy_j_per_step": None if joules is None else float(joules[i])} for i in front.tolist()]


def _refine_partitions(model, cluster, workload, ranked: list[RankedPlan]) -> tuple[list[RankedPlan], int]:
    """Try the DP stage partition (planner.search.partition, when present) on the leading pp > 1 plans and
    keep it where estimate() says it is faster and still fits."""
    try:
        from planner.search.partition import best_partition
    except ImportError:
        return ranked, 0
    out, refined, tried = [], 0, 0
    for rp in ranked:
        if rp.plan.pp > 1 and tried < PARTITION_CANDIDATES:
            tried += 1
            try:
                plan, est = best_partition(model, cluster, workload, rp.plan)
            except Infeasible:
                plan, est = None, None
            if est is not None and est.fits and est.step_time_s < rp.estimate.step_time_s:
                rp = RankedPlan(plan, est)
                refined += 1
        out.append(rp)
    return out, refined


# ---------------------------------------------------------------------------------------------------------
# when nothing fits: the closest plans and what would make room


def _fits_somewhere(model, cluster, workload, constraints, count: int = 16) -> bool:
    """Whether some plan of the space fits, checked with estimate_batch on the plans the memory bound
    admits: the `count` with the smallest bound among those with the smallest pipelines (building a long
    pipeline's DAG is the costly part). True means a plan fits; False may miss one."""
    try:
        space = enumerate_space(model, cluster, workload, constraints)
    except BadInput:
        return False
    pa = space.plans
    capacity = cluster.devices[0].device.memory_bytes
    lb = memory_lower_bound(model, workload, pa)
    cand = np.flatnonzero(lb <= capacity * (1 + BOUND_SLACK))
    if not len(cand):
        return False
    ops = (workload.global_batch // (pa.mbs * pa.dp)) * pa.pp * pa.vpp
    small = cand[ops[cand] <= max(50_000, int(ops[cand].min()))]
    pick = small[np.argsort(lb[small], kind="stable")[:count]]
    return bool(estimate_batch(model, cluster, workload, pa.take(pick))["fits"].any())


def _no_plan_fits(model, cluster, workload, constraints, pa_all, mem_lb, mems, mem_rows, capacity) -> NoPlanFits:
    # the closest plans: the least memory among those costed, and among the 16 with the smallest bound
    pick = np.argsort(mem_lb, kind="stable")[:16]
    pick = pick[~np.isin(pick, mem_rows)]
    if len(pick):
        out = estimate_batch(model, cluster, workload, pa_all.take(pick))
        mems = np.concatenate([mems, out["peak_memory_bytes"]])
        mem_rows = np.concatenate([mem_rows, pick])
    order = np.lexsort((mem_rows, mems))
    closest, seen = [], set()
    for i in order.tolist():
        r = int(mem_rows[i])
        if r in seen:
            continue
        seen.add(r)
        plan = pa_all.plan(r)
        closest.append(RankedPlan(plan, estimate(model, cluster, workload, plan)))
        if len(closest) == 3:
            break
    need = closest[0].estimate.peak_memory_bytes
    names = ", ".join(f"{c.label()} ({c.estimate.peak_memory_bytes / 1e9:.0f} GB)" for c in closest)
    tries = _suggestions(model, cluster, workload, constraints)
    msg = (f"no plan fits: the closest needs {need / 1e9:.1f} GB per device, {cluster.devices[0].device.name} has "
           f"{capacity / 1e9:.0f} GB; closest: {names}")
    if tries:
        msg += "; try " + " or ".join(tries)
    return NoPlanFits(msg, closest, tries)


def _suggestions(model, cluster, workload, constraints) -> list[str]:
    """Changes that are checked to let some plan fit: more nodes (for node-type presets), a shorter
    sequence, full recompute or ZeRO-3 when a constraint forbade them, activation offload, sequence chunks,
    a wider cp, or leaving free a degree the user fixed."""
    out = []
    per_node = cluster.devices_per_node
    n_nodes = len(cluster.nodes)
    can_grow = cluster.spec.needs_node_count and len(cluster.spec.groups) == 1 and cluster.is_homogeneous
    if can_grow and cluster.device_count % per_node == 0:
        from planner.catalog import resolve_cluster

        for k in range(1, 7):  # up to 64x the nodes
            nodes = n_nodes * 2**k
            try:
                bigger = resolve_cluster(cluster.spec, nodes)
                bigger = bigger.model_copy(update={"devices": [
                    d.model_copy(update={"device": cluster.devices[0].device}) for d in bigger.devices]})
            except BadInput:
                break
            if _fits_somewhere(model, bigger, workload, constraints):
                out.append(f"--nodes {nodes}")
                break
    seq = workload.seq_len
    for k in range(1, 5):
        s = seq >> k
        if s < 128 or s << k != seq:
            break
        if _fits_somewhere(model, cluster, workload.model_copy(update={"seq_len": s}), constraints):
            out.append(f"--seq {s}")
            break
    if constraints.recompute not in (None, "full"):
        relaxed = Constraints(**{**constraints.__dict__, "recompute": "full"})
        if _fits_somewhere(model, cluster, workload, relaxed):
            out.append("--recompute full")
    if constraints.zero not in (None, 3):
        relaxed = Constraints(**{**constraints.__dict__, "zero": 3})
        if _fits_somewhere(model, cluster, workload, relaxed):
            out.append("--zero 3")
    # what the space left out: activation offload, sequence chunks, a wider cp, a degree the user fixed
    relaxations = [("--offload-activations", {"offload_activations": (0.0, 0.5, 0.75, 1.0)}),
                   ("--seq-chunks 2,4,8,16", {"seq_chunks": (1, 2, 4, 8, 16)})]
    cap = constraints.max_cp if constraints.max_cp is not None else default_max_cp(workload.seq_len)
    if constraints.cp is None and cap < cluster.device_count:
        relaxations.append((f"--max-cp {cluster.device_count}", {"max_cp": cluster.device_count}))
    relaxations += [(f"without --{k} {getattr(constraints, k)}", {k: None}) for k in ("tp", "pp", "cp")
                    if getattr(constraints, k) is not None]
    for flag, change in relaxations:
        if all(getattr(constraints, k) == v for k, v in change.items()):
            continue
        if _fits_somewhere(model, cluster, workload, Constraints(**{**constraints.__dict__, **change})):
            out.append(flag)
    return out
