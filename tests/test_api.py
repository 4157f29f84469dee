"""The Python API (planner.app.api) the notebooks use: the same answers as the command line and the cost model,
as DataFrames with the plan and Estimate objects at hand, and the planner's own one-line errors."""
from __future__ import annotations

import json

import pytest

from planner.app import api
from planner.app.cli import main
from planner.catalog import load_cluster
from planner.core.errors import BadInput, Infeasible
from planner.core.plan import Estimate, ParallelPlan, Workload
from planner.cost.estimate import estimate
from planner.importers import load_model

KW = dict(gbs=32, seq=512)


@pytest.fixture(scope="module")
def top():
    return api.plan("tiny-llama-20m", "dgx-h100", nodes=1, top=4, **KW)


def test_plan_table_matches_cli(top, capsys):
    assert list(top.index) == [1, 2, 3, 4] and top.index.name == "rank"
    for col in ("label", "tp", "pp", "dp", "zero", "mbs", "step_time_s", "tokens_per_s", "mfu", "peak_memory_gb",
                "why", "plan", "estimate"):
        assert col in top.columns
    assert top.step_time_s.is_monotonic_increasing
    assert isinstance(top.loc[1, "plan"], ParallelPlan) and isinstance(top.loc[1, "estimate"], Estimate)
    assert top.attrs["devices"] == 8 and top.attrs["workload"]["seq_len"] == 512
    rc = main(["plan", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--gbs", "32", "--seq", "512",
               "--top", "4", "--json"])
    assert rc == 0
    cli = json.loads(capsys.readouterr().out)["plans"]
    assert [p["estimate"]["step_time_s"] for p in cli] == pytest.approx(list(top.step_time_s), rel=1e-12)
    assert [(p["tp"], p["pp"], p["dp"], p["mbs"]) for p in cli] == list(zip(top.tp, top.pp, top.dp, top.mbs))


def test_constraints_and_errors():
    df = api.plan("tiny-llama-20m", "dgx-h100", top=2, tp=2, recompute="full", **KW)
    assert set(df.tp) == {2} and set(df.recompute) == {"full"}
    with pytest.raises(BadInput, match="unknown constraint 'tpp'"):
        api.plan("tiny-llama-20m", "dgx-h100", tpp=2, **KW)
    with pytest.raises(BadInput, match="unknown model"):
        api.plan("tiny-llama-2m", "dgx-h100", **KW)
    with pytest.raises(BadInput):
        api.plan("tiny-llama-20m", "dgx-h100", gbs=0, seq=512)
    with pytest.raises(Infeasible):
        api.plan("llama3-70b", "dgx-h100", gbs=64, seq=8192, refine_partition=False)


def test_estimate_equals_the_cost_model():
    model, cluster = load_model("tiny-llama-20m"), load_cluster("dgx-h100", 1)
    plan = ParallelPlan(tp=2, pp=2, dp=2, mbs=2, zero=1, sp=True)
    direct = estimate(model, cluster, Workload(global_batch=32, seq_len=512), plan)
    assert api.estimate("tiny-llama-20m", "dgx-h100", tp=2, pp=2, mbs=2, zero=1, sp=True, **KW) == direct
    assert api.estimate(model, cluster, plan=plan, **KW) == direct
    assert api.estimate("tiny-llama-20m", "dgx-h100", plan={"tp": 2, "pp": 2, "mbs": 2, "zero": 1, "sp": True},
                        **KW) == direct
    with pytest.raises(BadInput, match="not divisible"):
        api.estimate("tiny-llama-20m", "dgx-h100", tp=3, **KW)
    with pytest.raises(BadInput, match="plan"):
        api.estimate("tiny-llama-20m", "dgx-h100", tp=1, sp=True, **KW)


def test_estimates_breakdown_memory(top):
    df = api.estimates("tiny-llama-20m", "dgx-h100", {"dp8": {}, "tp2 pp2": {"tp": 2, "pp": 2}}, **KW)
    assert list(df.index) == ["dp8", "tp2 pp2"] and list(df.dp) == [8, 2]
    bd = api.breakdown(top)
    assert list(bd.index) == list(top.index) and "compute_s" in bd.columns and bd.loc[1, "label"] == top.loc[1, "label"]
    mem = api.memory(df.loc["tp2 pp2", "estimate"])
    assert len(mem) == 2 and mem["total"].max() * 1e9 == pytest.approx(df.loc["tp2 pp2", "estimate"].peak_memory_bytes)
    assert (mem["capacity"] == 80).all()


def test_plan_file_round_trip_and_timeline(top, tmp_path):
    path = api.save_plan(top, tmp_path / "best.json")
    pf = api.load_plan(path)
    assert pf.plan == top.loc[1, "plan"] and pf.model == "tiny-llama-20m" and pf.nodes == 1
    with pytest.raises(BadInput, match="exists"):
        api.save_plan(top, path)
    api.save_plan(top, path, rank=2, force=True)
    assert api.load_plan(path).plan == top.loc[2, "plan"]
    tl = api.simulate(path)
    assert tl.consistent and tl.step_time_s == pytest.approx(top.loc[2, "step_time_s"], rel=1e-12)
    tl2 = api.timeline("tiny-llama-20m", "dgx-h100", plan=top.loc[2, "plan"], **KW)
    assert tl2.pipeline_s == tl.pipeline_s
    png = tmp_path / "t.png"
    api.plot_timeline(tl, png)
    assert png.exists()
    with pytest.raises(BadInput, match="link"):
        api.to_plan_file(api.plan("tiny-llama-20m", "dgx-h100", nodes=2, link="eth-25g", top=1, **KW))
