"""NIC-aware placement: which nodes (and so which islands) serve each pipeline stage's replicas, by an ILP.

A plan's structure (tp, pp, dp, micro-batches, the stage partition) is fixed; what is chosen is where its
pp x dp tensor-parallel groups ("units", tp devices each, always inside one node so TP traffic stays on
NVLink) sit. Integer variable c[s, n] = units of stage s on node n:

    sum_n c[s, n] = dp                    (every replica of every stage placed)
    sum_s tp * c[s, n] <= devices(n)      (node capacity)

Each stage's data-parallel group reduces its gradients over the slowest level it spans (one node, one
island, several islands; hardware.collective_link), and each stage boundary sends activations over the
levels its replica pairs cross. Pairs are matched freely (any bijection of stage s's units to stage s+1's
chains into pipelines), so the pairs that must leave node n are max(0, c[s, n] - c[s+1, n]) and those
that must leave island i are max(0, A[s, i] - A[s+1, i]), A the island sums. With binaries for "stage s
spans several nodes / islands" and "boundary b leaves a node / an island", the objective

    T = (m + pp - 1) * (z + 2 p) + d

is linear: the 1F1B step of Narayanan et al. (SC'21, section 2.2: (m + p - 1) x the slowest stage's
forward + backward, with each micro-batch's two transfers per boundary on the critical path), z the
slowest stage's forward + backward per micro-batch (fixed: the devices are alike), p the slowest boundary
transfer, d the slowest stage's gradient reduction (estimate.dp_sync_s on a link of each level). Transfers
that leave an island share its gateway (island link x ports x nodes of the island, as collective_link), so
p >= latency + tp x bytes x (pairs leaving island i) / gateway(i) is linear too. Every coefficient comes
from the cost model's own functions (comm.p2p_time_s, estimate.dp_sync_s, Cluster.p2p, Cluster.collective).

Solved by PuLP with CBC (bundled with PuLP), or HiGHS when available. `brute_force` enumerates every
placement for the same objective (tests hold them equal); the chosen placement becomes a plan whose
StageAssignment.devices estimate() times exactly.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from planner.core import dtypes
from planner.core.errors import BadInput, Infeasible
from planner.core.hardware import Cluster
from planner.core.model import ModelGraph
from planner.core.plan import Estimate, ParallelPlan, StageAssignment, Workload
from planner.cost import comm
from planner.cost.estimate import dp_sync_s, estimate, split_chunks


@dataclass(frozen=True)
class PlacementProblem:
    """The coefficients of the ILP (seconds), all from the cost model."""

    pp: int
    dp: int
    tp: int
    m: int
    node_capacity: tuple[int, ...]  # units (tp groups) each node can hold
    node_island: tuple[int, ...]
    gateway_bytes_per_s: tuple[float, ...]  # per island
    z_s: float  # slowest stage fwd + bwd per micro-batch
    p_node_s: float  # one transfer inside a node
    p_net_s: float  # one transfer between nodes of an island
    p_cross_s: float  # one transfer between islands, alone on the gateway
    cross_latency_s: float
    pair_bytes: float  # bytes one tp rank sends per transfer
    d_node_s: tuple[float, ...]  # per stage: gradient sync inside a node / an island / across islands
    d_net_s: tuple[float, ...]
    d_island_s: tuple[float, ...]

    @property
    def nodes(self) -> int:
        return len(self.node_capacity)

    @property
    def islands(self) -> int:
        return len(self.gateway_bytes_per_s)


@dataclass(frozen=True)
class Placement:
    counts: tuple[tuple[int, ...], ...]  # counts[s][n]
    objective_s: float


def _boundaries(pp: int) -> list[tuple[int, int]]:
    # every boundary and the wrap from the last stage to the first, as estimate.pipeline_p2p_s counts them
    return [(k, (k + 1) % pp) for k in range(pp)] if pp > 1 else []


def objective_s(prob: PlacementProblem, counts) -> float:
    """T of one placement, computed directly (what the ILP minimises)."""
    c = np.asarray(counts, dtype=float)
    isl = np.asarray(prob.node_island)
    A = np.stack([c[:, isl == i].sum(axis=1) for i in range(prob.islands)], axis=1)
    d = 0.0
    for s in range(prob.pp):
        nodes = int((c[s] > 0).sum())
        islands = int((A[s] > 0).sum())
        d = max(d, prob.d_island_s[s] if islands > 1 else prob.d_net_s[s] if nodes > 1 else prob.d_node_s[s])
    p = 0.0
    for a, b in _boundaries(prob.pp):
        p = max(p, prob.p_node_s)
        if (np.maximum(c[a] - c[b], 0) > 0).any():
            p = max(p, prob.p_net_s)
        leave = np.maximum(A[a] - A[b], 0)
        if (leave > 0).any():
            p = max(p, prob.p_cross_s)
            for i in range(prob.islands):
                p = max(p, prob.cross_latency_s + prob.tp * prob.pair_bytes * leave[i] / prob.gateway_bytes_per_s[i])
    return (prob.m + prob.pp - 1) * (prob.z_s + 2 * p) + d


def solve_ilp(prob: PlacementProblem, time_limit_s: float = 30.0) -> Placement:
    import pulp

    P, N, I = prob.pp, prob.nodes, prob.islands
    lp = pulp.LpProblem("placement", pulp.LpMinimize)
    c = {(s, n): pulp.LpVariable(f"c_{s}_{n}", 0, min(prob.dp, prob.node_capacity[n]), cat="Integer")
         for s in range(P) for n in range(N)}
    u = {(s, n): pulp.LpVariable(f"u_{s}_{n}", cat="Binary") for s in range(P) for n in range(N)}
    v = {(s, i): pulp.LpVariable(f"v_{s}_{i}", cat="Binary") for s in range(P) for i in range(I)}
    mn = {s: pulp.LpVariable(f"multinode_{s}", cat="Binary") for s in range(P)}
    mi = {s: pulp.LpVariable(f"multiisland_{s}", cat="Binary") for s in range(P)}
    d = pulp.LpVariable("d", 0)
    p = pulp.LpVariable("p", 0)
    for s in range(P):
        lp += pulp.lpSum(c[s, n] for n in range(N)) == prob.dp
        for n in range(N):
            lp += c[s, n] <= prob.dp * u[s, n]
            lp += u[s, n] <= v[s, prob.node_island[n]]
        lp += (N - 1 if N > 1 else 1) * mn[s] >= pulp.lpSum(u[s, n] for n in range(N)) - 1
        lp += (I - 1 if I > 1 else 1) * mi[s] >= pulp.lpSum(v[s, i] for i in range(I)) - 1
        lp += d >= prob.d_node_s[s] + (prob.d_net_s[s] - prob.d_node_s[s]) * mn[s] \
            + (prob.d_island_s[s] - prob.d_net_s[s]) * mi[s]
    for n in range(N):
        lp += pulp.lpSum(c[s, n] for s in range(P)) <= prob.node_capacity[n]
    for k, (a, b) in enumerate(_boundaries(P)):
        lp += p >= prob.p_node_s
        leaves_node = pulp.LpVariable(f"leavesnode_{k}", cat="Binary")
        leaves_isl = pulp.LpVariable(f"leavesisland_{k}", cat="Binary")
        for n in range(N):
            lp += prob.dp * leaves_node >= c[a, n] - c[b, n]
        lp += p >= prob.p_net_s * leaves_node
        for i in range(I):
            ids = [n for n in range(N) if prob.node_island[n] == i]
            out_i = pulp.LpVariable(f"out_{k}_{i}", 0)
            lp += out_i >= pulp.lpSum(c[a, n] for n in ids) - pulp.lpSum(c[b, n] for n in ids)
            lp += prob.dp * leaves_isl >= out_i
            lp += p >= prob.cross_latency_s * leaves_isl \
                + prob.tp * prob.pair_bytes / prob.gateway_bytes_per_s[i] * out_i
        lp += p >= prob.p_cross_s * leaves_isl
    lp += (prob.m + P - 1) * (prob.z_s + 2 * p) + d
    solver = _solver(time_limit_s)
    status = lp.solve(solver)
    if pulp.LpStatus[status] != "Optimal":
        raise Infeasible(f"placement ILP: {pulp.LpStatus[status]} (pp {P}, dp {prob.dp}, tp {prob.tp} on {N} nodes)")
    counts = tuple(tuple(int(round(c[s, n].value())) for n in range(N)) for s in range(P))
    return Placement(counts, objective_s(prob, counts))


def _solver(time_limit_s: float):
    import pulp

    if "HiGHS" in pulp.listSolvers(onlyAvailable=True):
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s)


def brute_force(prob: PlacementProblem) -> Placement:
    """Every placement (counts per stage and node within capacity), the one of least objective_s."""
    N = prob.nodes

    def rows(total, caps):
        if len(caps) == 1:
            if total <= caps[0]:
                yield (total,)
            return
        for x in range(min(total, caps[0]) + 1):
            for rest in rows(total - x, caps[1:]):
                yield (x, *rest)

    best = None

    def rec(s, caps, acc):
        nonlocal best
        if s == prob.pp:
            val = objective_s(prob, acc)
            if best is None or val < best.objective_s - 1e-15:
                best = Placement(tuple(acc), val)
            return
        for r in rows(prob.dp, caps):
            rec(s + 1, tuple(cap - x for cap, x in zip(caps, r)), acc + [r])

    rec(0, tuple(prob.node_capacity), [])
    if best is None:
        raise Infeasible("no placement fits the nodes")
    return best


# ---------------------------------------------------------------------------------------------------------
# the coefficients from the cost model


def _representative(cluster: Cluster, node_ids: list[int], tp: int, size: int) -> list[int] | None:
    """`size` ranks tp apart, taken node by node over node_ids (one rank per tp group)."""
    out = []
    for n in node_ids:
        devs = cluster.nodes[n].devices
        out += devs[0:len(devs) - len(devs) % tp:tp]
    return out[:size] if len(out) >= size else None


def build_problem(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan) -> PlacementProblem:
    if plan.vpp != 1 or plan.cp != 1:
        raise BadInput("the placement ILP takes plans with vpp = 1 and cp = 1")
    if plan.devices != cluster.device_count:
        raise BadInput(f"plan uses {plan.devices} devices, cluster {cluster.name} has {cluster.device_count}")
    tp, pp, dp = plan.tp, plan.pp, plan.dp
    caps = []
    for node in cluster.nodes:
        if len(node.devices) % tp:
            raise BadInput(f"tp {tp} does not divide the {len(node.devices)} devices of node {node.index}")
        caps.append(len(node.devices) // tp)
    islands = sorted({n.island for n in cluster.nodes})
    isl_of = tuple(islands.index(n.island) for n in cluster.nodes)
    m = plan.microbatches(workload)
    e = dtypes.activation_bytes(workload.dtype)
    g_bytes = dtypes.gradient_bytes(workload.grad_dtype)
    # z: estimate() of the plan in rank order gives every stage's forward + backward per micro-batch
    base = estimate(model, cluster, workload, plan.model_copy(update={"partition": plan.partition}))
    z = max(st["fwd_s"] + st["bwd_s"] for st in base.stages)
    dev = cluster.devices[0].device
    # transfers: one tp rank's activations (estimate: b s h e / tp with sequence parallel)
    nbytes = plan.mbs * workload.seq_len * model.layers[0].hidden * e / (tp if plan.sp else 1)
    n0 = cluster.nodes[0]
    first = n0.devices[0]
    p_node = float(comm.p2p_time_s(nbytes, *cluster.p2p(first, n0.devices[-1]))) if len(n0.devices) > 1 else 0.0
    same_isl = [n.index for n in cluster.nodes if n.island == n0.island and n.index != 0]
    p_net = float(comm.p2p_time_s(nbytes, *cluster.p2p(first, cluster.nodes[same_isl[0]].devices[0]))) \
        if same_isl else math.inf
    other = [n.index for n in cluster.nodes if n.island != n0.island]
    if other:
        bw, lat = cluster.p2p(first, cluster.nodes[other[0]].devices[0])
        p_cross = float(comm.p2p_time_s(nbytes, bw, lat))
        cross_lat = lat
    else:
        p_cross, cross_lat = math.inf, 0.0
    gateways = []
    for i in islands:
        nodes_i = sum(1 for n in cluster.nodes if n.island == i)
        gateways.append(cluster.island_link.bytes_per_s * cluster.island_ports_per_node * nodes_i
                        if cluster.island_link is not None else math.inf)
    # gradient sync per stage at each level, estimate.dp_sync_s on a representative group of that level
    chunks = split_chunks(model, plan)
    per_stage = []
    for s in range(pp):
        layers = [x for c, ch in enumerate(chunks) if c % pp == s for x in ch if x.trainable]
        per_stage.append(np.array([float(x.params_per_device(tp=tp, ep=plan.ep, etp=plan.etp)) for x in layers]
                                  or [0.0]))
    by_island = {i: [n.index for n in cluster.nodes if n.island == i] for i in islands}

    def sync(group):
        if dp == 1:
            return 0.0
        if group is None:
            return math.inf
        link = cluster.collective(group)
        return [dp_sync_s(pl, g_bytes, e, plan.zero, m, link, dev) for pl in per_stage]

    node_group = _representative(cluster, [0], tp, dp)
    net_group = _representative(cluster, by_island[islands[0]], tp, dp)
    # across islands: the ranks split as evenly as the islands allow (the gateway of the smaller share binds)
    half = [_representative(cluster, by_island[i], tp, math.ceil(dp / len(islands))) for i in islands]
    isl_group = None
    if len(islands) > 1 and all(h is not None for h in half):
        isl_group = [x for pair in itertools.zip_longest(*half) for x in pair if x is not None][:dp]
    as_tuple = (lambda x: tuple(x) if isinstance(x, list) else (x,) * pp)
    d_node, d_net, d_isl = (as_tuple(sync(gr)) for gr in (node_group, net_group, isl_group))
    # A level no placement can reach (the group does not fit one node, or one island; no second island)
    # takes the next level's value, so the ILP's big-M terms stay finite and the objective is unchanged.
    d_isl = tuple(0.0 if math.isinf(x) else x for x in d_isl)
    d_net = tuple(y if math.isinf(x) else x for x, y in zip(d_net, d_isl))
    d_node = tuple(y if math.isinf(x) else x for x, y in zip(d_node, d_net))
    if math.isinf(p_cross):
        p_cross = 0.0
    if math.isinf(p_net):
        p_net = p_cross
    return PlacementProblem(pp=pp, dp=dp, tp=tp, m=m, node_capacity=tuple(caps), node_island=isl_of,
                            gateway_bytes_per_s=tuple(gateways), z_s=z, p_node_s=p_node, p_net_s=p_net,
                            p_cross_s=p_cross, cross_latency_s=cross_lat, pair_bytes=nbytes,
                            d_node_s=d_node, d_net_s=d_net, d_island_s=d_isl)


# ---------------------------------------------------------------------------------------------------------
# from counts to a plan


def placed_plan(cluster: Cluster, plan: ParallelPlan, counts, model: ModelGraph | None = None) -> ParallelPlan:
    """The plan with StageAssignment.devices realising `counts`: replica r of stage s + 1 sits on the node
    (else the island) of replica r of stage s where the counts allow, so matched pairs stay close."""
    tp, pp = plan.tp, plan.pp
    free = {n.index: list(n.devices) for n in cluster.nodes}
    units: list[list[tuple[int, list[int]]]] = []
    for s in range(pp):
        mine = []
        for n, k in enumerate(counts[s]):
            for _ in range(k):
                mine.append((n, free[n][:tp]))
                free[n] = free[n][tp:]
        units.append(mine)
    # order each stage's units to follow the previous stage's: same node, then same island, then any
    for s in range(1, pp):
        pool = list(units[s])
        ordered = []
        for n_prev, _ in units[s - 1]:
            isl = cluster.nodes[n_prev].island
            pick = next((j for j, (n, _) in enumerate(pool) if n == n_prev), None)
            if pick is None:
                pick = next((j for j, (n, _) in enumerate(pool) if cluster.nodes[n].island == isl), 0)
            ordered.append(pool.pop(pick))
        units[s] = ordered
    if plan.partition is not None:
        ranges = [tuple(a.layers) for a in plan.partition]
    else:
        from planner.planners.hetero import even_ranges
        ranges = even_ranges(model, pp)
    parts = [StageAssignment(layers=r, devices=[d for _, devs in units[s] for d in devs])
             for s, r in enumerate(ranges)]
    return ParallelPlan.model_validate({**plan.model_dump(), "partition": [p.model_dump() for p in parts]})


def rank_order_plan(cluster: Cluster, plan: ParallelPlan, model: ModelGraph) -> ParallelPlan:
    """The plan placed in Megatron's rank order (stage s on devices s*S .. (s+1)*S - 1): what a planner that
    ignores the topology runs, with the same per-boundary transfer model as a placed plan."""
    from planner.planners.hetero import even_ranges

    size = plan.tp * plan.dp * plan.cp
    ranges = [tuple(a.layers) for a in plan.partition] if plan.partition else even_ranges(model, plan.pp)
    parts = [{"layers": r, "devices": list(range(s * size, (s + 1) * size))} for s, r in enumerate(ranges)]
    return ParallelPlan.model_validate({**plan.model_dump(), "partition": parts})


@dataclass
class PlacedResult:
    plan: ParallelPlan
    estimate: Estimate
    placement: Placement
    problem: PlacementProblem


def place(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan) -> PlacedResult:
    prob = build_problem(model, cluster, workload, plan)
    sol = solve_ilp(prob)
    placed = placed_plan(cluster, plan, sol.counts, model)
    return PlacedResult(placed, estimate(model, cluster, workload, placed), sol, prob)


@dataclass
class TopologyResult:
    best: PlacedResult
    placed: list[PlacedResult]  # every structure placed, best first
    blind_plan: ParallelPlan  # the best plan of the same devices on one uniform fabric, in rank order here
    blind: Estimate
    uniform_plan: ParallelPlan  # that plan on the uniform fabric
    uniform: Estimate
    wall_s: float


def uniform_cluster(cluster: Cluster) -> Cluster:
    """The same nodes on one island of the cluster's fabric (what 'RDMA everywhere' means)."""
    nodes = [n.model_copy(update={"island": "main"}) for n in cluster.nodes]
    devices = [d.model_copy(update={"island": "main"}) for d in cluster.devices]
    groups = [g.model_copy(update={"island": "main"}) for g in cluster.spec.groups]
    spec = cluster.spec.model_copy(update={"groups": groups, "between_islands": None})
    return Cluster(name=f"{cluster.name} (one island)", spec=spec, nodes=nodes, devices=devices,
                   fabric=cluster.fabric, island_link=None)


