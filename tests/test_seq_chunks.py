"""Sequence-chunked pipelines (ParallelPlan.seq_chunks; TeraPipe, Li et al. 2021; Seq1F1B, Sun et al. 2024; SPPO,
Chen et al. 2025): causal attention FLOPs per chunk, the m*n-item pipeline and its bubble, the K/V kept for later
chunks, estimate == estimate_batch, and a long-sequence pipeline plan that only fits (and runs faster) chunked."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from planner.app.api import load_cluster, load_model
from planner.core.builders import TransformerConfig, build_transformer
from planner.core.errors import BadInput
from planner.core.model import Layer
from planner.core.plan import OffloadPolicy, ParallelPlan, Workload
from planner.cost import longctx, pipeline
from planner.cost.batch import estimate_batch
from planner.cost.compute import chunk_attention_factor, layer_time
from planner.cost.estimate import estimate
from planner.search.search import NoPlanFits, search
from planner.search.space import Constraints, enumerate_space, memory_lower_bound

REL = 1e-9


def dense_model(layers=4):
    return build_transformer(TransformerConfig(name="d", layers=layers, hidden=256, heads=8, kv_heads=4,
                                               ffn_hidden=512, vocab=1000))


def test_chunk_attention_flops_split_sums_to_unchunked_causal():
    # 2 heads of width 4, one sequence of 8 tokens in 4 chunks of 2: chunk i's queries meet 2i earlier keys
    # fully and their own 2x2 causal half, 4 (i + 1/2) token pairs, at 4 a d = 32 FLOPs per pair (QK^T and AV)
    att = Layer(name="a", kind="attention", hidden=8, heads=2, kv_heads=2, head_dim=4)
    per_chunk = [32 * 4 * (i + 0.5) for i in range(4)]
    assert per_chunk == [64.0, 192.0, 320.0, 448.0]
    assert sum(per_chunk) == att.attention_core_flops(1, 8) == 1024.0
    # the mean chunk is n times an isolated chunk's causal attention (compute.chunk_attention_factor)
    assert chunk_attention_factor(att, 4) * att.attention_core_flops(1, 2) == sum(per_chunk) / 4
    # layer_time of the mean chunk, times n, has the unchunked layer's FLOPs (GEMMs are linear in tokens)
    dev = load_cluster("dgx-h100", 1).devices[0].device
    for layer in dense_model().layers:
        whole = layer_time(layer, 2, 4096, dev).fwd_flops
        chunked = layer_time(layer, 2, 1024, dev, seq_chunks=4).fwd_flops
        assert 4 * chunked == pytest.approx(whole, rel=1e-12), layer.kind
    # a layer whose tokens do not follow the sequence, or that is not causal, is not scaled
    assert chunk_attention_factor(att.model_copy(update={"causal": False}), 4) == 1
    assert chunk_attention_factor(att.model_copy(update={"fixed_tokens": 77}), 4) == 1


def test_model_flops_of_a_step_do_not_depend_on_the_chunks():
    m, c = load_model("llama3-8b"), load_cluster("dgx-h100", 2)
    w = Workload(global_batch=4, seq_len=65536)
    flops = []
    for n in (1, 2, 4, 8):
        e = estimate(m, c, w, ParallelPlan(tp=4, pp=4, mbs=1, sp=True, recompute="full", seq_chunks=n))
        flops.append(e.mfu * e.step_time_s)
    assert all(f == pytest.approx(flops[0], rel=1e-9) for f in flops)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("p,m,n", [(4, 1, 4), (4, 2, 4), (8, 1, 8), (4, 4, 2), (8, 2, 16), (2, 3, 8)])
def test_bubble_is_that_of_m_times_n_items(schedule, p, m, n):
    # equal chunk times: (p-1)(f+b) of idle on a step of (m n + p - 1)(f+b) (Narayanan's 1F1B bubble with
    # m n micro-batches)
    res = pipeline.simulate(schedule, [1.0] * p, [2.0] * p, m, seq_chunks=n)
    assert res.step_time_s == pytest.approx(3.0 * (m * n + p - 1))
    assert res.bubble_fraction == pytest.approx((p - 1) / (m * n + p - 1))
    assert pipeline.bubble_fraction_closed(schedule, p, m, seq_chunks=n) == pytest.approx(res.bubble_fraction)
    # the same work unchunked (one item n times longer) idles (p-1)/(m+p-1) of the step
    assert res.bubble_fraction < pipeline.simulate(schedule, [n] * p, [2.0 * n] * p, m).bubble_fraction
    fast = pipeline.simulate_times(schedule, [1.0] * p, [2.0] * p, m, seq_chunks=n)
    assert (fast.step_time_s, fast.peak_inflight) == (res.step_time_s, res.peak_inflight)


@pytest.mark.parametrize("p,m,n", [(4, 2, 4), (4, 4, 2), (8, 1, 3), (3, 5, 2)])
def test_backward_runs_last_chunk_first_and_holds_the_micro_batch(p, m, n):
    res = pipeline.simulate("1f1b", [1.0] * p, [2.0] * p, m, seq_chunks=n)
    for d in range(p):
        b_items = [e.microbatch for e in sorted(res.events, key=lambda e: e.start_s) if e.device == d and e.kind == "B"]
        # micro-batch by micro-batch, chunks n-1 .. 0 (chunk c's dK/dV collect from later chunks)
        assert b_items == [q * n + c for q in range(m) for c in reversed(range(n))]
        # Seq1F1B's warm-up: a stage holds the whole micro-batch it waits on, plus p - d - 1 chunks
        assert res.peak_inflight[d] == min(p - d + n - 1, m * n)
        assert pipeline.inflight_microbatches("1f1b", p, m, d, seq_chunks=n) == res.peak_inflight[d]
    # n = 1 is PipeDream-Flush unchanged
    for i, ops in enumerate(pipeline.schedule_order("1f1b", p, m, 1, 1)):
        w = min(p - i - 1, m)
        assert [k for k, _, _ in ops] == ["F"] * w + ["F", "B"] * (m - w) + ["B"] * w
    with pytest.raises(ValueError):
        pipeline.simulate("zb-h1", [1.0] * p, [2.0] * p, m, seq_chunks=2)


def test_memory_keeps_the_kv_of_earlier_chunks():
    m, c = dense_model(), load_cluster("dgx-h100", 1)
    b, s, n, tp, pp = 1, 16384, 4, 2, 4
    w = Workload(global_batch=4, seq_len=s)
    # full recompute saves only block inputs: the K/V of every chunk in flight stays, plus the dK/dV of the
    # n - 1 earlier chunks; one attention layer per stage (4 blocks over 4 stages)
    full = estimate(m, c, w, ParallelPlan(tp=tp, pp=pp, mbs=b, recompute="full", seq_chunks=n))
    kv_chunk = b * (s // n) * 2 * 4 * 32 / tp * 2  # tokens x (K, V) x kv heads x head dim / tp x bf16
    assert longctx.chunk_kv_bytes(m.layers[1], b, s // n, tp, 1, 2) == kv_chunk
    for st in full.stages:
        inflight = min(pp - st["stage"] + n - 1, 4 * n)
        assert st["seq_chunk_kv_bytes"] == pytest.approx(kv_chunk * (inflight + n - 1), rel=1e-12)
    # without recompute the chunks' saved activations hold their own K/V: only the dK/dV buffers are extra
    none = estimate(m, c, w, ParallelPlan(tp=tp, pp=pp, mbs=b, recompute="none", seq_chunks=n))
    assert all(st["seq_chunk_kv_bytes"] == pytest.approx(kv_chunk * (n - 1), rel=1e-12) for st in none.stages)
    # activations per chunk in flight: stage 0 holds n + pp - 1 chunks of s/n tokens, not pp sequences
    one = estimate(m, c, w, ParallelPlan(tp=tp, pp=pp, mbs=b, recompute="none"))
    assert none.stages[0]["activations_bytes"] == pytest.approx(
        one.stages[0]["activations_bytes"] / pp * (n + pp - 1) / n, rel=1e-12)
    assert one.memory["seq_chunk_kv_bytes"] == 0.0


def test_seq_chunks_1_changes_nothing():
    m, c = load_model("llama3-8b"), load_cluster("dgx-h100", 1)
    w = Workload(global_batch=8, seq_len=8192)
    p = ParallelPlan(tp=2, pp=4, mbs=1, sp=True, recompute="selective")
    a, b = estimate(m, c, w, p), estimate(m, c, w, p.model_copy(update={"seq_chunks": 1}))
    assert a.model_dump() == b.model_dump()


def test_rules():
    m, c = dense_model(), load_cluster("dgx-h100", 1)
    w = Workload(global_batch=4, seq_len=8192)
    with pytest.raises(ValueError):
        ParallelPlan(pp=2, vpp=2, schedule="interleaved-1f1b", seq_chunks=2)
    with pytest.raises(ValueError):
        ParallelPlan(pp=2, flash_attention=False, seq_chunks=2)
    with pytest.raises(BadInput):  # 8192 / 3
        estimate(m, c, w, ParallelPlan(tp=2, pp=4, seq_chunks=3, mbs=1))
    with pytest.raises(BadInput):  # 192 tokens: 8 chunks of 24, which do not split into 2*cp = 16 parts
        estimate(m, c, Workload(global_batch=4, seq_len=8 * 8 * 3), ParallelPlan(cp=8, seq_chunks=8, mbs=1))
    bidir = m.model_copy(update={"layers": [x.model_copy(update={"causal": False}) for x in m.layers]})
    with pytest.raises(BadInput):
        estimate(bidir, c, w, ParallelPlan(tp=2, pp=4, seq_chunks=2, mbs=1))
    space = enumerate_space(m, c, w, Constraints(seq_chunks=(1, 2, 4))).plans
    chunked = space.seq_chunks > 1
    assert chunked.any() and (space.pp[chunked] > 1).all()
    assert np.isin(space.schedule[chunked], [0, 1]).all()  # gpipe, 1f1b
    assert (enumerate_space(m, c, w, Constraints()).plans.seq_chunks == 1).all()  # the default: unchunked


def _random_plans(model, n_dev, gbs, count, seed):
    rng = random.Random(seed)
    plans = []
    w = Workload(global_batch=gbs, seq_len=32768)
    c = load_cluster("dgx-h100", n_dev // 8)
    while len(plans) < count:
        tp, cp, pp = rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 4]), rng.choice([1, 2, 4])
        if n_dev % (tp * cp * pp) or gbs % (n_dev // (tp * cp * pp)):
            continue
        try:
            p = ParallelPlan(dp=n_dev // (tp * cp * pp), tp=tp, cp=cp, pp=pp, sp=tp > 1 and rng.random() < 0.5,
                             zero=rng.choice([0, 1, 3]), mbs=1,
                             cp_comm=rng.choice(["ring", "a2a"]) if cp > 1 else "ring",
                             recompute=rng.choice(["none", "selective", "full"]),
                             schedule=rng.choice(["1f1b", "gpipe"]), seq_chunks=rng.choice([1, 2, 4, 8]),
                             offload=OffloadPolicy(activations=rng.choice([0.0, 0.0, 0.0, 0.5])))
            estimate(model, c, w, p)
        except (BadInput, ValueError):
            continue
        plans.append(p)
    return plans, c, w


def test_estimate_batch_equals_estimate_with_seq_chunks():
    m = load_model("llama3-8b")
    plans, c, w = _random_plans(m, 16, 8, 80, seed=1)
    assert sum(p.seq_chunks > 1 for p in plans) > 40
    got = estimate_batch(m, c, w, plans)
    for i, p in enumerate(plans):
        want = estimate(m, c, w, p)
        for k in ("step_time_s", "peak_memory_bytes", "mfu", "hfu", "tokens_per_s"):
            assert math.isclose(got[k][i], getattr(want, k), rel_tol=REL), (k, p, got[k][i], getattr(want, k))
        for k in ("pp_comm_s", "dp_comm_exposed_s"):
            assert math.isclose(got[k][i], want.breakdown[k], rel_tol=REL, abs_tol=1e-15), (k, p)
        assert got["fits"][i] == want.fits


def test_chunking_makes_a_long_sequence_pipeline_fit_and_run_faster():
    # Llama 3 8B, 128k tokens on 8 H100, tp2 pp4, full recompute, 4 sequences: unchunked, the first stage holds
    # 4 sequences in flight and the loss's logits copy of a whole sequence (98 GB); in 4 chunks it fits
    m, c = load_model("llama3-8b"), load_cluster("dgx-h100", 1)
    w = Workload(global_batch=4, seq_len=131072)
    plan = ParallelPlan(tp=2, pp=4, mbs=1, sp=True, recompute="full")
    whole = estimate(m, c, w, plan)
    chunked = estimate(m, c, w, plan.model_copy(update={"seq_chunks": 4}))
    assert not whole.fits and chunked.fits
    assert chunked.step_time_s < whole.step_time_s
    assert chunked.breakdown["pipeline_bubble_s"] < whole.breakdown["pipeline_bubble_s"] / 2
    assert "seq_chunks 4" in chunked.why
    # the search finds no pp4 plan unchunked, and a chunked one when it may chunk
    with pytest.raises(NoPlanFits):
        search(m, c, w, Constraints(pp=4, cp_comm=("ring",)), top_k=1)
    best = search(m, c, w, Constraints(pp=4, cp_comm=("ring",), seq_chunks=(1, 2, 4, 8)), top_k=1).plans[0]
    assert best.plan.seq_chunks > 1 and best.estimate.fits and "seq-chunks" in best.label()


def test_memory_lower_bound_holds_for_chunked_plans():
    m, c = load_model("llama3-8b"), load_cluster("dgx-h100", 1)
    w = Workload(global_batch=4, seq_len=65536)
    pa = enumerate_space(m, c, w, Constraints(pp=4, seq_chunks=(1, 2, 4, 8, 16))).plans
    lb = memory_lower_bound(m, w, pa)
    idx = np.flatnonzero(pa.seq_chunks > 1)[::7]
    got = estimate_batch(m, c, w, pa.take(idx))
    assert (lb[idx] <= got["peak_memory_bytes"] * (1 + 1e-9)).all()
