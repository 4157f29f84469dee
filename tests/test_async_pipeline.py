"""async-1f1b (PipeDream-2BW): closed-form steady state in both paths, stashed weights, staleness, refusals."""
import random

import pytest

from planner import catalog
from planner.core.plan import ParallelPlan, Workload
from planner.cost.batch import estimate_batch
from planner.cost.estimate import estimate
from planner.cost.pipeline import simulate_times
from planner.importers import load_model


def test_cycle_is_the_slope_of_a_long_1f1b_pipeline():
    # the steady state's time per micro-batch equals what m more micro-batches add to an unflushed 1F1B run
    for seed in range(6):
        rng = random.Random(seed)
        p = rng.choice([2, 4, 8])
        fwd = [rng.uniform(0.5, 1.5) for _ in range(p)]
        bwd = [2 * f * rng.uniform(0.8, 1.2) for f in fwd]
        c = rng.choice([0.0, 0.05, 0.3])
        slope = (simulate_times("1f1b", fwd, bwd, 512, p2p_s=c).step_time_s
                 - simulate_times("1f1b", fwd, bwd, 256, p2p_s=c).step_time_s) / 256
        got = simulate_times("async-1f1b", fwd, bwd, 1, p2p_s=c).step_time_s
        assert got == pytest.approx(slope, rel=1e-6)


def _setup(schedule):
    model, cluster = load_model("llama3-8b"), catalog.load_cluster("dgx-h100", 1)
    w = Workload(global_batch=8, seq_len=4096)
    return model, cluster, w, ParallelPlan(dp=1, tp=1, pp=8, mbs=1, schedule=schedule)


def test_pp8_gbs8_bubble_memory_staleness_and_batch_path():
    sync, asyn = (estimate(*_setup(s)) for s in ("1f1b", "async-1f1b"))
    assert asyn.breakdown["pipeline_bubble_s"] < sync.breakdown["pipeline_bubble_s"] / 4
    assert asyn.memory["weights_bytes"] == pytest.approx(2 * sync.memory["weights_bytes"])
    assert (sync.staleness_steps, asyn.staleness_steps) == (0, 1)
    assert "optimizer's semantics" in asyn.why
    model, cluster, w, plan = _setup("async-1f1b")
    out = estimate_batch(model, cluster, w, [plan])
    assert out["step_time_s"][0] == pytest.approx(asyn.step_time_s, rel=1e-9)
    assert out["peak_memory_bytes"][0] == pytest.approx(asyn.peak_memory_bytes, rel=1e-9)


@pytest.mark.parametrize("launcher", ["megatron", "deepspeed", "torchtitan"])
def test_exports_refuse_async(launcher, tmp_path):
    from planner.app.cli import main

    plan = tmp_path / "p.json"
    assert main(["estimate", "--model", "llama3-8b", "--cluster", "dgx-h100", "--pp", "8", "--mbs", "1", "--gbs",
                 "8", "--seq", "4096", "--schedule", "async-1f1b", "--json"]) in (0, None)
    from planner.core.plan import PlanFile
    plan.write_text(PlanFile(model="llama3-8b", cluster="dgx-h100", nodes=1, workload=_setup("1f1b")[2],
                             plan=_setup("async-1f1b")[3]).model_dump_json())
    rc = main(["export", str(plan), "--to", launcher, "-o", str(tmp_path / "out")])
    assert rc == 2
