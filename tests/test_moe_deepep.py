"""DeepEP's node-deduplicated MoE dispatch (moe_dispatch "deepep"; DeepSeek-V3 report section 3.2.2): a token
crosses the fabric once per destination node instead of once per expert. The expected node count against a
Monte Carlo draw, a hand-computed time, never slower than the all-to-all and equal to it inside a node, the
dropless rule, estimate_batch equal to estimate, the search taking it only across nodes, and the exporters."""
from __future__ import annotations

import numpy as np
import pytest
from batch_checks import assert_batch_equals_scalar

from planner.app.api import load_cluster
from planner.core.builders import MoEConfig, TransformerConfig, build_transformer
from planner.core.errors import BadInput
from planner.core.hardware import CollectiveLink
from planner.core.plan import ParallelPlan, PlanFile, Workload
from planner.cost import comm
from planner.cost.batch import PlanArrays, estimate_batch
from planner.cost.estimate import estimate
from planner.export import Unsupported, export_text, make_context
from planner.search.search import search, step_lower_bound
from planner.search.space import Constraints, enumerate_space

REL = 1e-9


def moe_model():
    return build_transformer(TransformerConfig(
        name="moe-deepep", layers=4, hidden=1024, heads=16, kv_heads=8, ffn_hidden=2048, vocab=1000,
        moe=MoEConfig(experts=32, topk=4, ffn_hidden=512)))


def link(ranks, nodes, bus=400e9, nic=50e9):
    return CollectiveLink(bus_bytes_per_s=bus, latency_s=5e-6, level="inter-node" if nodes > 1 else "intra-node",
                          ranks=ranks, nodes=nodes, rank_inter_bytes_per_s=nic)


@pytest.mark.parametrize("topk,nodes", [(1, 2), (2, 4), (8, 8), (8, 4), (6, 16)])
def test_remote_nodes_per_token_matches_a_monte_carlo_draw(topk, nodes):
    rng = np.random.default_rng(0)
    draws = rng.integers(0, nodes, size=(200_000, topk))  # each expert's node, the token's own node is 0
    distinct_remote = np.array([len(set(r) - {0}) for r in draws.tolist()])
    assert comm.remote_nodes_per_token(topk, nodes) == pytest.approx(distinct_remote.mean(), rel=0.01)
    assert comm.remote_nodes_per_token(topk, 1) == 0.0


@pytest.mark.parametrize("topk,nodes,groups,topk_groups", [(8, 8, 8, 4), (8, 8, 64, 3), (6, 4, 8, 3), (8, 2, 8, 4)])
def test_group_limited_routing_matches_a_monte_carlo_draw(topk, nodes, groups, topk_groups):
    # DeepSeek-V3's node-limited routing: groups laid out whole on nodes, a token's experts from its best
    # topk_groups groups (uniform here, by symmetry)
    rng = np.random.default_rng(1)
    draws = 100_000
    chosen = np.argsort(rng.random((draws, groups)), axis=1)[:, :topk_groups]
    picks = chosen[np.arange(draws)[:, None], rng.integers(0, topk_groups, size=(draws, topk))]
    node = picks // (groups // nodes)
    own = rng.integers(0, nodes, size=draws)
    remote = np.array([len(set(r) - {o}) for r, o in zip(node.tolist(), own.tolist())])
    got = comm.remote_nodes_per_token(topk, nodes, groups, topk_groups)
    assert got == pytest.approx(remote.mean(), rel=0.01)
    assert got <= comm.remote_nodes_per_token(topk, nodes) + 1e-12


def test_hand_computed_dispatch_time():
    # 16 ranks on 2 nodes, top-2: a token reaches the other node with probability 1 - (1/2)^2 = 0.75. Off the
    # node 0.75 copies x 1 MB at 50 GB/s = 15 us; inside, 2 copies x (8/16 - 1/16) x 1 MB at 400 GB/s = 2.19 us
    lk = link(16, 2)
    s = 1e6
    want = comm.NCCL_RING_BASE_LATENCY_S + 15 * lk.latency_s + max(0.75 * s / 50e9, 2 * s * 7 / 16 / 400e9)
    got = comm.deduplicated_dispatch_time_s(s, 2, lk, inter_node_bytes_per_s=50e9)
    assert got == pytest.approx(want, rel=REL)
    # the all-to-all of both copies: (1 - 1/2) x 2 MB off the node, 1.33x the deduplicated exchange's bytes
    a2a = comm.all_to_all_time_s(2 * s, lk, inter_node_bytes_per_s=50e9)
    assert a2a - got == pytest.approx((1.0 - 0.75) * s / 50e9, rel=1e-6)