def plan_topology(model: ModelGraph, cluster: Cluster, workload: Workload, top_k: int = 6) -> TopologyResult:
    """Place the leading structures of both searches (on the real cluster, and on the same nodes with one
    uniform fabric) with the ILP and keep the fastest placed plan that fits; also report the topology-blind
    plan (the uniform fabric's best, run here in rank order) and the uniform fabric's own figure."""
    import time

    from planner.search.search import search
    from planner.search.space import Constraints

    t0 = time.perf_counter()
    flat = uniform_cluster(cluster)
    c = Constraints(vpp=1, cp=1, max_pp=8)
    res_flat = search(model, flat, workload, c, top_k=top_k, refine_partition=False, progress=False)
    res_real = search(model, cluster, workload, c, top_k=top_k, refine_partition=False, progress=False)
    seen, placed = set(), []
    for rp in res_flat.plans + res_real.plans:
        p = rp.plan.model_copy(update={"partition": None})
        key = p.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        try:
            placed.append(place(model, cluster, workload, p))
        except (BadInput, Infeasible):
            continue
    fitting = sorted((r for r in placed if r.estimate.fits), key=lambda r: r.estimate.step_time_s)
    if not fitting:
        raise Infeasible(f"no placed plan fits on {cluster.name}")
    uni = res_flat.plans[0]
    blind_plan = rank_order_plan(cluster, uni.plan.model_copy(update={"partition": None}), model)
    blind = estimate(model, cluster, workload, blind_plan)
    return TopologyResult(best=fitting[0], placed=fitting, blind_plan=blind_plan, blind=blind,
                          uniform_plan=uni.plan, uniform=uni.estimate, wall_s=time.perf_counter() - t0)
