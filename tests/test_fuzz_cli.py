"""Issue 16 part 3: hostile input to every subcommand ends in a result or one line, never a traceback, a hang
or an exit 0 on nonsense.

Each test draws its examples with hypothesis (tests/fuzz_inputs.py: mutations of the catalog's model and
cluster files, of real `plan --save` files and of rows of the published-runs table, number flags, paths,
validate/calibrate arguments), runs every one in this process (planner.app.cli.main, output captured, a time
and memory limit) and fails listing each distinct failure once with an argv and files to reproduce it.
derandomize=True: CI draws the same examples every time. 1,000+ examples in all; benchmarks/fuzz_cli.py
runs more with a seed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import fuzz_inputs as fi
import pytest
from hypothesis import HealthCheck, Phase, given, settings

# Examples per group: 2,390 in all (plus the issue's own cases), 35-70 s on a 2-core machine.
EXAMPLES = {"flags": 700, "model file": 550, "cluster file": 300, "plan file": 450, "runs table": 150,
            "paths": 140, "backend": 100}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """HOME and XDG folders of every run: nothing the fuzz does reaches the real ones."""
    return tmp_path_factory.mktemp("fuzz-home")


def _fuzz(strategy, n: int, root: Path, home: Path) -> fi.Tally:
    tally = fi.Tally()

    @settings(max_examples=n, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def body(case):
        with tempfile.TemporaryDirectory(dir=root) as d:
            tally.add(fi.run_case(case, Path(d), home))

    body()
    return tally


def _check(tally: fi.Tally, at_least: int) -> None:
    print("\n" + tally.table())
    assert tally.failures == 0, f"{tally.failures} failing runs:\n{tally.table()}\n\n{tally.report()}"
    # hypothesis may stop early only if the strategy runs out of distinct examples; ours do not
    assert tally.examples >= at_least, tally.table()


@pytest.mark.parametrize("group", sorted(EXAMPLES))
def test_fuzz_group(group, tmp_path, home):
    strategy, _ = fi.GROUPS[group]
    n = EXAMPLES[group]
    _check(_fuzz(strategy(), n, tmp_path, home), int(0.9 * n))


def test_the_issues_own_findings(tmp_path, home):
    """The inputs issue 16 names, each once: --nodes 10^9, --gbs 10^13, --seq 10^12 and 2^63, the 70B model
    on phones, --cp above --max-cp, --save '', a FIFO, /dev/zero, calibrate --nproc 10^6, plan files with pp
    1000, inconsistent micro-batches, a misspelled cluster and capacity factor 0.01, and one good row among
    20 bad ones."""
    tally = fi.Tally()
    for case in fi.issue_cases():
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            tally.add(fi.run_case(case, Path(d), home))
    _check(tally, len(fi.issue_cases()))


def test_the_judge_tells_failures_from_refusals(tmp_path, home, monkeypatch):
    """The harness itself: a clean refusal, an exit 0 on nonsense, a traceback and a hang are told apart."""
    import planner.app.cli

    refused = fi.Case("flags", (("estimate", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--gbs", "8",
                                 "--seq", "512", "--mbs", "0"),), (), "--mbs 0 is not positive")
    assert [o.kind for o in fi.run_case(refused, tmp_path, home)] == ["refused"]
    shown = fi.Case("flags", (("profiles", "show", "dgx-h100"),), (), "marked nonsense to test the judge")
    assert [o.kind for o in fi.run_case(shown, tmp_path, home)] == ["nonsense-accepted"]
    fi.materialize(fi.Case("paths", (), (fi.FileSpec("f.json", "fifo"),)), tmp_path)
    # a blocking open of a FIFO without a writer, as the planner did before read_input
    monkeypatch.setattr(planner.app.cli, "main", lambda argv: (tmp_path / "f.json").read_text())
    [o] = fi.run_case(fi.Case("paths", (("x",),)), tmp_path, home, hang_s=0.5)
    assert o.kind == "hang", o.detail
    monkeypatch.setattr(planner.app.cli, "main", lambda argv: int("x"))
    [o] = fi.run_case(fi.Case("flags", (("x",),)), tmp_path, home)
    assert o.kind == "traceback" and "ValueError" in o.signature, o.signature
