"""`plan` on the command line (DESIGN.md section 3): a readable table, --json with the contract's fields, --save
writing a PlanFile atomically (refusing to overwrite without --force) that `estimate --plan` reads back, and
infeasible (exit 1) and bad (exit 2) requests as one line on stderr, never a traceback."""
from __future__ import annotations

import json

import pytest
from cli_helpers import one_line, run

from planner.core.plan import PlanFile

TINY = ["--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--gbs", "32", "--seq", "512"]
PLAN_KEYS = {"tp", "pp", "dp", "vpp", "cp", "ep", "zero", "sp", "mbs", "recompute", "schedule", "partition", "estimate"}
ESTIMATE_KEYS = {"step_time_s", "tokens_per_s", "mfu", "hfu", "peak_memory_bytes", "fits", "breakdown", "memory"}


def test_plan_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # wide enough for the why column (tests/test_output_formats.py: narrower)
    rc, out, err = run(capsys, "plan", *TINY, "--top", "3")
    assert rc == 0, err
    assert err == ""
    lines = out.splitlines()
    assert "tiny-llama-20m" in lines[0] and "tokens/s" in lines[1]
    assert len([ln for ln in lines if ln[:2].strip().isdigit()]) == 3
    assert "limited by" in out and "costed" in lines[-1]


def test_plan_json_fields(capsys):
    rc, out, _ = run(capsys, "plan", *TINY, "--top", "4", "--json")
    assert rc == 0
    data = json.loads(out)
    assert set(data) >= {"plans", "search"}
    assert set(data["search"]) >= {"evaluated", "wall_s"} and data["search"]["evaluated"] > 0
    plans = data["plans"]
    assert 1 <= len(plans) <= 4
    for p in plans:
        assert PLAN_KEYS <= set(p)
        assert ESTIMATE_KEYS <= set(p["estimate"])
        assert p["estimate"]["fits"] and p["why"]
        assert p["dp"] * p["tp"] * p["pp"] * p["cp"] == 8
        assert len(p["partition"]) == p["pp"] * p["vpp"]
    steps = [p["estimate"]["step_time_s"] for p in plans]
    assert steps == sorted(steps)  # best first


def test_plan_constraints(capsys):
    rc, out, _ = run(capsys, "plan", *TINY, "--tp", "2", "--zero", "3", "--no-sp", "--recompute", "full", "--json")
    assert rc == 0
    for p in json.loads(out)["plans"]:
        assert (p["tp"], p["zero"], p["sp"], p["recompute"]) == (2, 3, False, "full")


def test_save_force_and_read_back(capsys, tmp_path):
    path = tmp_path / "best.json"
    rc, out, _ = run(capsys, "plan", *TINY, "--save", path, "--json")
    assert rc == 0
    best = json.loads(out)["plans"][0]
    pf = PlanFile.model_validate_json(path.read_text())
    assert (pf.plan.tp, pf.plan.pp, pf.plan.dp, pf.plan.mbs) == (best["tp"], best["pp"], best["dp"], best["mbs"])
    assert pf.model == "tiny-llama-20m" and pf.workload.global_batch == 32
    assert not [p for p in tmp_path.iterdir() if p.name != "best.json"]  # no temporary left behind

    before = path.read_text()
    rc, _, err = run(capsys, "plan", *TINY, "--save", path)
    line = one_line(rc, err, 2)
    assert str(path) in line and "--force" in line
    assert path.read_text() == before
    rc, _, err = run(capsys, "plan", *TINY, "--gbs", "64", "--save", path, "--force")
    assert rc == 0, err
    assert PlanFile.model_validate_json(path.read_text()).workload.global_batch == 64

    # estimate reads the plan file and predicts the same step time
    rc, out, _ = run(capsys, "estimate", "--plan", path, "--json")
    assert rc == 0
    pf = PlanFile.model_validate_json(path.read_text())
    assert json.loads(out)["step_time_s"] == pytest.approx(pf.estimate.step_time_s, rel=1e-12)


def test_estimate_plan_file_errors(capsys, tmp_path):
    rc, _, err = run(capsys, "estimate", "--plan", tmp_path / "missing.json")
    assert "no such file" in one_line(rc, err, 2)
    bad = tmp_path / "v9.json"
    bad.write_text(json.dumps({"schema_version": 9, "model": "m", "cluster": "c",
                               "workload": {"global_batch": 1, "seq_len": 1}, "plan": {}}))
    rc, _, err = run(capsys, "estimate", "--plan", bad)
    assert "schema_version 9" in one_line(rc, err, 2)
    rc, _, err = run(capsys, "estimate", "--model", "tiny-llama-20m", "--cluster", "dgx-h100")
    assert "--mbs" in one_line(rc, err, 2)


def test_infeasible_lists_closest_plans(capsys):
    # 512k tokens: full recompute fits; at 4M it does not, since the LM head's fp32 logits (tokens x vocab x 4 B)
    # are not recomputed
    rc, out, err = run(capsys, "plan", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--gbs", "8",
                       "--seq", "524288", "--tp", "1", "--pp", "1", "--cp", "1", "--recompute", "none")
    line = one_line(rc, err, 1)
    assert out == ""
    assert "no plan fits" in line and "80 GB" in line
    assert "closest: tp1 pp1 dp8" in line and line.count(" GB)") == 3
    assert "try --seq" in line and "--recompute full" in line


