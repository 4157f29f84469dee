"""Pipeline MoE's expert placement (moe_dispatch "tp_slice"; Chen et al. 2023, arXiv 2304.11414, section 3):
E/tp whole experts on each tensor-parallel rank, tokens picked from the replicated input by index, one TP
all-reduce instead of the dispatch/combine all-to-all. A hand-solved case, the plan rule, the search choosing
it only when it is faster, estimate_batch equal to estimate on plans that use it, and brute force."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
from batch_checks import assert_batch_equals_scalar

from planner import catalog
from planner.app.api import load_cluster, with_link
from planner.core.builders import MoEConfig, TransformerConfig, build_transformer
from planner.core.errors import BadInput
from planner.core.plan import ParallelPlan, PlanFile, Workload
from planner.cost import comm
from planner.cost.batch import PlanArrays, estimate_batch
from planner.cost.estimate import estimate
from planner.export import Unsupported, export_text, make_context
from planner.search.search import RankedPlan, search, step_lower_bound
from planner.search.space import Constraints, EmptySpace, enumerate_space, memory_lower_bound

REL = 1e-9


@lru_cache(maxsize=None)
def moe_model(hidden=4096, layers=2, experts=8, topk=2, expert_ffn=4096, heads=32, kv_heads=8):
    return build_transformer(TransformerConfig(
        name=f"moe-h{hidden}-e{experts}k{topk}", layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
        ffn_hidden=2 * hidden, vocab=1000, moe=MoEConfig(experts=experts, topk=topk, ffn_hidden=expert_ffn)))


def dense_model():
    return build_transformer(TransformerConfig(name="d", layers=2, hidden=256, heads=8, kv_heads=8, ffn_hidden=512,
                                               vocab=1000))


def test_hand_computed_comm_is_the_tp_all_reduce_and_no_all_to_all():
    # 2 blocks (attention + MoE), tp 4 on ranks 0..3 of one DGX H100 (NVLink), mbs 1 x seq 8192, gbs 8 over
    # dp 2: m = 4 micro-batches. One all-reduce of the sublayer output, b*s*h*2 bytes = 64 MiB, per forward
    # and one per backward, in each of the 4 sublayers.
    m, c = moe_model(), load_cluster("dgx-h100", 1)
    w = Workload(global_batch=8, seq_len=8192)
    link = c.collective([0, 1, 2, 3])
    nbytes = 1 * 8192 * 4096 * 2
    # NCCL ring, Simple protocol (what wins at 64 MiB): base 8.4 us + 2(n-1) hops of 3.4 us (0.6 us LL x 3.4/0.6)
    # + 2(n-1)/n * S / busbw (nccl-tests PERFORMANCE.md; planner/cost/comm.py)
    one = 8.4e-6 + 6 * link.latency_s * 3.4 / 0.6 + 2 * 3 / 4 * nbytes / link.bus_bytes_per_s
    assert comm.all_reduce_time_s(nbytes, link) == pytest.approx(one, rel=REL)
    plan = dict(tp=4, dp=2, ep=4, etp=1, mbs=1)
    for sp in (False, True):
        t = estimate(m, c, w, ParallelPlan(**plan, sp=sp, moe_dispatch="tp_slice"))
        assert t.breakdown["ep_comm_s"] == 0.0
        assert t.breakdown["tp_comm_s"] == pytest.approx(4 * 2 * 4 * one, rel=REL)  # m x passes x sublayers
        assert "tp_slice (Pipeline MoE)" in t.why and "2 of 8 experts" in t.why
    # against the all-to-all with the same expert placement (ep 4 inside the tp group, etp 1), no SP: the same
    # compute, memory and TP traffic; tp_slice only drops the four all-to-alls per MoE layer
    a = estimate(m, c, w, ParallelPlan(**plan))
    t = estimate(m, c, w, ParallelPlan(**plan, moe_dispatch="tp_slice"))
    assert a.breakdown["ep_comm_s"] > 0
    for k in ("compute_s", "tp_comm_s"):
        assert t.breakdown[k] == pytest.approx(a.breakdown[k], rel=REL)
    assert t.peak_memory_bytes == pytest.approx(a.peak_memory_bytes, rel=REL)
    assert t.step_time_s < a.step_time_s
    # with SP the all-to-all layout folds (no TP collective in the MoE layer, SP-split activations);
    # tp_slice keeps the all-reduce of the 2 MoE layers and their replicated activations
    af = estimate(m, c, w, ParallelPlan(**plan, sp=True))
    ts = estimate(m, c, w, ParallelPlan(**plan, sp=True, moe_dispatch="tp_slice"))
    assert ts.breakdown["tp_comm_s"] - af.breakdown["tp_comm_s"] == pytest.approx(4 * 2 * 2 * one, rel=REL)
    assert ts.memory["activations_bytes"] > af.memory["activations_bytes"]


def test_plan_rule_and_refusals():
    ParallelPlan(tp=4, ep=4, etp=1, moe_dispatch="tp_slice")
    for bad in (dict(tp=1, ep=1, etp=1), dict(tp=4, ep=2, etp=1), dict(tp=4, ep=4), dict(tp=4, ep=4, etp=4)):
        with pytest.raises(ValueError, match="tp > 1, ep = tp and etp = 1"):
            ParallelPlan(**bad, moe_dispatch="tp_slice")
    c, w = load_cluster("dgx-h100", 1), Workload(global_batch=8, seq_len=1024)
    with pytest.raises(BadInput, match="no MoE layers"):
        estimate(dense_model(), c, w, ParallelPlan(tp=2, dp=4, ep=2, etp=1, moe_dispatch="tp_slice"))
    with pytest.raises(BadInput, match="does not divide the 4 experts"):  # tp = ep must divide the experts
        estimate(moe_model(hidden=256, heads=8, kv_heads=8, experts=4), c, w,
                 ParallelPlan(tp=8, ep=8, etp=1, moe_dispatch="tp_slice"))
    # estimate_batch refuses, as ParallelPlan does, a tp_slice row whose experts are tensor-split (etp = tp)
    pa = PlanArrays.from_plans([ParallelPlan(tp=2, dp=4, ep=2)])
    pa.moe_tp_slice[:] = True
    with pytest.raises(BadInput, match="tp_slice.*etp = 1"):
        estimate_batch(moe_model(), c, w, pa)


def test_space_rule_names_tp_slice_and_constraints_choose_it():
    m, c = moe_model(hidden=256, heads=8, kv_heads=8), load_cluster("dgx-h100", 1)
    w = Workload(global_batch=16, seq_len=1024)
    space = enumerate_space(m, c, w, Constraints()).plans
    ts = space.moe_tp_slice
    assert ts.any() and (~ts).any()
    assert ((space.tp[ts] > 1) & (space.ep[ts] == space.tp[ts]) & (space.etp[ts] == 1)).all()
    only = enumerate_space(m, c, w, Constraints(moe_dispatch=("tp_slice",))).plans
    assert only.moe_tp_slice.all() and len(only) == int(ts.sum())
    assert not enumerate_space(m, c, w, Constraints(moe_dispatch=("a2a",))).plans.moe_tp_slice.any()
    with pytest.raises(EmptySpace, match=r"tp_slice \(Pipeline MoE\) with tp > 1, ep = tp and etp = 1"):
        enumerate_space(m, c, w, Constraints(tp=1, moe_dispatch=("tp_slice",)))
    with pytest.raises(EmptySpace, match="no MoE layers"):
        enumerate_space(dense_model(), c, w, Constraints(moe_dispatch=("tp_slice",)))
    assert not enumerate_space(dense_model(), c, w, Constraints()).plans.moe_tp_slice.any()
    with pytest.raises(BadInput, match="moe_dispatch"):
        enumerate_space(m, c, w, Constraints(moe_dispatch=("scatter",)))


def _best(model, cluster, w, **cons):
    return search(model, cluster, w, Constraints(**cons), top_k=1, refine_partition=False).plans[0]


def test_never_chosen_when_slower():
    # Mixtral-like routing (top-2 of 8) inside one NVLink node: folded all-to-all over tp ranks sends k/tp of
    # what the all-reduce does, so tp_slice is slower and the search must not take it
    m, c = moe_model(hidden=1024, layers=4, heads=16, kv_heads=8, expert_ffn=2048), load_cluster("dgx-h100", 1)
    w = Workload(global_batch=32, seq_len=2048)
    both = _best(m, c, w)
    a2a = _best(m, c, w, moe_dispatch=("a2a",))
    ts = _best(m, c, w, moe_dispatch=("tp_slice",))
    assert ts.plan.moe_dispatch == "tp_slice" and ts.estimate.step_time_s > a2a.estimate.step_time_s
    assert both.plan.moe_dispatch == "a2a"
    assert both.estimate.step_time_s == pytest.approx(a2a.estimate.step_time_s, rel=REL)


def _slow_nic_case():
    # fine-grained experts (16 of width 512, top-4) on two DGX H100 joined by 10 GbE instead of InfiniBand
    m = moe_model(hidden=2048, layers=8, heads=16, kv_heads=8, experts=16, topk=4, expert_ffn=512)
    return m, with_link(load_cluster("dgx-h100", 2), "eth-10g"), Workload(global_batch=64, seq_len=2048)


def test_slow_nic_and_tp_in_node_picks_tp_slice():
    m, c, w = _slow_nic_case()
    # tp 8 fills a node; without folding the expert-parallel group nests in the data-parallel one (ranks 8
    # apart), so every all-to-all with ep > 1 crosses the 10 GbE link, while tp_slice's ep = tp stays on NVLink
    cons = dict(tp=8, fold=False)
    best = _best(m, c, w, **cons)
    assert best.plan.moe_dispatch == "tp_slice" and best.plan.ep == 8
    assert "tp_slice (Pipeline MoE)" in best.estimate.why
    assert best.estimate.breakdown["ep_comm_s"] == 0.0
    crossing = _best(m, c, w, ep=2, moe_dispatch=("a2a",), **cons)
    assert c.collective([0, 8]).nodes == 2  # its expert group (ranks 0 and 8) spans both nodes
    assert crossing.estimate.breakdown["ep_comm_s"] > best.estimate.breakdown["tp_comm_s"]
    assert crossing.estimate.step_time_s > best.estimate.step_time_s
    a2a = _best(m, c, w, moe_dispatch=("a2a",), **cons)
    assert a2a.estimate.step_time_s > best.estimate.step_time_s
    # the choice is the faster of the two searches, whichever wins
    for extra in (dict(), dict(fold=True)):
        got = _best(m, c, w, **{**cons, **extra})
        a = _best(m, c, w, **{**cons, **extra, "moe_dispatch": ("a2a",)})
        t = _best(m, c, w, **{**cons, **extra, "moe_dispatch": ("tp_slice",)})
        assert got.estimate.step_time_s == pytest.approx(min(a.estimate.step_time_s, t.estimate.step_time_s),
                                                         rel=REL)
        assert got.plan.moe_dispatch == ("tp_slice" if t.estimate.step_time_s < a.estimate.step_time_s else "a2a")


def _random_plans(model, n: int, gbs: int, count: int, seed: int) -> list[ParallelPlan]:
    rng = np.random.default_rng(seed)
    experts = next(layer.experts for layer in model.layers if layer.kind == "moe")
    plans = []
    while len(plans) < count:
        tp, cp = int(rng.choice([2, 4, 8])), int(rng.choice([1, 1, 2]))
        if n % (tp * cp) or experts % tp:
            continue
        rest = n // (tp * cp)
        pp = int(rng.choice([d for d in range(1, rest + 1) if rest % d == 0 and d <= model.num_blocks]))
        dp = rest // pp
        mbs = int(rng.choice([1, 2]))
        if gbs % (mbs * dp):
            continue
        schedule = str(rng.choice(["gpipe", "1f1b", "zb-h1", "interleaved-1f1b"]))
        vpp = int(rng.choice([1, 2])) if schedule == "interleaved-1f1b" and 2 * pp <= model.num_blocks else 1
        if schedule == "interleaved-1f1b" and (gbs // (mbs * dp)) % pp:
            continue
        ts = rng.random() < 0.6
        eps = [d for d in (1, 2, 4) if (dp * cp) % d == 0 and experts % d == 0]
        ep, etp = (tp, 1) if ts else (int(rng.choice(eps)), [None, 1][int(rng.integers(2))])
        rec = str(rng.choice(["none", "selective", "full"]))
        plans.append(ParallelPlan(
            tp=tp, cp=cp, pp=pp, dp=dp, vpp=vpp, mbs=mbs, schedule=schedule, ep=ep, etp=etp, sp=bool(rng.integers(2)),
            zero=int(rng.integers(4)), recompute=rec, recompute_num_layers=(1 if rec == "full" and rng.random() < .3
                                                                           else None),
            overlap_tp_comm=bool(rng.integers(2)), overlap_grad_reduce=bool(rng.integers(2)),
            flash_attention=bool(rng.random() < .8), moe_dispatch="tp_slice" if ts else "a2a"))
    return plans


@pytest.mark.parametrize("name,nodes,seed", [("mixtral-8x7b", 1, 0), ("mixtral-8x7b", 2, 1), ("test", 2, 2)])
def test_estimate_batch_equals_estimate_with_tp_slice(name, nodes, seed):
    from planner.importers import load_model

    model = (moe_model(hidden=1024, layers=4, heads=16, kv_heads=8, expert_ffn=1024) if name == "test"
             else load_model(name))
    c = load_cluster("dgx-h100", nodes)
    for w in (Workload(global_batch=64, seq_len=1024), Workload(global_batch=64, seq_len=2048, moe_imbalance=1.3)):
        plans = _random_plans(model, c.device_count, 64, 40, seed)
        assert any(p.moe_dispatch == "tp_slice" for p in plans) and any(p.moe_dispatch == "a2a" for p in plans)
        assert_batch_equals_scalar(model, c, w, plans)


@pytest.mark.parametrize("experts,topk,devices,mem_gb", [(4, 2, 8, 80.0), (8, 4, 8, 80.0), (8, 2, 4, 1.0)])
def test_search_equals_brute_force_with_tp_slice(experts, topk, devices, mem_gb):
    """Scalar estimate() over every plan of the space (tp_slice among them) gives the search's top 3, and both
    bounds hold for tp_slice plans (tests/test_search.py's brute force, on MoE models only)."""
    model = moe_model(hidden=256, layers=4, heads=8, kv_heads=4, experts=experts, topk=topk, expert_ffn=512)
    c = catalog.load_cluster("dgx-h100", nodes=1, devices=devices if devices < 8 else None)
    dev = c.devices[0].device.model_copy(update={"memory_gb": mem_gb})
    c = c.model_copy(update={"devices": [d.model_copy(update={"device": dev}) for d in c.devices]})
    w = Workload(global_batch=16, seq_len=2048)
    cons = Constraints(zero=1, recompute=None, max_mbs=2, max_vpp=2, max_pp=2, cp_comm=("ring",))
    pa = enumerate_space(model, c, w, cons).plans
    assert pa.moe_tp_slice.any()
    plans = [pa.plan(i) for i in range(len(pa))]
    ests = [estimate(model, c, w, p) for p in plans]
    mem_lb = memory_lower_bound(model, w, pa)
    t_lb = step_lower_bound(model, c, w, pa)
    for i, e in enumerate(ests):
        assert mem_lb[i] <= e.peak_memory_bytes * (1 + REL), plans[i]
        assert t_lb[i] <= e.step_time_s * (1 + REL), plans[i]
    fitting = sorted(e.step_time_s for e in ests if e.fits)
    assert fitting, "the case should leave some plan that fits"
    res = search(model, c, w, cons, top_k=3, refine_partition=False)
    got = [rp.estimate.step_time_s for rp in res.plans]
    assert len(got) == min(3, len(fitting))
    for g, want in zip(got, fitting):
        assert math.isclose(g, want, rel_tol=REL), (got, fitting[:3])


def test_label_json_and_exporters():
    m = moe_model(hidden=256, heads=8, kv_heads=8)
    c, w = load_cluster("dgx-h100", 1), Workload(global_batch=16, seq_len=1024)
    plan = ParallelPlan(tp=4, dp=2, ep=4, etp=1, sp=True, mbs=1, moe_dispatch="tp_slice")
    rp = RankedPlan(plan, estimate(m, c, w, plan))
    assert "tp-slice" in rp.label()
    assert rp.as_dict(m)["moe_dispatch"] == "tp_slice"
    pf = PlanFile(model="moe-test", cluster="dgx-h100", nodes=1, workload=w, plan=plan)
    ctx = make_context(pf, model=m, devices_per_node=8)
    for fmt in ("megatron", "deepspeed", "torchtitan", "torchtitan-py"):
        with pytest.raises(Unsupported, match="moe_dispatch.*tp_slice"):
            export_text(ctx, fmt)


def test_cli_shows_and_fixes_the_dispatch(run_cli):
    rc, out, err = run_cli("plan", "--model", "models/moe-tiny.yaml", "--cluster", "dgx-h100", "--nodes", "1",
                           "--gbs", "8", "--seq", "256", "--moe-dispatch", "tp_slice", "--top", "1", "--json")
    assert rc == 0, err
    import json

    best = json.loads(out)["plans"][0]
    assert best["moe_dispatch"] == "tp_slice" and best["ep"] == best["tp"] > 1 and best["etp"] == 1
    rc, out, err = run_cli("plan", "--model", "models/moe-tiny.yaml", "--cluster", "dgx-h100", "--nodes", "1",
                           "--gbs", "8", "--seq", "256", "--moe-dispatch", "tp_slice", "--top", "1", "--wide")
    assert rc == 0 and " moe " in out.splitlines()[1] and "tp_slice" in out.splitlines()[2], out
    rc, out, err = run_cli("estimate", "--model", "models/moe-tiny.yaml", "--cluster", "dgx-h100", "--nodes", "1",
                           "--tp", "2", "--mbs", "1", "--gbs", "8", "--seq", "256", "--moe-dispatch", "tp_slice",
                           "--json")
    assert rc == 0, err
    plan = json.loads(out)["plan"]
    assert (plan["moe_dispatch"], plan["ep"], plan["etp"]) == ("tp_slice", 2, 1)


def test_partition_dp_terms_equal_estimate_with_tp_slice():
    """The DP stage partition's per-chunk time and memory are estimate()'s for a tp_slice plan too (its MoE
    activations without SP's split; tests/test_partition.py's consistency check)."""
    from planner.importers import load_model
    from planner.search.partition import block_costs, chunk_inflight, partition_dp, with_partition

    m, c = load_model("moe-tiny"), load_cluster("dgx-h100", 1)
    w = Workload(global_batch=64, seq_len=1024)
    plan = ParallelPlan(tp=2, pp=2, dp=2, ep=2, etp=1, mbs=2, recompute="selective", sp=True, moe_dispatch="tp_slice")
    part = partition_dp(block_costs(m, c, w, plan), plan.pp, chunk_inflight(w, plan))
    est = estimate(m, c, w, with_partition(plan, part.ranges))
    assert [s["fwd_s"] + s["bwd_s"] for s in est.stages] == pytest.approx(part.chunk_time_s, rel=1e-12)
    assert [s["total_bytes"] for s in est.stages] == pytest.approx(part.chunk_memory_bytes, rel=1e-12)
