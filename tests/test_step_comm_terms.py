"""Efficiency.comm_overlap and Efficiency.shard_copy_ns_per_byte: how much data-parallel communication hides
under compute, and a sharded-data-parallel framework's copies around its collectives (both measured by
`calibrate --backend torch` on the CPU stack; 1.0 and 0 for every catalog device)."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.catalog import load_cluster
from planner.core.plan import ParallelPlan, Workload
from planner.cost.batch import estimate_batch
from planner.cost.estimate import estimate
from planner.importers import load_model

GRAPH = load_model("tiny-llama-20m")
WORKLOAD = Workload(global_batch=16, seq_len=256)


def _cluster(**fields):
    return load_cluster("dgx-h100", 1).with_efficiency(**fields)


def test_shard_copy_adds_bytes_times_rate_for_zero3_by_hand():
    # ZeRO-3, dp 8, mbs 1 -> m = 2 micro-batches per replica: 2 gathers each (forward, backward) of the
    # bf16 weights (2 B) and one reduce-scatter of fp32 gradients (4 B) per parameter on the device
    plan = ParallelPlan(dp=8, zero=3, mbs=1)
    base = estimate(GRAPH, _cluster(), WORKLOAD, plan)
    ns = 3.0
    got = estimate(GRAPH, _cluster(shard_copy_ns_per_byte=ns), WORKLOAD, plan)
    m = WORKLOAD.global_batch // (plan.dp * plan.mbs)
    want = GRAPH.trainable_params * (2 * m * 2 + 4) * ns * 1e-9
    assert got.step_time_s - base.step_time_s == pytest.approx(want, rel=1e-9)


def test_shard_copy_spares_zero0_and_zero1_and_one_replica():
    for plan in (ParallelPlan(dp=8, zero=0, mbs=1), ParallelPlan(dp=8, zero=1, mbs=2),
                 ParallelPlan(tp=8, zero=3, mbs=1)):
        a = estimate(GRAPH, _cluster(), WORKLOAD, plan).step_time_s
        b = estimate(GRAPH, _cluster(shard_copy_ns_per_byte=5.0), WORKLOAD, plan).step_time_s
        assert a == b, plan


def test_no_overlap_exposes_every_gather_of_zero3():
    # comm_overlap 0: the ZeRO-3 traffic adds to the step whole; 1 (GPU): it hides under compute but for
    # the exposed tail (estimate.EXPOSED_TAIL_FRACTION of it)
    from planner.cost.layer_terms import EXPOSED_TAIL_FRACTION

    plan = ParallelPlan(dp=8, zero=3, mbs=1)
    hidden = estimate(GRAPH, _cluster(), WORKLOAD, plan)
    exposed = estimate(GRAPH, _cluster(comm_overlap=0.0), WORKLOAD, plan)
    dp_hidden, dp_all = hidden.breakdown["dp_comm_exposed_s"], exposed.breakdown["dp_comm_exposed_s"]
    assert dp_hidden == pytest.approx(EXPOSED_TAIL_FRACTION * dp_all, rel=1e-9)
    assert exposed.step_time_s - hidden.step_time_s == pytest.approx(dp_all - dp_hidden, rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0), zero=st.sampled_from([0, 1, 2, 3]),
       overlap=st.booleans(), mbs=st.sampled_from([1, 2]))
def test_less_overlap_is_never_faster(a, b, zero, overlap, mbs):
    lo, hi = sorted((a, b))
    plan = ParallelPlan(dp=8, zero=zero, mbs=mbs, overlap_grad_reduce=overlap)
    t_lo = estimate(GRAPH, _cluster(comm_overlap=lo), WORKLOAD, plan).step_time_s
    t_hi = estimate(GRAPH, _cluster(comm_overlap=hi), WORKLOAD, plan).step_time_s
    assert t_lo >= t_hi * (1 - 1e-12)


def test_batch_equals_scalar_with_both_terms():
    cluster = _cluster(comm_overlap=0.3, shard_copy_ns_per_byte=2.5, grad_accum_ns_per_param=1.5)
    plans = [ParallelPlan(dp=dp, tp=8 // dp // pp, pp=pp, zero=z, mbs=mbs, overlap_grad_reduce=og,
                          schedule="1f1b")
             for dp in (2, 4, 8) for pp in (1, 2) if 8 // dp // pp >= 1 and dp * pp <= 8
             for z in (0, 1, 2, 3) for mbs in (1, 2) for og in (False, True)]
    got = estimate_batch(GRAPH, cluster, WORKLOAD, plans)
    for i, plan in enumerate(plans):
        want = estimate(GRAPH, cluster, WORKLOAD, plan)
        assert math.isclose(got["step_time_s"][i], want.step_time_s, rel_tol=1e-9), plan


def test_oversubscribed_ranks_fill_the_bubble_at_full_speed(monkeypatch):
    # validate.predict with 4 ranks on 2 cores: every rank gets half a core (shared_core_cluster), except in
    # the pipeline's fill and drain, when half the ranks idle and the others run on whole cores
    from planner.backends.torch import validate as v
    from planner.core.plan import PlanFile

    monkeypatch.setattr(v, "usable_cores", lambda: 2)
    pf = PlanFile(model="tiny-llama-20m", cluster="epyc-2core", nodes=2, workload=Workload(global_batch=8, seq_len=64,
                                                                                       dtype="fp32"),
                  plan=ParallelPlan(pp=2, dp=2, mbs=1, schedule="1f1b"))
    _, workload, got, share = v.predict(pf, 4, "cpu")
    assert share == 0.5
    cluster, _ = v.shared_core_cluster(load_cluster("epyc-2core", 2), 4, "cpu")
    shared = estimate(GRAPH, cluster, workload, pf.plan)
    bubble = shared.breakdown["pipeline_bubble_s"]
    assert bubble > 0
    assert got.step_time_s == pytest.approx(shared.step_time_s - bubble * 0.5, rel=1e-12)
    # every rank has a core: nothing changes
    _, _, alone, one = v.predict(pf.model_copy(update={"nodes": None, "plan": ParallelPlan(pp=2, mbs=1)}), 2, "cpu")
    assert one == 1.0 and alone.breakdown["pipeline_bubble_s"] > 0


def test_unfused_gradient_accumulation_adds_params_times_rate_per_backward():
    # grad_accum_ns_per_param: every micro-batch's backward adds its weight gradients into .grad, so the
    # step grows by (trainable parameters on the device) x rate x micro-batches; dp4 tp2 mbs1 -> m = 4
    from planner.cost.compute import layer_time

    ns = 3.0
    dev = load_cluster("dgx-h100", 1).devices[0].device
    slow = dev.model_copy(update={"efficiency": dev.efficiency.model_copy(update={"grad_accum_ns_per_param": ns})})
    for layer in GRAPH.layers:
        a, b = layer_time(layer, 1, 256, dev, "bf16", tp=2), layer_time(layer, 1, 256, slow, "bf16", tp=2)
        assert float(b.fwd_s) == float(a.fwd_s)
        assert float(b.bwd_s - a.bwd_s) == pytest.approx(layer.params_per_device(tp=2) * ns * 1e-9, rel=1e-9)
    # no host dispatch floor (compute.floored), which a tiny model's backward on an H100 sits under
    plan = ParallelPlan(dp=4, tp=2, mbs=1, sp=True)
    base = estimate(GRAPH, _cluster(host_dispatch_us=0.0), WORKLOAD, plan).step_time_s
    got = estimate(GRAPH, _cluster(host_dispatch_us=0.0, grad_accum_ns_per_param=ns), WORKLOAD, plan).step_time_s
    per_device = sum(layer.params_per_device(tp=2) for layer in GRAPH.layers if layer.trainable)
    assert got - base == pytest.approx(4 * per_device * ns * 1e-9, rel=1e-6)
