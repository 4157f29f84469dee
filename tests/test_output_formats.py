"""--format table|markdown|csv|json and --wide on plan, estimate and backtest (planner/app/table.py): tables fit
$COLUMNS, markdown and CSV parse back, JSON answers echo the request."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from cli_helpers import run

from planner.app import table
from planner.app.commands.plan import PLAN_COLUMNS, PLAN_WIDE_COLUMNS

TINY = ["--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--gbs", "32", "--seq", "512"]
EST = ["estimate", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--tp", "2", "--mbs", "1", "--gbs", "32",
       "--seq", "512"]
RUNS = Path(__file__).parent / "data" / "calibration_runs_clean.csv"


@pytest.fixture
def runs_csv(tmp_path):
    """Four published runs: three predicted (NAR21, KOR22, NeMo) and one unusable NAR21 row."""
    path = tmp_path / "runs.csv"
    pd.read_csv(RUNS).iloc[[0, 16, 23, 41]].to_csv(path, index=False)
    return path


def _markdown_rows(text: str) -> list[list[str]]:
    """The cells of every table line, split on the | that are not escaped."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in text.splitlines() if ln.startswith("|")]


# --- the table module -------------------------------------------------------------------------------------

ROWS = [{"n": 1, "name": "a, \"quoted\" | piped", "x": 1.5, "why": "w" * 200},
        {"n": 2, "name": "b\nnewline", "x": None, "why": "short"}]


@pytest.mark.parametrize("width", [30, 45, 80, 120])
def test_table_never_exceeds_the_width(width):
    text = table.render(ROWS, "table", width=width)
    assert max(len(ln) for ln in text.splitlines()) <= width
    assert len(text.splitlines()) >= 3  # header and both rows, whatever was cut


def test_free_text_is_cut_before_columns_are_dropped():
    text = table.render(ROWS, "table", width=60)
    assert "…" in text or "..." in text
    assert "hidden" not in text and "why" in text.splitlines()[0]
    narrow = table.render(ROWS, "table", width=35)
    assert "(1 column hidden" in narrow and "--wide" in narrow
    assert "why" not in narrow.splitlines()[0]


def test_wide_keeps_everything():
    text = table.render(ROWS, "table", columns=["n"], wide_columns=["n", "name", "x", "why"], wide=True, width=40)
    assert "w" * 200 in text and "hidden" not in text


def test_csv_and_markdown_quote_right():
    back = list(csv.DictReader(io.StringIO(table.render(ROWS, "csv"))))
    assert back[0]["name"] == ROWS[0]["name"] and back[1]["name"] == ROWS[1]["name"]
    assert back[1]["x"] == ""  # None is an empty cell
    md = _markdown_rows(table.render(ROWS, "markdown"))
    assert all(len(r) == 4 for r in md)
    assert md[2][1] == r'a, "quoted" \| piped'


def test_json_is_the_list_of_rows():
    assert json.loads(table.render(ROWS, "json", columns=["n"])) == ROWS


@pytest.mark.parametrize("argv, wanted", [(["plan", "--json"], True), (["plan", "--format", "json"], True),
                                          (["plan", "--format=json"], True), (["plan", "--format", "csv"], False),
                                          (["plan", "--", "--json"], False)])
def test_json_requested_from_words(argv, wanted):
    assert table.json_requested(argv) is wanted


# --- plan -------------------------------------------------------------------------------------------------


def test_plan_fits_100_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    rc, out, err = run(capsys, "plan", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1",
                       "--gbs", "32", "--seq", "8192")
    assert rc == 0, err
    lines = out.splitlines()
    assert max(len(ln) for ln in lines) <= 100, max(lines, key=len)
    assert lines[0].startswith("llama3-8b") and "costed" in out
    assert sum(1 for ln in lines if re.match(r"\d+ ", ln)) == 5


def test_plan_narrow_terminal_hides_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")
    rc, out, _ = run(capsys, "plan", *TINY, "--top", "2")
    assert rc == 0
    assert max(len(ln) for ln in out.splitlines()) <= 50
    assert "hidden: --wide shows them" in out


