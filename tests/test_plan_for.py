"""`plan --for LAUNCHER`, the `launchers` list of each plan and `--save-rank K` (issue 19)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from planner.app.cli import main
from planner.core.plan import PlanFile
from planner.export import Unsupported, export_text, make_context
from planner.importers import load_model

BASE = ["plan", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "2", "--seq", "8192", "--gbs", "64"]
TO = {"megatron": "megatron", "deepspeed": "deepspeed", "torchtitan": "torchtitan"}


def run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def searched():
    """--json output of the plain search and of each --for, searched once."""
    got = {}
    for launcher in (None, "megatron", "deepspeed", "torchtitan"):
        rc, out, err = run(BASE + ["--top", "8", "--json"] + (["--for", launcher] if launcher else []))
        assert rc == 0, err
        got[launcher] = json.loads(out)
    return got


def _exports(obj: dict, plan_json: dict) -> set[str]:
    """The launchers whose exporter writes this plan, asked of export_text itself."""
    keys = {"tp", "pp", "dp", "vpp", "cp", "ep", "zero", "sp", "mbs", "recompute", "recompute_num_layers",
            "schedule", "cp_comm", "moe_dispatch", "seq_chunks", "attention_pool", "flash_attention",
            "overlap_grad_reduce"}
    plan = {k: plan_json[k] for k in keys} | {"overlap_tp_comm": plan_json.get("overlap_tp_comm", False)}
    plan["offload"] = {"optimizer": plan_json["offload_optimizer"], "activations": plan_json["offload_activations"]}
    if plan_json["pp"] > 1:  # [first, last) blocks of each chunk, the plan's own or the even split
        plan["partition"] = [{"layers": pair} for pair in plan_json["partition"]]
    req = obj["request"]
    pf = PlanFile.model_validate({"model": "llama3-8b", "cluster": "dgx-h100", "nodes": 2, "plan": plan,
                                  "workload": {"global_batch": req["gbs"], "seq_len": req["seq"]}})
    ctx = make_context(pf, model=load_model("llama3-8b"), devices_per_node=8)
    ok = set()
    for name, fmt in TO.items():
        try:
            export_text(ctx, fmt)
            ok.add(name)
        except Unsupported:
            pass
    return ok


def test_launchers_list_is_what_the_exporters_write(searched):
    """Without --for each plan lists exactly the launchers whose export succeeds; some plan is not runnable
    everywhere, so the list says something."""
    plans = searched[None]["plans"]
    lists = [set(p["launchers"]) for p in plans]
    assert lists == [_exports(searched[None], p) for p in plans]
    assert any(s != set(TO) for s in lists)


@pytest.mark.parametrize("launcher", ["megatron", "deepspeed", "torchtitan"])
def test_for_keeps_only_plans_the_launcher_runs(searched, launcher):
    res = searched[launcher]
    assert res["stack"] == {"megatron": "megatron-core"}.get(launcher, launcher)
    assert res["plans"] and all(launcher in p["launchers"] for p in res["plans"])
    for p in res["plans"]:
        assert launcher in _exports(res, p)
        assert p["seq_chunks"] == 1 and p["offload_activations"] == 0 and p["moe_dispatch"] != "tp_slice"
        if launcher == "deepspeed":
            assert p["ep"] == 1 and not p["sp"] and p["vpp"] == 1 and p["recompute"] != "selective"
            assert p["cp"] == 1 or p["cp_comm"] == "a2a"
        if launcher == "torchtitan":
            assert p["cp"] == 1 or p["cp_comm"] == "ring"
            assert p["sp"] == (p["tp"] > 1) and not (p["zero"] == 1 and p["dp"] > 1)
        if launcher == "megatron":
            assert p["schedule"] in ("1f1b", "interleaved-1f1b")


def test_for_is_never_faster_than_its_own_stack_unconstrained(searched):
    """--for X searches a subset of --stack X's space: its best is at most as fast."""
    rc, out, err = run(BASE + ["--top", "1", "--json", "--stack", "deepspeed"])
    free = json.loads(out)["plans"][0]["estimate"]["step_time_s"]
    assert searched["deepspeed"]["plans"][0]["estimate"]["step_time_s"] >= free


def test_save_rank_saves_the_kth_plan(tmp_path, searched):
    path = tmp_path / "p.json"
    rc, out, err = run(BASE + ["--top", "8", "--save", str(path), "--save-rank", "3", "--json"])
    assert rc == 0, err
    third = json.loads(out)["plans"][2]
    saved = json.loads(path.read_text())
    assert saved["estimate"]["step_time_s"] == third["estimate"]["step_time_s"]
    assert (saved["plan"]["tp"], saved["plan"]["pp"], saved["plan"]["dp"], saved["plan"]["cp"]) == \
        (third["tp"], third["pp"], third["dp"], third["cp"])


@pytest.mark.parametrize("extra,code,words", [
    (["--save-rank", "2"], 2, "--save"),  # no --save
    (["--for", "torchtitan", "--model", "mixtral-8x22b"], 2, "no model flavour"),
    (["--for", "megatron", "--moe-dispatch", "tp_slice"], 2, "--for megatron"),
    (["--for", "deepspeed", "--sp", "--tp", "2"], 2, "--sp"),
    (["--for", "torchtitan", "--dtype", "fp16"], 2, "--dtype bf16"),
])
def test_refusals_are_one_line(extra, code, words):
    rc, out, err = run(BASE + extra)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code and len(lines) == 1 and words in lines[0], err
