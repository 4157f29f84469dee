"""MoE routing (capacity, dropping, imbalance), expert parallel folding, Ulysses context parallel, activation
offload and attention disaggregation: hand-solved cases and invariants (issue 9)."""
from __future__ import annotations

import math
import random

import pytest

from planner.app.api import load_cluster
from planner.core.builders import MoEConfig, TransformerConfig, build_transformer
from planner.core.errors import BadInput
from planner.core.plan import OffloadPolicy, ParallelPlan, Workload
from planner.cost import attention_balance as ab
from planner.cost import longctx, moe
from planner.cost.batch import estimate_batch
from planner.cost.estimate import estimate
from planner.search.search import search
from planner.search.space import Constraints, enumerate_space

REL = 1e-9


def moe_model(shared=0):
    return build_transformer(TransformerConfig(
        name="m", layers=4, hidden=256, heads=8, kv_heads=4, ffn_hidden=512, vocab=1000,
        moe=MoEConfig(experts=8, topk=2, ffn_hidden=256, shared_experts=shared,
                      shared_ffn_hidden=256 if shared else 0)))


def dense_model():
    return build_transformer(TransformerConfig(name="d", layers=4, hidden=256, heads=8, kv_heads=8,
                                               ffn_hidden=512, vocab=1000))


def test_capacity_and_load_hand_cases():
    assert moe.capacity_tokens(4096, 2, 8, 1.25) == 1280  # ceil(4096*2/8*1.25)
    assert moe.expert_load(1.5) == 1.5
    assert moe.expert_load(1.5, 1.0) == 1.0
    assert moe.rank_load_factor(1.5, None, 1) == 1.5
    assert moe.rank_load_factor(1.5, None, 2) == 1.25  # (1.5 + 1) / 2
    assert moe.rank_load_factor(2.0, 1.25, 4) == pytest.approx((1.25 + 3) / 4)
    assert moe.dropped_token_share(2.0, 1.0, 8) == pytest.approx(1 / 8)
    assert moe.dropped_token_share(2.0, None, 8) == 0.0
    with pytest.raises(ValueError):
        moe.expert_load(0.5)


def test_ulysses_bytes_and_offload_hand_cases():
    # b=1, s=8, 4 heads, 4 kv heads, d=2, cp=2: (2*4 + 2*4)*2 = 32 elements per token, 4 tokens, 2 bytes
    assert longctx.ulysses_a2a_bytes(1, 8, 4, 4, 2, 2, 1, 2) == 256
    assert longctx.ulysses_a2a_bytes(1, 8, 4, 4, 2, 2, 2, 2) == 128  # tp halves the heads per rank
    assert longctx.offload_exposed_s(100.0, 10.0, 4.0) == 6.0
    assert longctx.offload_exposed_s(100.0, 10.0, 20.0) == 0.0


@pytest.mark.parametrize("ep", [2, 8])
def test_more_imbalance_never_faster_and_dropless_never_faster_than_capacity(ep):
    m, c = moe_model(), load_cluster("dgx-h100", 1)
    p = ParallelPlan(dp=8, ep=ep, mbs=1)
    steps = [estimate(m, c, Workload(global_batch=16, seq_len=16384, moe_imbalance=g), p).step_time_s
             for g in (1.0, 1.2, 1.5, 2.0)]
    assert all(a <= b * (1 + REL) for a, b in zip(steps, steps[1:])), steps
    assert steps[-1] > steps[0]
    for g in (1.0, 1.3, 2.0):
        dropless = estimate(m, c, Workload(global_batch=16, seq_len=16384, moe_imbalance=g), p).step_time_s
        capped = estimate(m, c, Workload(global_batch=16, seq_len=16384, moe_imbalance=g, moe_capacity_factor=1.0),
                          p).step_time_s
        assert capped <= dropless * (1 + REL)
    # capacity 1.0 with any imbalance costs what balanced routing costs
    assert capped == pytest.approx(steps[0], rel=REL)


