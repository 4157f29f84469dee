"""replan: keep the global batch on the survivors, migration cost, the naive alternatives."""
import json

import pytest

from planner.app.cli import main


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rp") / "plan.json"
    from planner.core.plan import ParallelPlan, PlanFile, Workload

    pf = PlanFile(model="llama3-8b", cluster="dgx-h100", nodes=2, workload=Workload(global_batch=64, seq_len=2048),
                  plan=ParallelPlan(dp=4, tp=1, pp=4, mbs=1, zero=1))
    path.write_text(pf.model_dump_json())
    return path


def _run(capsys, *argv):
    assert main(["replan", *argv, "--json"]) in (0, None)
    return json.loads(capsys.readouterr().out)


def test_lose_one_keeps_batch_and_beats_dropping_a_replica(capsys, plan_file):
    out = _run(capsys, str(plan_file), "--lose", "1")
    assert sum(r["samples"] for r in out["after"]["replicas"]) == 64
    assert out["after"]["plan"]["workload"]["global_batch"] == 64
    assert out["after"]["tokens_per_s"] < out["before"]["tokens_per_s"]
    assert out["migration_bytes"] > 0 and out["migration_s"] > 0
    drop = next(a for a in out["alternatives"] if a["name"].startswith("drop"))
    assert out["after"]["tokens_per_s"] > drop["tokens_per_s"]


def test_bad_device_is_refused(capsys, plan_file):
    assert main(["replan", str(plan_file), "--lose-devices", "99"]) == 2
    assert main(["replan", str(plan_file)]) == 2
