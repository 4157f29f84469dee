"""`sweep`: a what-if grid to CSV with the best plan per cell (the same plan `plan --top 1` finds), infeasible
cells as rows that say why, names checked before the first cell, written atomically and never over an
existing file without --force; and the scale-out link override it uses."""
from __future__ import annotations

import io

import pandas as pd
import pytest
from cli_helpers import one_line, run

from planner.app import api
from planner.app.sweep import COLUMNS, sweep
from planner.catalog import load_cluster
from planner.core.plan import Workload
from planner.importers import load_model
from planner.search.search import search

TINY = ["--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--gbs", "32"]


def test_grid_best_plan_per_cell():
    df = sweep(["tiny-llama-20m"], ["dgx-h100", "jetson-orin-x4"], nodes=[1, 2], seqs=[512, 1024], gbs=[32])
    assert list(df.columns) == COLUMNS
    # dgx-h100: 2 node counts x 2 sequences; jetson-orin-x4 has a fixed size: once per sequence
    assert len(df) == 6
    assert df.loc[df.cluster == "jetson-orin-x4", "nodes"].tolist() == [4, 4]
    assert (df.status == "ok").all()
    row = df[(df.cluster == "dgx-h100") & (df.nodes == 2) & (df.seq == 1024)].iloc[0]
    res = search(load_model("tiny-llama-20m"), load_cluster("dgx-h100", 2), Workload(global_batch=32, seq_len=1024),
                 top_k=1, progress=False)
    best = res.plans[0]
    assert (row.tp, row.pp, row.dp, row.mbs, row.zero) == (best.plan.tp, best.plan.pp, best.plan.dp, best.plan.mbs,
                                                            best.plan.zero)
    assert row.step_time_s == pytest.approx(best.estimate.step_time_s, rel=1e-12)
    assert row.devices == 16 and row.tokens_per_s == pytest.approx(32 * 1024 / row.step_time_s)


def test_infeasible_and_impossible_cells_say_why():
    df = sweep("llama3-70b", "dgx-h100", nodes=1, seqs=8192, gbs=[64, 63], refine_partition=False)
    by_gbs = df.set_index("gbs")
    assert by_gbs.loc[64, "status"] == "infeasible" and "no plan fits" in by_gbs.loc[64, "why"]
    assert by_gbs.loc[63, "status"] in ("infeasible", "no-plan") and by_gbs.loc[63, "why"]


def test_cli_csv_atomic_and_force(capsys, tmp_path):
    out = tmp_path / "grid.csv"
    rc, text, err = run(capsys, "sweep", *TINY, "--nodes", "1,2", "--seq", "512", "-o", out)
    assert rc == 0, err
    assert err == ""  # the progress bar stays off when stderr is not a terminal
    df = pd.read_csv(out)
    assert list(df.columns) == COLUMNS and len(df) == 2 and set(df.status) == {"ok"}
    assert "2 cells (2 with a plan)" in text
    assert [p.name for p in tmp_path.iterdir()] == ["grid.csv"]  # no temporary file left
    before = out.read_bytes()
    assert "exists" in one_line(*run(capsys, "sweep", *TINY, "--nodes", "4", "--seq", "512", "-o", out)[::2])
    assert out.read_bytes() == before
    rc, _, err = run(capsys, "sweep", *TINY, "--nodes", "4", "--seq", "512", "-o", out, "--force")
    assert rc == 0, err
    assert pd.read_csv(out).nodes.tolist() == [4]


def test_cli_stdout_and_bad_input(capsys, tmp_path):
    rc, out, err = run(capsys, "sweep", *TINY, "--seq", "512", "--link", "eth-10g,ib-ndr", "--nodes", "2")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split(",") == COLUMNS and len(lines) == 3
    for args, needle in [
        (["--model", "nope", "--cluster", "dgx-h100", "--seq", "512", "--gbs", "8"], "unknown model"),
        (["--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", "512", "--gbs", "8", "--link", "nvlink9"],
         "unknown link"),
        (["--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", "512,x", "--gbs", "8"], "--seq"),
        (["--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", "512", "--gbs", "0"], "positive"),
        (["--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", "512", "--gbs", "8", "--dtype", "int4"],
         "dtype"),
        (["--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", "512", "--gbs", "8", "-o",
          tmp_path / "missing" / "x.csv"], "does not exist"),
    ]:
        assert needle in one_line(*run(capsys, "sweep", *args)[::2])


def test_link_override():
    """with_link replaces the NICs and the fabric: point-to-point across nodes runs at the new link's rate,
    inside a node NVLink stays, and a data-parallel plan across nodes gets slower on a slower link."""
    base = load_cluster("dgx-h100", 2)
    slow = api.with_link(base, "eth-10g")
    eth = api.load_cluster("dgx-h100", 2, link="eth-10g")
    assert slow.p2p(0, 8)[0] == eth.p2p(0, 8)[0] < base.p2p(0, 8)[0]
    assert slow.p2p(0, 1) == base.p2p(0, 1)
    fast = api.estimate("tiny-llama-20m", base, gbs=32, seq=512, tp=1)
    slower = api.estimate("tiny-llama-20m", slow, gbs=32, seq=512, tp=1)
    assert slower.step_time_s > fast.step_time_s


FMT = ["sweep", "--model", "tiny-llama-20m,llama3-70b", "--cluster", "dgx-h100", "--nodes", "1", "--seq", "512",
       "--gbs", "32", "--no-refine"]


def test_formats(capsys, monkeypatch, tmp_path):
    """--format: csv is the default stdout (and the -o file), json the same rows (--json its alias), markdown
    and table the default view (a table within $COLUMNS), --wide every column."""
    monkeypatch.setenv("COLUMNS", "100")
    outs = {}
    for fmt in ("csv", "json", "markdown", "table"):
        rc, outs[fmt], err = run(capsys, *FMT, "--format", fmt)
        assert rc == 0, err
    csv_rows, default_rows = (pd.read_csv(io.StringIO(t)).drop(columns="search_s")  # wall time differs
                              for t in (outs["csv"], run(capsys, *FMT)[1]))
    pd.testing.assert_frame_equal(csv_rows, default_rows)
    json_rows, alias_rows = (pd.read_json(io.StringIO(t)).drop(columns="search_s")
                             for t in (outs["json"], run(capsys, *FMT, "--json")[1]))
    pd.testing.assert_frame_equal(json_rows, alias_rows)
    assert csv_rows.status.tolist() == json_rows.status.tolist() == ["ok", "infeasible"]
    md = outs["markdown"].splitlines()
    assert md[0].startswith("| model | cluster |") and set(md[1]) == {"|", "-"} and len(md) == 4
    assert md[2].count(" | ") == md[0].count(" | ")  # no cell text breaks the row
    assert "| infeasible: no plan fits" in md[3]
    table = outs["table"].splitlines()
    assert max(len(line) for line in table) <= 100 and len(table) == 3
    assert table[1].startswith("tiny-llama-20m") and "infeasible" in table[2]
    wide = run(capsys, *FMT, "--format", "table", "--wide")[1].splitlines()
    assert wide[0].split() == COLUMNS and max(len(line) for line in wide) > 100
    out = tmp_path / "grid.csv"  # -o with --format: the CSV file, and stdout in that format
    rc, text, err = run(capsys, *FMT, "-o", out, "--format", "markdown")
    assert rc == 0, err
    assert text.splitlines()[0] == md[0]
    pd.testing.assert_frame_equal(pd.read_csv(out).drop(columns="search_s"), csv_rows)
