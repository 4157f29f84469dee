"""estimate_batch (planner/cost/batch.py) equals the scalar estimate (planner/cost/estimate.py).

DESIGN.md: "A vectorized form of the same formulas may evaluate many plans at once, but a test holds it equal
to the scalar form." Hypothesis draws batches of random valid plans for one (model, cluster, workload) -- the
presets and degrees of tests/test_estimate.py, every schedule, ZeRO stage and recompute policy including
partial recompute, sp, cp, ep, fp8, flash attention, overlapped gradient reduction, activation offload, and
now and then a plan that takes the scalar fallback (explicit partition, optimizer offload) -- and checks every
output against estimate() within rel 1e-9, `fits` exactly.
"""
from __future__ import annotations

import os
from functools import lru_cache

import batch_checks
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.catalog import load_cluster
from planner.core.errors import BadInput
from planner.core.plan import OffloadPolicy, ParallelPlan, StageAssignment, Workload
from planner.cost.batch import OUTPUTS, PlanArrays, estimate_batch
from planner.importers import load_model

MODELS = ("tiny-llama-20m", "llama3-8b", "mixtral-8x7b")
NODE_COUNTS = (1, 2)
EXAMPLES = int(os.environ.get("BATCH_EXAMPLES", "50"))
PROPS = settings(max_examples=EXAMPLES, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
REL = 1e-9


@lru_cache(maxsize=None)
def model(name: str):
    return load_model(name)


@lru_cache(maxsize=None)
def cluster(nodes: int):
    return load_cluster("dgx-h100", nodes=nodes)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def plan_for(draw, name: str, n: int, gbs: int):
    """A valid plan for model `name` on n devices with global batch gbs (tests/test_estimate.py's
    generator, plus partial recompute, explicit micro-batch counts, etp, offload and partitions)."""
    g = model(name)
    blocks = g.num_blocks
    tp = draw(st.sampled_from([d for d in divisors(8) if d <= n]))
    cp = draw(st.sampled_from([d for d in (1, 2) if (n // tp) % d == 0]))
    rest = n // (tp * cp)
    # uneven stages (pp not dividing the blocks) are allowed: split_chunks spreads them
    pp = draw(st.sampled_from([d for d in divisors(rest) if d <= blocks]))
    dp = rest // pp
    ep, etp, dispatch = 1, None, "a2a"
    if any(layer.kind == "moe" for layer in g.layers):
        experts = next(layer.experts for layer in g.layers if layer.kind == "moe")
        ep = draw(st.sampled_from([d for d in divisors(dp * cp) if experts % d == 0]))
        etp = draw(st.sampled_from([None, None, 1]))
        if tp > 1 and experts % tp == 0 and draw(st.integers(0, 3)) == 0:
            ep, etp, dispatch = tp, 1, "tp_slice"  # Pipeline MoE: E/tp whole experts on each TP rank
    schedule = draw(st.sampled_from(["gpipe", "1f1b", "zb-h1", "interleaved-1f1b"]))
    mbs = draw(st.sampled_from([d for d in (1, 2, 4) if gbs % (d * dp) == 0]))
    vpp, num_mb = 1, None
    if schedule == "interleaved-1f1b":
        vpp = draw(st.sampled_from([v for v in (1, 2, 3) if pp * v <= blocks]))
        num_mb = pp * draw(st.integers(1, 4))  # interleaving needs m % pp == 0
    elif draw(st.booleans()):
        num_mb = draw(st.integers(1, 12))
    recompute = draw(st.sampled_from(["none", "selective", "full"]))
    rnl = draw(st.sampled_from([None, None, 0, 1, 2, 5])) if recompute == "full" else None
    offload = OffloadPolicy()
    partition = None
    kind = draw(st.sampled_from(["vector"] * 8 + ["act-offload", "opt-offload", "partition"]))
    if kind == "act-offload":
        offload = OffloadPolicy(activations=draw(st.sampled_from([0.25, 1.0])))
    elif kind == "opt-offload":
        offload = OffloadPolicy(optimizer=0.5)
    elif kind == "partition":
        chunks = pp * vpp
        cuts = sorted(draw(st.lists(st.integers(1, blocks - 1), min_size=chunks - 1, max_size=chunks - 1,
                                    unique=True))) if chunks > 1 else []
        edges = [0, *cuts, blocks]
        partition = [StageAssignment(layers=(edges[i], edges[i + 1])) for i in range(chunks)]
    return ParallelPlan(
        dp=dp, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, vpp=vpp, mbs=mbs, schedule=schedule, num_microbatches=num_mb,
        sp=draw(st.booleans()) if tp > 1 else False, zero=draw(st.sampled_from([0, 1, 2, 3])),
        recompute=recompute, recompute_num_layers=rnl,
        flash_attention=draw(st.sampled_from([True, True, False])),
        overlap_grad_reduce=draw(st.booleans()), overlap_tp_comm=draw(st.booleans()), offload=offload,
        partition=partition, moe_dispatch=dispatch)


@st.composite
def batches(draw):
    name = draw(st.sampled_from(MODELS))
    nodes = draw(st.sampled_from(NODE_COUNTS))
    n = cluster(nodes).device_count
    gbs = draw(st.sampled_from([64, 128]))
    workload = Workload(global_batch=gbs, seq_len=draw(st.sampled_from([256, 1024, 4096])),
                        dtype=draw(st.sampled_from(["bf16", "bf16", "fp8"])),
                        grad_dtype=draw(st.sampled_from(["fp32", "fp32", "bf16"])))
    plans = draw(st.lists(plan_for(name, n, gbs), min_size=1, max_size=8))
    return name, nodes, workload, plans


def assert_equal_to_scalar(name, nodes, workload, plans, got):
    batch_checks.assert_equal_to_scalar(model(name), cluster(nodes), workload, plans, got)


@PROPS
@given(case=batches())
def test_batch_equals_scalar(case):
    name, nodes, workload, plans = case
    got = estimate_batch(model(name), cluster(nodes), workload, plans)
    assert set(OUTPUTS) <= set(got)
    assert all(len(v) == len(plans) for v in got.values())
    assert got["fits"].dtype == bool
    assert_equal_to_scalar(name, nodes, workload, plans, got)


@settings(max_examples=max(EXAMPLES // 5, 1), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=batches())
def test_plan_arrays_equal_plan_list(case):
    name, nodes, workload, plans = case
    plans = [p for p in plans if p.partition is None]
    if not plans:
        return
    a = estimate_batch(model(name), cluster(nodes), workload, plans)
    b = estimate_batch(model(name), cluster(nodes), workload, PlanArrays.from_plans(plans))
    for k in OUTPUTS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_large_batch_of_every_schedule_equals_scalar():
    """Many plans in one call (shared layer tuples, count groups and pipeline groups), checked one by one."""
    rng = np.random.default_rng(0)
    name, nodes = "llama3-8b", 2
    workload = Workload(global_batch=128, seq_len=1024)
    plans = []
    while len(plans) < 120:
        tp = int(rng.choice([1, 2, 4, 8]))
        cp = int(rng.choice([1, 2]))
        pp = int(rng.choice([d for d in divisors(16 // (tp * cp))] if 16 % (tp * cp) == 0 else [1]))
        if 16 % (tp * cp * pp):
            continue
        dp = 16 // (tp * cp * pp)
        schedule = str(rng.choice(["gpipe", "1f1b", "zb-h1", "interleaved-1f1b"]))
        vpp = int(rng.choice([1, 2])) if schedule == "interleaved-1f1b" else 1
        mbs = int(rng.choice([1, 2]))
        m = 128 // (mbs * dp)
        if schedule == "interleaved-1f1b" and m % pp:
            continue
        plans.append(ParallelPlan(tp=tp, cp=cp, pp=pp, dp=dp, vpp=vpp, mbs=mbs, schedule=schedule,
                                  sp=tp > 1 and bool(rng.integers(2)), zero=int(rng.integers(4)),
                                  recompute=str(rng.choice(["none", "selective", "full"]))))
    got = estimate_batch(model(name), cluster(nodes), workload, plans)
    assert_equal_to_scalar(name, nodes, workload, plans, got)


def test_bad_degrees_are_refused():
    c = cluster(1)
    w = Workload(global_batch=16, seq_len=256)
    good = ParallelPlan(dp=8)
    with pytest.raises(BadInput, match="devices"):
        estimate_batch(model("tiny-llama-20m"), c, w, [good, ParallelPlan(dp=4)])
    with pytest.raises(BadInput, match="divisible"):
        estimate_batch(model("tiny-llama-20m"), c, Workload(global_batch=12, seq_len=256), [good])


def test_empty_batch():
    got = estimate_batch(model("tiny-llama-20m"), cluster(1), Workload(global_batch=8, seq_len=256), [])
    assert all(len(v) == 0 for v in got.values())