def _apply(args: list[str], suggestion: str) -> list[str]:
    """The command line a suggestion of the infeasible message asks for: 'without --tp 1' drops the flag,
    '--seq 262144' replaces its value, '--offload-activations' is added."""
    words = suggestion.split()
    if words[0] == "without":
        i = args.index(words[1])
        return args[:i] + args[i + 2:]
    if words[0] in args:
        i = args.index(words[0])
        return args[:i] + words + args[i + 2:]
    return args + words


@pytest.mark.parametrize("args, expected", [
    (["--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--gbs", "8", "--seq", "524288", "--tp", "1", "--pp", "1",
      "--cp", "1", "--recompute", "none"], ["--offload-activations", "without --cp 1"]),
    # 4M tokens with cp capped at 16 and tp 1: a wider cp, activation offload or tensor parallelism would fit
    (["--model", "llama2-7b", "--cluster", "dgx-a100-80gb", "--nodes", "16", "--gbs", "1", "--seq", "4194304",
      "--tp", "1", "--max-cp", "16"], ["--max-cp 128", "--offload-activations", "without --tp 1"]),
])
def test_every_suggestion_makes_a_plan_fit(capsys, args, expected):
    # each "try ..." the infeasible message lists was checked by the search; applied, the command finds a plan
    args = ["plan", *args, "--top", "1"]
    rc, _, err = run(capsys, *args)
    line = one_line(rc, err, 1)
    tries = line.split("; try ")[1].split(" or ")
    assert set(expected) <= set(tries), tries
    for t in tries:
        rc, out, err = run(capsys, *_apply(args, t))
        assert rc == 0 and err == "" and "tokens/s" in out, t


def test_infeasible_suggests_more_nodes(run_cli):
    rc, out, err = run_cli("plan", "--model", "llama3-70b", "--cluster", "dgx-h100", "--gbs", "64", "--seq", "8192")
    line = one_line(rc, err, 1)
    assert "no plan fits" in line and "closest:" in line and "--nodes" in line


@pytest.mark.parametrize("args, words", [
    (["--tp", "0"], ["--tp", "positive"]),
    (["--tp", "3"], ["tp"]),
    (["--top", "0"], ["--top"]),
    (["--gbs", "-4"], ["--gbs"]),
    (["--zero", "5"], ["--zero"]),
    (["--schedule", "pipedream"], ["--schedule"]),
    (["--model", "no-such-model"], ["no-such-model"]),
    (["--nodes", "0"], ["--nodes"]),
    (["--vpp", "2", "--schedule", "1f1b"], ["--vpp"]),
    (["--ep", "2"], ["--ep"]),
])
def test_bad_input_is_one_line(capsys, args, words):
    rc, out, err = run(capsys, "plan", *TINY, *args)
    line = one_line(rc, err, 2)
    assert out == ""
    for w in words:
        assert w in line, line


def test_save_into_missing_directory(capsys, tmp_path):
    rc, _, err = run(capsys, "plan", *TINY, "--save", tmp_path / "nope" / "p.json")
    assert "does not exist" in one_line(rc, err, 2)


@pytest.mark.parametrize("args, words", [
    (["plan", *TINY, "--documents", "0:5"], "--documents"),
    (["plan", *TINY, "--documents", "abc"], "--documents"),
    (["plan", *TINY, "--attention-pool"], "--documents"),
    (["plan", *TINY, "--seq-chunks", "1,x"], "--seq-chunks"),
    (["plan", *TINY, "--seq-chunks", "0"], "--seq-chunks"),
    (["plan", *TINY, "--documents", "100:50"], "below mean_tokens"),
    (["estimate", *TINY, "--mbs", "1", "--attention-pool"], "--documents"),
    (["estimate", *TINY, "--mbs", "1", "--pp", "2", "--seq-chunks", "0"], "seq_chunks"),
    (["estimate", *TINY, "--mbs", "1", "--offload-activations", "2"], "offload.activations"),
])
def test_long_context_flags_bad_input(capsys, args, words):
    rc, _, err = run(capsys, *args)
    assert words in one_line(rc, err, 2)


def test_estimate_long_context_flags(capsys):
    base = ["estimate", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1", "--tp", "2", "--pp", "4",
            "--mbs", "1", "--gbs", "8", "--seq", "131072", "--recompute", "full", "--sp", "--schedule", "1f1b",
            "--json"]
    rc, out, err = run(capsys, *base)
    assert rc == 0, err
    whole = json.loads(out)
    rc, out, err = run(capsys, *base, "--seq-chunks", "4")
    assert rc == 0, err
    chunked = json.loads(out)
    assert chunked["plan"]["seq_chunks"] == 4 and "seq_chunks 4" in chunked["why"]
    # the fill/drain bubble shrinks with 4x the work items
    assert chunked["breakdown"]["pipeline_bubble_s"] < whole["breakdown"]["pipeline_bubble_s"]
    rc, out, err = run(capsys, *base, "--offload-activations", "0.5")
    assert rc == 0, err
    assert json.loads(out)["plan"]["offload"]["activations"] == 0.5
