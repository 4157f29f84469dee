"""Core attention disaggregation as a plan option (ParallelPlan.attention_pool, DistCA arXiv 2510.18121) over
workloads of variable-length documents (Workload.documents): the straggler replica without the pool, the
balanced share and the pool's traffic with it, estimate == estimate_batch (scalar fallback), and the search."""
from __future__ import annotations

import math

import pytest

from planner.app.api import load_cluster, load_model
from planner.core.builders import TransformerConfig, build_transformer
from planner.core.errors import BadInput
from planner.core.plan import DocumentMix, ParallelPlan, Workload
from planner.cost import attention_balance as ab
from planner.cost.batch import estimate_batch
from planner.cost.compute import ATTENTION_BWD_FACTOR, attention_core_time_s
from planner.cost.estimate import estimate
from planner.search.search import search
from planner.search.space import Constraints, enumerate_space

REL = 1e-9


def dense_model():
    return build_transformer(TransformerConfig(name="d", layers=4, hidden=256, heads=8, kv_heads=4,
                                               ffn_hidden=512, vocab=1000))


def test_attention_factors_against_the_sampled_documents():
    s, gbs, dp = 65536, 16, 4
    f = ab.attention_factors(s, gbs, dp, 4096, None, 3)
    docs = ab.sample_documents(s, gbs, 4096, s, 3)
    per_seq = [ab.attention_work(d) / (s * s / 2) for d in docs]
    assert f.mean == pytest.approx(sum(per_seq) / gbs, rel=1e-12)
    per_replica = [sum(per_seq[r * 4:(r + 1) * 4]) / 4 for r in range(dp)]
    assert f.straggler == pytest.approx(max(per_replica), rel=1e-12)
    assert f.mean <= f.pooled <= f.straggler  # LPT over query chunks: at least the mean, at most the worst
    assert f.pooled < f.straggler  # 4096-token chunks of 16 sequences spread well over 4 replicas
    assert ab.attention_factors(s, gbs, 1, 4096, None, 3).straggler == pytest.approx(f.mean, rel=1e-12)
    # documents as long as the sequence: one causal document each, the unpacked case
    one = ab.attention_factors(s, gbs, dp, 10**9, None, 3)
    assert (one.mean, one.straggler) == (1.0, 1.0)


def test_estimate_charges_the_straggler_without_the_pool_and_the_traffic_with_it():
    m, c = dense_model(), load_cluster("dgx-h100", 1)
    s, gbs = 16384, 16
    docs = DocumentMix(mean_tokens=1024, seed=1)
    plain_w, docs_w = Workload(global_batch=gbs, seq_len=s), Workload(global_batch=gbs, seq_len=s, documents=docs)
    p = ParallelPlan(dp=8, mbs=1)
    f = ab.attention_factors(s, gbs, 8, 1024, None, 1)
    plain, strag = estimate(m, c, plain_w, p), estimate(m, c, docs_w, p)
    # compute_s: m micro-batches x every attention core, forward and backward, at the straggler's share
    dev = c.devices[0].device
    core = sum(float(attention_core_time_s(layer, 1, s, dev)) for layer in m.layers if layer.kind == "attention")
    m_micro = gbs // 8
    want = (f.straggler - 1) * core * (1 + ATTENTION_BWD_FACTOR) * m_micro
    assert strag.breakdown["compute_s"] - plain.breakdown["compute_s"] == pytest.approx(want, rel=1e-9)
    # model FLOPs count the mean work: attention_core_flops x (mean - 1) less, fwd + bwd (3x)
    flops = sum(float(layer.attention_core_flops(1, s)) for layer in m.layers if layer.kind == "attention")
    got = strag.mfu * strag.step_time_s - plain.mfu * plain.step_time_s
    peak = dev.peak_flops("bf16") * 8
    assert got * peak == pytest.approx(3 * (f.mean - 1) * flops * m_micro * 8, rel=1e-9)
    # the pool: the balanced share of the attention, and its Q/K/V/O all-to-all
    pooled = estimate(m, c, docs_w, p.model_copy(update={"attention_pool": True}))
    assert pooled.breakdown["compute_s"] - plain.breakdown["compute_s"] == pytest.approx(
        (f.pooled - 1) * core * (1 + ATTENTION_BWD_FACTOR) * m_micro, rel=1e-9)
    assert pooled.breakdown["attn_pool_s"] >= 0
    assert "pooled (DistCA)" in pooled.why and "slowest of 8 replicas" in strag.why
    # without documents the pool only adds traffic
    assert estimate(m, c, plain_w, p.model_copy(update={"attention_pool": True})).step_time_s >= plain.step_time_s


def test_pool_traffic_hand_case():
    # 8 heads and 4 kv heads of 32: (2*8 + 2*4) * 32 = 768 elements per token to the pool and back
    att = next(layer for layer in dense_model().layers if layer.kind == "attention")
    assert ab.pool_width(att) == 768


def test_batch_equals_scalar_and_search_picks_the_pool():
    m, c = load_model("llama3-8b"), load_cluster("dgx-h100", 8)
    w = Workload(global_batch=64, seq_len=131072, documents=DocumentMix(mean_tokens=16384))
    plans = [ParallelPlan(dp=8, cp=8, mbs=2, zero=2, recompute="full", attention_pool=pool) for pool in (False, True)]
    plans.append(ParallelPlan(tp=2, pp=2, dp=2, cp=8, mbs=1, zero=1, sp=True, recompute="full"))
    got = estimate_batch(m, c, w, plans)
    for i, p in enumerate(plans):
        want = estimate(m, c, w, p)
        assert math.isclose(got["step_time_s"][i], want.step_time_s, rel_tol=REL)
        assert math.isclose(got["peak_memory_bytes"][i], want.peak_memory_bytes, rel_tol=REL)
        assert got["pipeline_s"][i] <= want.step_time_s
    without = search(m, c, w, Constraints(dp=8, cp_comm=("ring",)), top_k=1).plans[0]
    with_pool = search(m, c, w, Constraints(dp=8, cp_comm=("ring",), attention_pool=(False, True)), top_k=1).plans[0]
    assert not without.plan.attention_pool and with_pool.plan.attention_pool and "attn-pool" in with_pool.label()
    assert with_pool.estimate.step_time_s < without.estimate.step_time_s


def test_rules():
    m, c = dense_model(), load_cluster("dgx-h100", 1)
    plain = Workload(global_batch=8, seq_len=8192)
    docs = Workload(global_batch=8, seq_len=8192, documents=DocumentMix(mean_tokens=512))
    both = Constraints(attention_pool=(False, True), seq_chunks=(1, 2))
    assert not enumerate_space(m, c, plain, both).plans.attention_pool.any()  # no documents: no pool
    space = enumerate_space(m, c, docs, both).plans
    assert space.attention_pool.any() and (space.seq_chunks == 1).all()
    with pytest.raises(BadInput):
        estimate(m, c, docs, ParallelPlan(tp=2, pp=4, mbs=1, seq_chunks=2))
