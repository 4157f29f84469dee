"""Heterogeneous device groups (planner/cost/stages.py, planner/planners/hetero.py).

estimate() times each stage on its own devices; the heterogeneous stage partition is held to brute force;
the planner on the mixed A100 + H100 preset must beat both the H100s alone and the naive even split.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.catalog import load_cluster
from planner.core.errors import BadInput
from planner.core.plan import ParallelPlan, StageAssignment, Workload
from planner.cost.batch import estimate_batch
from planner.cost.estimate import estimate
from planner.importers import load_model
from planner.planners.hetero import device_groups, hetero_partition, plan_hetero, subcluster
from planner.search.partition import BlockCosts


@pytest.fixture(scope="module")
def mixed():
    return load_cluster("mixed-a100-h100")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama-20m")


def test_groups_fastest_first(mixed):
    groups = device_groups(mixed)
    assert [g.device_type for g in groups] == ["h100-sxm-80gb", "a100-sxm-80gb"]
    assert [g.size for g in groups] == [16, 16]
    sub = subcluster(mixed, groups[0].devices)
    assert sub.device_count == 16 and sub.device_types == ["h100-sxm-80gb"]
    assert [d.index for d in sub.devices] == list(range(16))


def test_stage_on_its_own_device(mixed):
    tiny = load_model("llama3-8b")  # big enough to be compute-bound (the 20M model is dispatch-bound)
    w = Workload(global_batch=32, seq_len=2048)
    blocks = tiny.num_blocks
    half = blocks // 2
    plan = ParallelPlan(dp=16, pp=2, mbs=1, partition=[
        StageAssignment(layers=(0, half), device_type="a100-sxm-80gb"),
        StageAssignment(layers=(half, blocks), device_type="h100-sxm-80gb")])
    swapped = plan.model_copy(update={"partition": [
        StageAssignment(layers=(0, half), device_type="h100-sxm-80gb"),
        StageAssignment(layers=(half, blocks), device_type="a100-sxm-80gb")]})
    a = estimate(tiny, mixed, w, plan)
    b = estimate(tiny, mixed, w, swapped)
    # the same blocks run faster on the H100 stage
    assert b.stages[0]["fwd_s"] < a.stages[0]["fwd_s"]
    assert a.stages[1]["fwd_s"] < b.stages[1]["fwd_s"]


def test_even_split_paced_by_slowest(mixed):
    """dp over both types: every rank waits for the A100s, so the step equals the all-A100 step (same
    fabric, same links inside the A100 nodes)."""
    model = load_model("llama3-8b")
    w = Workload(global_batch=64, seq_len=2048)
    plan = ParallelPlan(dp=32, zero=1, mbs=1, recompute="full")
    est = estimate(model, mixed, w, plan)
    fast = estimate(model, subcluster(mixed, device_groups(mixed)[0].devices), w, plan.model_copy(update={"dp": 16}))
    slow = estimate(model, subcluster(mixed, device_groups(mixed)[1].devices), w, plan.model_copy(update={"dp": 16}))
    assert est.breakdown["compute_s"] == pytest.approx(slow.breakdown["compute_s"] / 2, rel=1e-9)
    assert est.breakdown["compute_s"] > fast.breakdown["compute_s"] / 2


def test_placement_errors(mixed, tiny):
    w = Workload(global_batch=32, seq_len=512)
    blocks = tiny.num_blocks
    bad = ParallelPlan(dp=16, pp=2, partition=[StageAssignment(layers=(0, 2), device_type="b200"),
                                               StageAssignment(layers=(2, blocks))])
    with pytest.raises(BadInput, match="needs 16 free b200"):
        estimate(tiny, mixed, w, bad)
    reuse = ParallelPlan(dp=16, pp=2, partition=[StageAssignment(layers=(0, 2), devices=list(range(16))),
                                                 StageAssignment(layers=(2, blocks), devices=list(range(16)))])
    with pytest.raises(BadInput, match="reuses devices"):
        estimate(tiny, mixed, w, reuse)


def test_batch_equals_scalar_on_mixed(mixed, tiny):
    w = Workload(global_batch=32, seq_len=512)
    plans = [ParallelPlan(dp=32), ParallelPlan(dp=16, pp=2), ParallelPlan(dp=8, tp=2, pp=2, sp=True)]
    out = estimate_batch(tiny, mixed, w, plans)
    for i, p in enumerate(plans):
        assert out["step_time_s"][i] == estimate(tiny, mixed, w, p).step_time_s


def _costs(t, mem):
    n = len(t)
    z = np.zeros(n)
    return BlockCosts(time_s=np.asarray(t, float), act_bytes=z, early_time_s=np.asarray(t, float),
                      early_act_bytes=z, params=z, state_bytes=np.asarray(mem, float))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 10), st.integers(1, 4), st.data())
def test_hetero_partition_equals_brute_force(n, k, data):
    k = min(k, n)
    speeds = data.draw(st.lists(st.floats(0.25, 4), min_size=k, max_size=k))
    base = data.draw(st.lists(st.floats(0.1, 3), min_size=n, max_size=n))
    mem = data.draw(st.lists(st.floats(0.0, 2), min_size=n, max_size=n))
    caps = data.draw(st.lists(st.floats(1.0, 8.0), min_size=k, max_size=k))
    costs = [_costs(np.asarray(base) / sp, mem) for sp in speeds]
    from planner.cost.memory import allocator_overhead_bytes

    best = math.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        ok, worst = True, 0.0
        for c in range(k):
            lo, hi = edges[c], edges[c + 1]
            held = sum(mem[lo:hi])
            if held + allocator_overhead_bytes(held) > caps[c]:
                ok = False
                break
            worst = max(worst, sum(base[lo:hi]) / speeds[c])
        if ok:
            best = min(best, worst)
    if not math.isfinite(best):
        with pytest.raises(Exception):
            hetero_partition(costs, caps, np.ones(k))
        return
    part = hetero_partition(costs, caps, np.ones(k))
    assert max(part.stage_time_s) == pytest.approx(best, rel=1e-9)


def test_mixed_cluster_must_show(mixed):
    """Llama 3 8B on 16 A100 + 16 H100: using both beats the H100s alone and the naive even split."""
    model = load_model("llama3-8b")
    w = Workload(global_batch=256, seq_len=4096)
    res = plan_hetero(model, mixed, w)
    h100 = res.alone["h100-sxm-80gb"]
    assert res.best.kind in ("pipeline", "shares")
    assert res.best.fits
    assert res.best.tokens_per_s > 1.1 * h100.tokens_per_s
    assert res.best.tokens_per_s > 1.2 * res.even.tokens_per_s
    # the faster device type gets more blocks
    if res.best.kind == "pipeline":
        part = res.best.plan.partition
        by_type: dict = {}
        for a in part:
            by_type.setdefault(a.device_type, []).append(a.layers[1] - a.layers[0])
        assert max(by_type["h100-sxm-80gb"]) > max(by_type["a100-sxm-80gb"])
    # and its own estimate is the figure reported
    if res.best.plan is not None:
        assert estimate(model, mixed, w, res.best.plan).step_time_s == res.best.step_time_s


def test_plan_cli_routes_fixed_presets(run_cli, tmp_path):
    """`plan --cluster NAME` on the fixed heterogeneous presets needs no --nodes and picks its planner."""
    import json

    rc, out, err = run_cli("plan", "--model", "tiny-llama-20m", "--cluster", "phones-snapdragon-wifi6", "--gbs", "8",
                           "--seq", "512", "--json")
    assert rc == 0, err
    assert json.loads(out)["search"]["planner"] == "edge"
    rc, out, err = run_cli("plan", "--model", "tiny-llama-20m", "--cluster", "two-pods-25gbe", "--gbs", "64",
                           "--seq", "512", "--json", timeout=300)
    assert rc == 0, err
    d = json.loads(out)
    assert d["search"]["planner"] == "ilp" and d["plans"][0]["placement"]
    rc, out, err = run_cli("plan", "--model", "tiny-llama-20m", "--cluster", "mixed-a100-h100", "--gbs", "64",
                           "--seq", "512", "--tp", "2")
    assert rc == 2 and err.startswith("error:") and "drop --tp" in err and len(err.strip().splitlines()) == 1