def test_plan_csv_parses_back(capsys):
    rc, out, err = run(capsys, "plan", *TINY, "--top", "3", "--format", "csv")
    assert rc == 0 and err == ""
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == PLAN_COLUMNS and len(rows) == 3
    steps = [float(r["step_time_s"]) for r in rows]
    assert steps == sorted(steps) and all(s > 0 for s in steps)
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    # the same plans as --json, to the last digit (CSV keeps the raw values)
    plans = json.loads(run(capsys, "plan", *TINY, "--top", "3", "--json")[1])["plans"]
    assert steps == [p["estimate"]["step_time_s"] for p in plans]


def test_plan_wide_csv_has_every_column(capsys):
    rc, out, _ = run(capsys, "plan", *TINY, "--top", "2", "--format", "csv", "--wide")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and list(rows[0]) == PLAN_WIDE_COLUMNS
    for r in rows:
        assert int(r["tp"]) * int(r["pp"]) * int(r["dp"]) * int(r["cp"]) == 8


def test_plan_markdown_rows_match_the_header(capsys):
    rc, out, _ = run(capsys, "plan", *TINY, "--top", "3", "--format", "markdown")
    assert rc == 0
    md = _markdown_rows(out)
    assert len(md) == 2 + 3 and all(len(r) == len(PLAN_COLUMNS) for r in md)
    assert md[0][0] == "#" and set(md[1][0]) == {"-"}


def test_plan_json_echoes_the_request(capsys):
    rc, out, _ = run(capsys, "plan", *TINY, "--top", "1", "--tp", "2", "--format", "json")
    doc = json.loads(out)
    assert rc == 0 and doc["plans"][0]["tp"] == 2
    req = doc["request"]
    assert req["command"] == "plan" and req["model"] == "tiny-llama-20m" and req["cluster"] == "dgx-h100"
    assert (req["gbs"], req["seq"], req["tp"], req["top"], req["pp"]) == (32, 512, 2, 1, None)
    assert "func" not in req and "format" not in req


# --- estimate and backtest --------------------------------------------------------------------------------


def test_estimate_formats(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    rc, out, _ = run(capsys, *EST)
    assert rc == 0 and max(len(ln) for ln in out.splitlines()) <= 40 and "tokens/s" in out
    rc, out, _ = run(capsys, *EST, "--format", "csv", "--wide")
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["tp"] == "2" and row["dp"] == "4" and float(row["compute_s"]) > 0
    assert float(row["mem_total_gb"]) == pytest.approx(float(row["peak_memory_gb"]), rel=0.01)
    doc = json.loads(run(capsys, *EST, "--json")[1])
    assert doc["request"]["tp"] == 2 and doc["request"]["seq"] == 512 and doc["plan"]["dp"] == 4
    assert doc["step_time_s"] == pytest.approx(float(row["step_time_s"]), rel=1e-12)


def test_backtest_csv_and_markdown(capsys, runs_csv):
    rc, out, _ = run(capsys, "backtest", "--runs", runs_csv, "--format", "csv")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["id"] for r in rows] == [str(i) for i in pd.read_csv(runs_csv)["id"]]
    ok = [r for r in rows if r["error_pct"]]
    assert len(ok) == 3 and all(float(r["predicted"]) > 0 for r in ok)
    assert [r["note"] for r in rows if not r["error_pct"]][0].startswith("skipped: unusable")
    rc, out, _ = run(capsys, "backtest", "--runs", runs_csv, "--format", "markdown")
    tables = [_markdown_rows(part) for part in out.split("\n\n") if part.startswith("|")]
    assert len(tables) == 2  # the runs, then MAPE per source
    assert len(tables[0]) == 2 + 4 and all(len(r) == len(tables[0][0]) for r in tables[0])
    assert {r[0] for r in tables[1][2:]} == {"NAR21", "KOR22", "NEMO-24.07"}
    assert "overall MAPE" in out


def test_backtest_json_echoes_the_request(capsys, runs_csv):
    doc = json.loads(run(capsys, "backtest", "--runs", runs_csv, "--json")[1])
    assert doc["request"] == {"command": "backtest", "runs": str(runs_csv)}
    assert doc["rows_ok"] == 3
