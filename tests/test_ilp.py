"""NIC-aware placement ILP (planner/planners/ilp.py): equal to brute force on small instances, and the two-pods
setting of Holmes: the placed plan keeps TP and DP inside the pods, close to RDMA everywhere, far above the
topology-blind plan."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.catalog import load_cluster, resolve_cluster
from planner.core.hardware import ClusterSpec
from planner.core.plan import ParallelPlan, Workload
from planner.cost.estimate import estimate
from planner.importers import load_model
from planner.planners.ilp import (
    PlacementProblem,
    brute_force,
    build_problem,
    objective_s,
    placed_plan,
    plan_topology,
    solve_ilp,
)


def small_islands(per_island: int = 4, node: str = "jetson-orin", link: str = "eth-25g") -> object:
    spec = ClusterSpec(name="test-islands", source="test: two islands of edge boards", fabric="eth-10g",
                       groups=[{"node": node, "count": per_island, "island": "a"},
                               {"node": node, "count": per_island, "island": "b"}],
                       between_islands={"link": link, "ports_per_node": 1})
    return resolve_cluster(spec)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 2), st.data())
def test_ilp_equals_brute_force_random(pp, dp, islands, data):
    """Random coefficients, up to 8 unit slots: the ILP's optimum equals brute force's."""
    nodes = data.draw(st.integers(1, 4))
    caps = data.draw(st.lists(st.integers(1, 3), min_size=nodes, max_size=nodes))
    if sum(caps) < pp * dp or sum(caps) > 8:
        return
    isl = tuple(data.draw(st.integers(0, islands - 1)) for _ in range(nodes))
    f = st.floats(0.0, 5.0)
    d_node = [data.draw(f) for _ in range(pp)]
    d_net = [x + data.draw(f) for x in d_node]
    d_isl = [x + data.draw(f) for x in d_net]
    p_node = data.draw(f)
    p_net = p_node + data.draw(f)
    p_cross = p_net + data.draw(f)
    prob = PlacementProblem(pp=pp, dp=dp, tp=1, m=data.draw(st.integers(1, 8)), node_capacity=tuple(caps),
                            node_island=isl, gateway_bytes_per_s=tuple(data.draw(st.floats(1.0, 10.0))
                                                                       for _ in range(islands)),
                            z_s=data.draw(f), p_node_s=p_node, p_net_s=p_net, p_cross_s=p_cross,
                            cross_latency_s=data.draw(st.floats(0.0, 1.0)), pair_bytes=data.draw(f),
                            d_node_s=tuple(d_node), d_net_s=tuple(d_net), d_island_s=tuple(d_isl))
    ilp = solve_ilp(prob)
    bf = brute_force(prob)
    assert ilp.objective_s == pytest.approx(bf.objective_s, rel=1e-6, abs=1e-9)
    assert objective_s(prob, ilp.counts) == pytest.approx(ilp.objective_s)


@pytest.mark.parametrize("pp,dp", [(2, 4), (4, 2), (1, 8)])
def test_ilp_equals_brute_force_real(pp, dp):
    """8 boards in two islands joined by Ethernet, a 6-block model: the ILP's placement is the brute-force
    optimum of its objective, and estimate() of it is the best estimate() over every placement."""
    cluster = small_islands()
    model = load_model("tiny-llama-20m")
    assert model.num_blocks <= 12
    w = Workload(global_batch=32, seq_len=512)
    plan = ParallelPlan(pp=pp, dp=dp, mbs=1, zero=1)
    prob = build_problem(model, cluster, w, plan)
    ilp = solve_ilp(prob)
    bf = brute_force(prob)
    assert ilp.objective_s == pytest.approx(bf.objective_s, rel=1e-9)
    best_est = estimate(model, cluster, w, placed_plan(cluster, plan, ilp.counts, model)).step_time_s
    # every placement (counts per stage and node), realised and estimated
    all_est = []
    for combo in itertools.product(range(pp), repeat=8):
        counts = [[1 if combo[n] == s else 0 for n in range(8)] for s in range(pp)]
        if any(sum(r) != dp for r in counts):
            continue
        all_est.append(estimate(model, cluster, w, placed_plan(cluster, plan, counts, model)).step_time_s)
    assert best_est <= min(all_est) * (1 + 1e-9)


def test_two_pods_must_show():
    """Holmes' setting: two RDMA pods of 4 DGX H100 joined by 25 GbE."""
    cluster = load_cluster("two-pods-25gbe")
    model = load_model("llama3-70b")
    w = Workload(global_batch=512, seq_len=4096)
    res = plan_topology(model, cluster, w)
    best = res.best
    assert best.estimate.fits
    # TP inside nodes and DP inside pods: every stage's devices lie in one island
    for a in best.plan.partition:
        assert len({cluster.devices[i].island for i in a.devices}) == 1
        tp_groups = [a.devices[k:k + best.plan.tp] for k in range(0, len(a.devices), best.plan.tp)]
        assert all(len({cluster.devices[i].node for i in g}) == 1 for g in tp_groups)
    assert best.estimate.tokens_per_s >= 0.9 * res.uniform.tokens_per_s
    assert best.estimate.tokens_per_s >= 3 * res.blind.tokens_per_s
