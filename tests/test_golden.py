"""Golden regression suite (issue 17, "Rules"): the JSON of plan, estimate, simulate and backtest runs recorded at
commit 7d6dee0, before the cost-model restructuring, replayed against this tree. Every number must stay within
rel 1e-6 (abs 1e-9 near zero); strings, bools and nulls exactly; list lengths exactly. A key the current output
adds is allowed (it changes no recorded number); a recorded key that disappears is a difference.

The cases and their recording live in benchmarks/record_golden.py; each golden file holds the cases' specs,
so a case replays from the file alone. An intended change of a number belongs to its own issue, which re-records
(`python benchmarks/record_golden.py --out tests/golden`) and says why in its commit.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
REPO_ROOT = Path(__file__).resolve().parent.parent
REL_TOL, ABS_TOL = 1e-6, 1e-9
SHOWN = 8  # differences printed per failing case


def _recorder():
    spec = importlib.util.spec_from_file_location("record_golden", REPO_ROOT / "benchmarks" / "record_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REC = _recorder()


def _load(group: str) -> list[dict]:
    # the suite's own checked-in data, not a user-named input
    return json.loads((GOLDEN / f"{group}.json").read_text())["cases"]


CASES = [(group, case) for group in REC.GROUPS for case in _load(group)]


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def differences(golden, now, path: str = "$"):
    """(JSON path, golden value, current value) for every place `now` departs from `golden`."""
    if isinstance(golden, dict):
        if not isinstance(now, dict):
            yield path, "an object", type(now).__name__
            return
        for k, v in golden.items():
            if k not in now:
                yield f"{path}.{k}", v, "(missing)"
            else:
                yield from differences(v, now[k], f"{path}.{k}")
    elif isinstance(golden, list):
        if not isinstance(now, list):
            yield path, "a list", type(now).__name__
        elif len(golden) != len(now):
            yield f"{path} (length)", len(golden), len(now)
        else:
            for i, (g, n) in enumerate(zip(golden, now, strict=True)):
                yield from differences(g, n, f"{path}[{i}]")
    elif _is_num(golden):
        if not _is_num(now):
            yield path, golden, now
        elif math.isnan(golden) or math.isnan(now):
            if not (math.isnan(golden) and math.isnan(now)):
                yield path, golden, now
        elif not math.isclose(golden, now, rel_tol=REL_TOL, abs_tol=ABS_TOL):
            yield path, golden, now
    elif type(golden) is not type(now) or golden != now:  # str, bool, None: exactly
        yield path, golden, now


def _report(name: str, diffs: list) -> str:
    lines = [f"{name}: {len(diffs)} difference(s) from the golden run; the first {min(len(diffs), SHOWN)}:"]
    for path, g, n in diffs[:SHOWN]:
        rel = f"  (rel {abs(n - g) / max(abs(g), 1e-300):.3g})" if _is_num(g) and _is_num(n) else ""
        lines.append(f"  {path}: golden {g!r}, now {n!r}{rel}")
    return "\n".join(lines)


@pytest.mark.parametrize("group,case", CASES, ids=[f"{g}/{c['name']}" for g, c in CASES])
def test_golden_case(group, case):
    now = REC.run_case(case, GOLDEN)
    diffs = list(differences(case["result"], now))
    assert not diffs, _report(f"{group}/{case['name']}", diffs)


# ---------------------------------------------------------------------------------------------------
# the suite itself: the comparison can fail, and the recorded cases cover what issue 17 lists


def test_differences_catches_what_it_must():
    golden = {"a": 1.0, "b": [1, 2, {"c": "x"}], "d": True, "e": None, "f": 0.0, "g": float("nan")}
    assert list(differences(golden, dict(golden))) == []
    assert list(differences(golden, {**golden, "a": 1.0 + 5e-7, "f": 5e-10, "extra": 3})) == []
    assert [d[0] for d in differences(golden, {**golden, "a": 1.0 + 2e-6})] == ["$.a"]
    assert [d[0] for d in differences(golden, {**golden, "f": 2e-9})] == ["$.f"]
    assert [d[0] for d in differences(golden, {**golden, "b": [1, 2, {"c": "y"}]})] == ["$.b[2].c"]
    assert [d[0] for d in differences(golden, {**golden, "b": [1, 2]})] == ["$.b (length)"]
    assert [d[0] for d in differences(golden, {**golden, "d": 1})] == ["$.d"]  # a bool is not a number
    assert [d[0] for d in differences(golden, {**golden, "e": 0})] == ["$.e"]
    assert [d[0] for d in differences(golden, {**golden, "g": 1.0})] == ["$.g"]
    assert [d[0] for d in differences(golden, {k: v for k, v in golden.items() if k != "a"})] == ["$.a"]


def test_golden_files_cover_the_vocabulary():
    """What the recorded estimates exercise (values as of 7d6dee0), and the other run kinds."""
    plans = [c["result"]["plan"] for c in _load("estimate")]
    assert {p["schedule"] for p in plans} >= {"gpipe", "1f1b", "interleaved-1f1b", "zb-h1"}
    assert {p["cp_comm"] for p in plans if p["cp"] > 1} >= {"ring", "a2a"}
    assert {p["zero"] for p in plans} >= {0, 1, 2, 3}
    assert {p["moe_dispatch"] for p in plans if p["ep"] > 1} >= {"a2a", "tp_slice", "deepep"}
    assert {p["recompute"] for p in plans} >= {"none", "selective", "full"}
    assert any(p["recompute_num_layers"] for p in plans)
    assert any(p["offload"]["optimizer"] > 0 for p in plans) and any(p["offload"]["activations"] > 0 for p in plans)
    assert {p["sp"] for p in plans} == {False, True}
    assert any(p["seq_chunks"] > 1 for p in plans) and any(p["attention_pool"] for p in plans)
    assert any(p["partition"] for p in plans)
    plan_runs = {c["name"]: c["result"] for c in _load("plan")}
    assert {r["search"].get("planner", "search") for r in plan_runs.values()} == {"search", "hetero", "ilp", "edge"}
    assert all(r["plans"] for r in plan_runs.values())
    sims = _load("simulate")
    assert sims and all(c["result"]["events"] and c["result"]["consistent"] for c in sims)
    tables = {c["name"]: c["result"] for c in _load("backtest")}
    assert set(tables) == {Path(t).stem for t in REC.RUN_TABLES}
    for name, res in tables.items():  # the whole table: every row predicted or skipped with a reason
        with open(GOLDEN / f"{name}.csv", newline="") as f:
            n_rows = sum(1 for _ in csv.reader(f)) - 1
        assert len(res["rows"]) == n_rows > 90, name
        assert sum(r["status"] == "ok" for r in res["rows"]) > 0.9 * n_rows, name