@pytest.mark.parametrize("topk", [1, 2, 4, 8])
@pytest.mark.parametrize("ranks,nodes", [(8, 1), (16, 2), (64, 8), (32, 4)])
def test_never_slower_than_the_all_to_all_and_equal_inside_a_node(topk, ranks, nodes):
    lk = link(ranks, nodes)
    for s in (1e3, 1e6, 1e9):
        d = comm.deduplicated_dispatch_time_s(s, topk, lk, inter_node_bytes_per_s=50e9)
        a = comm.all_to_all_time_s(s * topk, lk, inter_node_bytes_per_s=50e9)
        assert d <= a * (1 + REL)
        if nodes == 1 or topk == 1:
            assert d == pytest.approx(a, rel=REL)


def test_plan_and_workload_rules():
    with pytest.raises(ValueError, match="needs ep > 1"):
        ParallelPlan(dp=8, moe_dispatch="deepep")
    m, c = moe_model(), load_cluster("dgx-h100", 2)
    plan = ParallelPlan(dp=16, ep=16, mbs=1, zero=1, moe_dispatch="deepep")
    with pytest.raises(BadInput, match="dropless"):
        estimate(m, c, Workload(global_batch=32, seq_len=2048, moe_capacity_factor=1.0), plan)
    with pytest.raises(BadInput, match="dropless"):
        estimate_batch(m, c, Workload(global_batch=32, seq_len=2048, moe_capacity_factor=1.0), [plan])


def test_cheaper_across_nodes_and_says_why():
    m, c, w = moe_model(), load_cluster("dgx-h100", 2), Workload(global_batch=32, seq_len=2048)
    a2a = estimate(m, c, w, ParallelPlan(dp=16, ep=16, mbs=1, zero=1))
    dd = estimate(m, c, w, ParallelPlan(dp=16, ep=16, mbs=1, zero=1, moe_dispatch="deepep"))
    assert 0 < dd.breakdown["ep_comm_s"] < a2a.breakdown["ep_comm_s"]
    assert dd.step_time_s < a2a.step_time_s
    assert dd.peak_memory_bytes == a2a.peak_memory_bytes
    assert "MoE deepep" in dd.why and "2.0 copies" in dd.why  # top-4 over 2 nodes: 4 x 1/2 copies off the node
    # an expert group inside one node: the same exchange
    inside = [estimate(m, c, w, ParallelPlan(dp=16, ep=8, mbs=1, zero=1, moe_dispatch=d)) for d in ("a2a", "deepep")]
    assert inside[0].step_time_s == pytest.approx(inside[1].step_time_s, rel=REL)


def test_estimate_batch_equals_estimate_with_deepep():
    m, c = moe_model(), load_cluster("dgx-h100", 4)
    rng = np.random.default_rng(3)
    plans = []
    for _ in range(24):
        tp = int(rng.choice([1, 2]))
        ep = int(rng.choice([8, 16, 32]))
        pp = int(rng.choice([1, 2]))
        dp = 32 // (tp * pp)
        if (dp * tp) % ep:
            continue
        plans.append(ParallelPlan(dp=dp, tp=tp, pp=pp, ep=ep, etp=1, sp=tp > 1, mbs=1, zero=int(rng.integers(4)),
                                  recompute=str(rng.choice(["none", "full"])),
                                  moe_dispatch=str(rng.choice(["a2a", "deepep"]))))
    assert any(p.moe_dispatch == "deepep" for p in plans) and any(p.moe_dispatch == "a2a" for p in plans)
    w = Workload(global_batch=64, seq_len=2048, moe_imbalance=1.2)
    assert_batch_equals_scalar(m, c, w, plans)
    pa = PlanArrays.from_plans(plans)
    assert [pa.plan(i) for i in range(len(pa))] == plans


