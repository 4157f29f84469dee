"""Money and energy per step (issue 23): the power model's bound over many plans, prices and their override, the
cost and energy objectives against the time-optimal plan, and the Pareto front."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from planner import catalog
from planner.catalog import load_cluster
from planner.core.errors import BadInput
from planner.core.plan import ParallelPlan, Workload
from planner.cost import energy
from planner.cost.batch import estimate_batch
from planner.cost.estimate import estimate
from planner.importers import load_model
from planner.search.objective import Objective, pareto_front
from planner.search.search import search
from planner.search.space import Constraints, enumerate_space

W = Workload(global_batch=64, seq_len=1024)


@pytest.fixture(scope="module")
def setup():
    return load_model("tiny-gpt-20m"), load_cluster("dgx-h100", 2)


def test_energy_never_above_tdp_over_many_plans(setup):
    model, cluster = setup
    pa = enumerate_space(model, cluster, W, Constraints(zero=0)).plans
    out = estimate_batch(model, cluster, W, pa)
    joules = energy.energy_j_per_step(cluster, out["step_time_s"], out["hfu"])
    bound = energy.tdp_bound_j(cluster, out["step_time_s"])
    idle = energy.IDLE_FRACTION * 700 * 16 * out["step_time_s"]
    assert len(pa) > 100
    assert np.all(joules <= bound * (1 + 1e-12)) and np.all(joules >= idle * (1 - 1e-12))
    # the scalar estimate carries the same figure, and a busier plan draws more power per second
    for i in (0, len(pa) // 2, len(pa) - 1):
        est = estimate(model, cluster, W, pa.plan(i))
        assert est.energy_j_per_step == pytest.approx(joules[i], rel=1e-9)
        assert est.tokens_per_joule == pytest.approx(W.tokens_per_step / joules[i], rel=1e-9)


def test_power_model_by_hand():
    # 700 W TDP, idle 15% = 105 W; half busy: 105 + 0.5 * 595 = 402.5 W
    assert energy.device_power_w(700.0, 0.5) == pytest.approx(402.5)
    # u is HFU over the achievable GEMM fraction, capped at 1
    assert float(energy.busy_share(0.4, 0.8)) == pytest.approx(0.5)
    assert float(energy.busy_share(0.95, 0.8)) == 1.0


def test_price_from_catalog_and_override(setup):
    model, cluster = setup
    est = estimate(model, cluster, W, ParallelPlan(dp=16, mbs=1))
    h100 = catalog.device_price("h100-sxm-80gb")
    assert h100 is not None and h100.source and h100.date
    assert est.cost_usd_per_step == pytest.approx(16 * h100.usd_per_hour * est.step_time_s / 3600, rel=1e-12)
    # 2 $/device-hour for 16 devices over the step
    over = energy.priced(est, cluster, W.tokens_per_step, 2.0)
    assert over.cost_usd_per_step == pytest.approx(32.0 * est.step_time_s / 3600, rel=1e-12)
    assert over.energy_j_per_step == est.energy_j_per_step


def test_no_price_or_tdp_gives_none():
    cluster = load_cluster("tpu-v5e-pod", 1)  # tpu-v5e: no published power, no catalog price
    model = load_model("tiny-gpt-20m")
    est = estimate(model, cluster, W, ParallelPlan(dp=cluster.device_count, mbs=1))
    assert est.cost_usd_per_step is None and est.energy_j_per_step is None and est.tokens_per_joule is None
    with pytest.raises(BadInput, match="--price-per-hour"):
        Objective("cost", cluster, W.tokens_per_step)
    with pytest.raises(BadInput, match="tdp_w"):
        Objective("energy", cluster, W.tokens_per_step)
    with pytest.raises(BadInput, match="--price-per-hour"):
        Objective("cost", cluster, W.tokens_per_step, price_per_hour=-1.0)


def test_duplicate_price_refused(tmp_path):
    path = tmp_path / "prices.yaml"
    entry = ('- {device: x, usd_per_hour: 1.0, instance: i, source: "a page", date: "2024-01-01", '
             'provenance: recalled}\n')
    path.write_text(entry * 2)
    with pytest.raises(BadInput, match="priced twice"):
        catalog._prices(path)


def test_objectives_against_the_time_plan(setup):
    model, cluster = setup
    fast = search(model, cluster, W, Constraints(), top_k=3, refine_partition=False)
    cheap = search(model, cluster, W, Constraints(), top_k=3, refine_partition=False, objective="cost")
    frugal = search(model, cluster, W, Constraints(), top_k=3, refine_partition=False, objective="energy")
    t, c, e = fast.plans[0].estimate, cheap.plans[0].estimate, frugal.plans[0].estimate
    # per token: every plan here runs the same tokens per step
    assert c.cost_usd_per_step <= t.cost_usd_per_step * (1 + 1e-12)
    assert e.energy_j_per_step <= t.energy_j_per_step * (1 + 1e-12)
    assert [rp.estimate.energy_j_per_step for rp in frugal.plans] == sorted(
        rp.estimate.energy_j_per_step for rp in frugal.plans)
    assert frugal.objective == "energy"


def test_pareto_front_by_hand():
    step = np.array([1.0, 2.0, 1.5, 3.0, 1.0])
    cost = np.array([1.0, 2.0, 1.5, 3.0, 1.0])
    joules = np.array([10.0, 5.0, 12.0, 4.0, 10.0])
    # plan 2 is beaten by plan 0 everywhere; plan 4 equals plan 0 (the first is kept)
    assert pareto_front(step, cost, joules).tolist() == [0, 1, 3]


def test_plan_json_has_pareto_front(setup):
    r = subprocess.run([sys.executable, "-c", "import sys; from planner.app.cli import main; sys.exit(main())",
                        "plan", "--model", "tiny-gpt-20m", "--cluster", "dgx-h100", "--nodes", "2", "--gbs", "64",
                        "--seq", "1024", "--objective", "energy", "--price-per-hour", "3", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["objective"] == "energy" and out["pareto"]
    front = out["pareto"]
    for a in front:  # no point of the front beats another on all three
        for b in front:
            if a is not b:
                assert not (b["step_time_s"] <= a["step_time_s"] and b["cost_usd_per_step"] <= a["cost_usd_per_step"]
                            and b["energy_j_per_step"] < a["energy_j_per_step"])
    best = out["plans"][0]["estimate"]
    assert best["cost_usd_per_step"] == pytest.approx(16 * 3 * best["step_time_s"] / 3600, rel=1e-9)