def test_folding_drops_the_moe_tp_collective_and_keeps_the_ep_group_in_node():
    m, c = moe_model(), load_cluster("dgx-h100", 2)
    w = Workload(global_batch=16, seq_len=1024)
    plain = estimate(m, c, w, ParallelPlan(tp=4, dp=4, ep=4, sp=True, mbs=1))
    folded = estimate(m, c, w, ParallelPlan(tp=4, dp=4, ep=4, etp=1, sp=True, mbs=1))
    assert folded.breakdown["tp_comm_s"] < plain.breakdown["tp_comm_s"]
    assert folded.breakdown["ep_comm_s"] < plain.breakdown["ep_comm_s"]  # ranks 0..3 (NVLink) vs 0,4,8,12
    # ep = 8 > dp*cp = 4 is only possible folded: ep*etp = 8 | dp*cp*tp = 16
    estimate(m, c, w, ParallelPlan(tp=4, dp=4, ep=8, etp=1, sp=True, mbs=1))
    with pytest.raises(BadInput):
        estimate(m, c, w, ParallelPlan(tp=4, dp=4, ep=8, sp=True, mbs=1))
    space = enumerate_space(m, c, w, Constraints(fold=False)).plans
    a2a = ~space.moe_tp_slice  # tp_slice (Pipeline MoE, experts over the TP group) is a layout of its own
    assert (space.etp[a2a] == 0).all() and ((space.dp * space.cp)[a2a] % space.ep[a2a] == 0).all()
    folded_space = enumerate_space(m, c, w, Constraints()).plans
    assert ((folded_space.dp * folded_space.cp) % folded_space.ep != 0).any()


def test_expert_states_shard_over_expert_data_parallel_ranks():
    m, c = moe_model(), load_cluster("dgx-h100", 1)
    w = Workload(global_batch=16, seq_len=1024)
    # ep 8 over dp 8: each rank owns its experts alone (EDP 1): more optimizer bytes than dp-sharded ones
    ep8 = estimate(m, c, w, ParallelPlan(dp=8, ep=8, zero=1, mbs=1))
    ep1 = estimate(m, c, w, ParallelPlan(dp=8, ep=1, zero=1, mbs=1))
    per_rank = sum(layer.routed_params() for layer in m.layers) / 8
    assert ep8.memory["optimizer_bytes"] > per_rank * 12 * (1 - REL)


def test_ulysses_needs_heads_and_runs_all_to_all():
    m, c = dense_model(), load_cluster("dgx-h100", 1)
    w = Workload(global_batch=2, seq_len=8192)
    ring = estimate(m, c, w, ParallelPlan(cp=8, mbs=1))
    a2a = estimate(m, c, w, ParallelPlan(cp=8, mbs=1, cp_comm="a2a"))
    assert a2a.breakdown["cp_comm_s"] > 0 and ring.breakdown["cp_comm_s"] >= 0
    assert a2a.mfu > 0 and "cp 8 (Ulysses all-to-all)" in a2a.why
    with pytest.raises(BadInput):  # tp*cp = 16 does not divide 8 heads
        estimate(m, load_cluster("dgx-h100", 2), w, ParallelPlan(cp=8, tp=2, mbs=1, cp_comm="a2a"))
    with pytest.raises(ValueError):
        ParallelPlan(cp=1, cp_comm="a2a")


def test_activation_offload_reduces_memory_and_costs_time_only_when_exposed():
    m, c = dense_model(), load_cluster("dgx-h100", 1)
    w = Workload(global_batch=8, seq_len=8192)
    base = estimate(m, c, w, ParallelPlan(dp=8, mbs=1))
    for f in (0.25, 0.5, 1.0):
        off = estimate(m, c, w, ParallelPlan(dp=8, mbs=1, offload=OffloadPolicy(activations=f)))
        assert off.memory["activations_bytes"] < base.memory["activations_bytes"]
        assert off.step_time_s >= base.step_time_s * (1 - REL)
        assert off.breakdown["act_offload_s"] >= 0