def test_search_takes_it_only_across_nodes_and_only_dropless():
    m, c = moe_model(), load_cluster("dgx-h100", 2)
    w = Workload(global_batch=32, seq_len=2048)
    cons = Constraints(max_pp=1, cp=1, zero=1)
    pa = enumerate_space(m, c, w, cons).plans
    etp = np.where(pa.etp > 0, pa.etp, pa.tp)
    assert pa.moe_deepep.any() and np.all(pa.ep[pa.moe_deepep] * etp[pa.moe_deepep] > 8)
    # the step-time bound stays below every deepep plan's time (the pruning is exact)
    lb = step_lower_bound(m, c, w, pa)
    got = estimate_batch(m, c, w, pa)
    assert np.all(lb <= got["step_time_s"] * (1 + REL))
    best = search(m, c, w, Constraints(ep=16, max_pp=1, cp=1, zero=1), top_k=1).plans[0]
    assert best.plan.moe_dispatch == "deepep" and "deepep" in best.label()
    dropping = w.model_copy(update={"moe_capacity_factor": 1.25})
    assert not enumerate_space(m, c, dropping, cons).plans.moe_deepep.any()


def test_exporters():
    m = moe_model()
    w = Workload(global_batch=32, seq_len=2048)
    plan = ParallelPlan(dp=16, ep=16, mbs=1, zero=1, moe_dispatch="deepep")
    ctx = make_context(PlanFile(model="moe-deepep", cluster="dgx-h100", nodes=2, workload=w, plan=plan), model=m,
                       devices_per_node=8)
    text = export_text(ctx, "megatron")
    # Megatron-Core main: the flex dispatcher with the DeepEP backend (docs/launchers.md)
    assert "--moe-token-dispatcher-type flex" in text and "--moe-flex-dispatcher-backend deepep" in text
    for fmt in ("torchtitan", "deepspeed"):
        with pytest.raises(Unsupported):
            export_text(ctx, fmt)


def test_cli_refusals_are_one_line(run_cli):
    rc, out, err = run_cli("plan", "--model", "qwen3-30b-a3b", "--cluster", "dgx-h100", "--nodes", "1", "--gbs", "64",
                           "--seq", "4096", "--moe-dispatch", "deepep")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "deepep" in err and "spanning nodes" in err
    rc, out, err = run_cli("plan", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "2", "--gbs", "64",
                           "--seq", "4096", "--moe-dispatch", "deepep")
    assert rc == 2 and "moe_dispatch deepep: model llama3-8b has no MoE layers" in err


def test_all_to_all_plans_dropped_where_deepep_is_offered_are_never_faster():
    # the space keeps only the deepep variant of a plan whose expert group spans nodes; that is exact only if
    # no such all-to-all plan beats its deepep twin, in time or memory
    m, c = moe_model(), load_cluster("dgx-h100", 2)
    w = Workload(global_batch=32, seq_len=2048)
    cons = Constraints(max_pp=2, cp=1, zero=1, max_mbs=2)
    a2a = enumerate_space(m, c, w, Constraints(**{**cons.__dict__, "moe_dispatch": ("a2a",)})).plans
    etp = np.where(a2a.etp > 0, a2a.etp, a2a.tp)
    spans = np.flatnonzero(a2a.ep * etp > 8)
    assert len(spans) > 10
    base = estimate_batch(m, c, w, a2a.take(spans))
    twin = a2a.take(spans)
    twin.moe_deepep = np.ones(len(spans), dtype=bool)
    dd = estimate_batch(m, c, w, twin)
    assert np.all(dd["step_time_s"] <= base["step_time_s"] * (1 + REL))
    assert np.mean(dd["step_time_s"] < base["step_time_s"]) > 0.5  # equal where the NVLink leg is the slower
    np.testing.assert_array_equal(dd["peak_memory_bytes"], base["peak_memory_bytes"])
    full = enumerate_space(m, c, w, cons).plans
    etp_f = np.where(full.etp > 0, full.etp, full.tp)
    assert not np.any(~full.moe_deepep & ~full.moe_tp_slice & (full.ep * etp_f > 8))
    best = search(m, c, w, cons, top_k=1).plans[0].estimate.step_time_s
    assert best <= search(m, c, w, Constraints(**{**cons.__dict__, "moe_dispatch": ("a2a",)}),
                          top_k=1).plans[0].estimate.step_time_s
