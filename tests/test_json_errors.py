"""With --json / --format json a refusal is also a JSON object on stdout: {"error": {kind, message, closest,
suggestions}}, with the exit status (1 infeasible, 2 bad input) and the one stderr line of the plain run."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from cli_helpers import one_line, run

TINY = ["--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--gbs", "32", "--seq", "512"]
# 512k tokens with every degree fixed to 1 and no recompute: nothing fits (tests/test_plan_cli.py)
INFEASIBLE = ["plan", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--gbs", "8", "--seq", "524288",
              "--tp", "1", "--pp", "1", "--cp", "1", "--recompute", "none"]


def _error(capsys, args, rc_expected):
    """The error object of `args --json`, checked against the plain run: same status, same stderr line."""
    rc, out, err = run(capsys, *args)
    line = one_line(rc, err, rc_expected)
    assert out == ""  # without --json, stdout stays empty
    rc_j, out_j, err_j = run(capsys, *args, "--json")
    assert one_line(rc_j, err_j, rc_expected) == line
    doc = json.loads(out_j)
    assert set(doc["error"]) == {"kind", "message", "closest", "suggestions"}
    assert line == "error: " + doc["error"]["message"]
    return doc


def test_infeasible_request(capsys):
    doc = _error(capsys, INFEASIBLE, 1)
    e = doc["error"]
    assert e["kind"] == "infeasible" and "no plan fits" in e["message"]
    assert len(e["closest"]) == 3
    for c in e["closest"]:
        assert not c["fits"] and c["peak_memory_gb"] > c["memory_capacity_gb"]
        assert (c["tp"], c["pp"], c["cp"], c["recompute"]) == (1, 1, 1, "none")  # the request's constraints
        assert c["label"] in e["message"]
    mems = [c["peak_memory_gb"] for c in e["closest"]]
    assert mems == sorted(mems)  # least memory first
    assert "--recompute full" in e["suggestions"]
    assert all(s in e["message"] for s in e["suggestions"])


@pytest.mark.parametrize("args, words", [
    (["plan", *TINY, "--model", "no-such-model"], ["no-such-model"]),  # found by the command
    (["plan", *TINY, "--tp", "3"], ["tp"]),
    (["plan", *TINY, "--gbs", "eight"], ["--gbs", "invalid int"]),  # found by argparse, before args exist
    (["estimate", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--tp", "3", "--mbs", "1", "--gbs", "8",
      "--seq", "512"], ["divisible"]),
])
def test_bad_input(capsys, args, words):
    e = _error(capsys, args, 2)["error"]
    assert e["kind"] == "bad_input" and e["closest"] == [] and e["suggestions"] == []
    assert all(w in e["message"] for w in words)


def test_format_json_is_the_same_as_json(capsys):
    rc, out, err = run(capsys, *INFEASIBLE, "--format", "json")
    rc_j, out_j, err_j = run(capsys, *INFEASIBLE, "--json")
    assert (rc, err) == (rc_j, err_j) == (1, err_j)
    assert json.loads(out) == json.loads(out_j)


def test_other_formats_print_no_json(capsys):
    rc, out, err = run(capsys, *INFEASIBLE, "--format", "csv")
    one_line(rc, err, 1)
    assert out == ""


def test_backtest_with_no_row_predicted_is_one_json_document(capsys, tmp_path):
    """The report and the error together: one object with the rows and the "error" key."""
    path = tmp_path / "runs.csv"
    runs = Path(__file__).parent / "data" / "calibration_runs_clean.csv"
    pd.read_csv(runs).iloc[[16]].to_csv(path, index=False)  # a NAR21 row that does not print tp/pp
    rc, out, err = run(capsys, "backtest", "--runs", path, "--json")
    line = one_line(rc, err, 2)
    doc = json.loads(out)
    assert doc["error"]["kind"] == "bad_input" and line == "error: " + doc["error"]["message"]
    assert doc["rows_ok"] == 0 and doc["rows"][0]["status"] == "skipped"
    assert doc["request"]["runs"] == str(path)