def test_batch_equals_scalar_for_moe_folding_ulysses_and_offload():
    m, c = moe_model(shared=1), load_cluster("dgx-h100", 2)
    rng = random.Random(0)
    plans = []
    while len(plans) < 120:
        tp, cp, pp = rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 4]), rng.choice([1, 2])
        if 16 % (tp * cp * pp):
            continue
        try:
            p = ParallelPlan(dp=16 // (tp * cp * pp), tp=tp, cp=cp, pp=pp, ep=rng.choice([1, 2, 4, 8]),
                             etp=rng.choice([None, 1, 2]), sp=tp > 1 and rng.random() < 0.7, zero=rng.choice([0, 1, 3]),
                             mbs=1, cp_comm=rng.choice(["ring", "a2a"]) if cp > 1 else "ring",
                             recompute=rng.choice(["none", "full"]),
                             offload=OffloadPolicy(activations=rng.choice([0.0, 0.0, 0.5])))
            estimate(m, c, Workload(global_batch=32, seq_len=2048), p)
        except (BadInput, ValueError):
            continue
        plans.append(p)
    for w in (Workload(global_batch=32, seq_len=2048, moe_imbalance=1.3),
              Workload(global_batch=32, seq_len=2048, moe_imbalance=1.3, moe_capacity_factor=1.1)):
        got = estimate_batch(m, c, w, plans)
        for i, p in enumerate(plans):
            want = estimate(m, c, w, p)
            for k in ("step_time_s", "peak_memory_bytes", "mfu", "hfu"):
                assert math.isclose(got[k][i], getattr(want, k), rel_tol=REL), (k, p, got[k][i], getattr(want, k))
            assert got["fits"][i] == want.fits


def test_search_chooses_context_parallel_for_long_sequences_and_says_why():
    m, c = dense_model(), load_cluster("dgx-h100", 1)
    r = search(m, c, Workload(global_batch=1, seq_len=262144), Constraints(), top_k=1)
    assert r.plans[0].plan.cp > 1 and f"cp {r.plans[0].plan.cp}" in r.plans[0].estimate.why


def test_default_cp_cap_grows_past_512k_tokens_and_max_cp_overrides_it():
    from planner.search.space import default_max_cp

    assert [default_max_cp(s) for s in (4096, 524288, 1048576, 4194304)] == [16, 16, 32, 128]
    m, c = dense_model(), load_cluster("dgx-a100-80gb", 8)
    w = Workload(global_batch=1, seq_len=2**21)
    cps = set(enumerate_space(m, c, w, Constraints()).plans.cp.tolist())
    assert max(cps) == 64 and 32 in cps
    assert max(enumerate_space(m, c, w, Constraints(max_cp=16)).plans.cp.tolist()) == 16
    assert max(enumerate_space(m, c, w.model_copy(update={"seq_len": 8192}), Constraints()).plans.cp.tolist()) <= 16


def test_attention_disaggregation_hand_case_and_gap():
    assert ab.attention_work([4, 2]) == 10.0  # (16 + 4) / 2
    assert ab.shards([4], 2) == [2.0, 6.0]  # rows 0-1 attend to 2 pairs... (4 - 0)/2, (16 - 4)/2
    assert sorted(ab.lpt([5.0, 4.0, 3.0, 3.0], 2).tolist()) == [7.0, 8.0]
    docs = ab.sample_documents(65536, 8, 4096, 65536, seed=1)
    assert all(sum(d) == 65536 for d in docs)
    r = ab.straggler_gap(dense_model(), load_cluster("dgx-h100", 1).devices[0].device, docs, 50e9, shard_tokens=1024)
    assert r["gap_with_s"] <= r["gap_without_s"]
    assert r["step_with_s"] <= r["step_without_s"] * (1 + REL) or r["pool_comm_s"] > r["linear_s"]
