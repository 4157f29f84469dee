"""`planner diff A.json B.json`: the fields that differ, and B's changes applied to A group by group with a
re-estimate after each, whose deltas sum to B's prediction minus A's (a skipped, invalid intermediate
included)."""
from __future__ import annotations

import json

import pytest
from cli_helpers import one_line, run

from planner.app import plan_diff
from planner.app.cli import main
from planner.core.plan import ParallelPlan
from planner.cost.estimate import estimate
from planner.planfile import load_plan_file

SMALL = ("--model", "llama3-8b", "--cluster", "dgx-h100", "--gbs", "64", "--top", "1")


def save(path, *flags):
    assert main(["plan", *SMALL, *flags, "--save", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """A: tp 2, pp 2 (interleaved, an explicit partition); B: tp 1, pp 1; C: two nodes and a longer sequence."""
    d = tmp_path_factory.mktemp("plans")
    a = save(d / "a.json", "--nodes", "1", "--seq", "4096", "--tp", "2", "--pp", "2")
    b = save(d / "b.json", "--nodes", "1", "--seq", "4096", "--tp", "1", "--pp", "1", "--zero", "1")
    c = save(d / "c.json", "--nodes", "2", "--seq", "8192", "--tp", "1", "--pp", "1")
    return a, b, c


def check_sums(d: plan_diff.PlanDiff, la, lb) -> None:
    """Deltas of the valid steps sum to B - A, with A and B estimated here independently of diff."""
    ea = estimate(la.model, la.cluster, la.pf.workload, la.pf.plan)
    eb = estimate(lb.model, lb.cluster, lb.pf.workload, lb.pf.plan)
    for key, attr in plan_diff.METRICS:
        want = getattr(eb, attr) - getattr(ea, attr)
        assert d.total[key] == pytest.approx(want, rel=1e-12, abs=1e-12)
        got = sum(s.delta[key] for s in d.steps if s.valid)
        assert abs(got - want) <= 1e-9 * max(abs(getattr(ea, attr)), abs(getattr(eb, attr))), key


def test_deltas_sum_to_the_step_time_difference(capsys, plans):
    a, b, _ = plans
    rc, out, err = run(capsys, "diff", a, b, "--json")
    assert rc == 0, err
    data = json.loads(out)
    la, lb = load_plan_file(a), load_plan_file(b)
    fields = {c["field"]: (c["a"], c["b"]) for c in data["changes"]}
    assert fields["plan.tp"] == (la.pf.plan.tp, lb.pf.plan.tp) == (2, 1)
    assert fields["plan.pp"] == (2, 1)
    assert "model" not in fields and "cluster" not in fields and not any(f.startswith("workload") for f in fields)
    # the step-time deltas sum to B - A within 1e-9 relative
    steps = [s for s in data["steps"] if s["valid"]]
    total = lb.estimate.step_time_s - la.estimate.step_time_s
    assert total != 0
    assert sum(s["delta"]["step_time_s"] for s in steps) == pytest.approx(total, rel=1e-9)
    assert data["total"]["step_time_s"] == pytest.approx(total, rel=1e-12)
    # the degrees step comes first, and the last valid step lands on B's own prediction
    assert data["steps"][0]["group"] == "degrees"
    assert steps[-1]["values"]["step_time_s"] == pytest.approx(lb.estimate.step_time_s, rel=1e-12)
    assert data["summary"].startswith("B is") and f"{abs(total) / la.estimate.step_time_s:.1%}" in data["summary"]
    d = plan_diff.diff_plans(a, b)
    check_sums(d, la, lb)
    # each valid step's values are the estimate of A with B's groups so far: redo the first one by hand
    first = d.steps[0]
    assert first.valid, first.reason
    p = la.pf.plan.model_dump()
    p.update({c["field"].removeprefix("plan."): c["b"] for c in first.changes})
    est = estimate(la.model, la.cluster, la.pf.workload, ParallelPlan(**p))
    assert first.values["step_time_s"] == pytest.approx(est.step_time_s, rel=1e-12)


def test_text_report(capsys, plans):
    a, b, _ = plans
    rc, out, err = run(capsys, "diff", a, b)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"A  {a}") and lines[1].startswith(f"B  {b}")
    assert any(line.split()[:4] == ["plan.tp", "2", "->", "1"] for line in lines)
    assert any(line.startswith("total (B - A)") for line in lines)
    assert lines[-1].startswith("B is ") and "tokens/s" in lines[-1]


def test_invalid_intermediate_is_skipped_and_counted_next(capsys, plans):
    """A on one node, C on two: A's plan on C's cluster has the wrong device count, so the cluster step is
    skipped (and says why) and the degrees step carries its effect; the sum still holds."""
    a, _, c = plans
    d = plan_diff.diff_plans(a, c)
    fields = [ch["field"] for ch in d.changes]
    assert "nodes" in fields and "workload.seq_len" in fields
    groups = [s.group for s in d.steps]
    assert groups[:3] == ["workload", "cluster", "degrees"]
    cluster, degrees = d.steps[1], d.steps[2]
    assert not cluster.valid and "devices" in cluster.reason and not cluster.delta
    assert degrees.valid and degrees.includes == ["cluster"]
    check_sums(d, load_plan_file(a), load_plan_file(c))
    rc, out, err = run(capsys, "diff", a, c)
    assert rc == 0, err
    assert "skipped (cluster):" in out and "incl. cluster" in out


def test_same_plan_and_bad_input(capsys, plans, tmp_path):
    a, _, _ = plans
    d = plan_diff.diff_plans(a, a)
    assert d.changes == [] and d.steps == [] and all(v == 0 for v in d.total.values())
    rc, out, err = run(capsys, "diff", a, a)
    assert rc == 0 and "no difference" in out
    assert "no such file" in one_line(*run(capsys, "diff", a, tmp_path / "missing.json")[::2])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert str(bad) in one_line(*run(capsys, "diff", bad, a)[::2])
    assert "required" in one_line(*run(capsys, "diff", a)[::2])


def test_groups_cover_every_plan_field():
    """A field left out of every group would never be applied: B would not be reached."""
    grouped = {f.removeprefix("plan.") for _, fields in plan_diff.GROUPS for f in fields if f.startswith("plan.")}
    assert set(ParallelPlan.model_fields) <= grouped
    top = {f for _, fields in plan_diff.GROUPS for f in fields if not f.startswith("plan.")}
    assert top == {"model", "cluster", "nodes", "workload"}


def test_hostile_plan_files_are_one_line(capsys, tmp_path):
    """Every refused file of the hostile-plan suite is refused by diff too, in either place, in one line that
    names it (diff reads its files through planner.planfile.load_plan_file)."""
    from tests.test_plan_files_hostile import BAD, GOOD

    good = tmp_path / "good.json"
    good.write_text(json.dumps(GOOD))
    assert run(capsys, "diff", good, good)[0] == 0
    for i, (name, body, code, words) in enumerate(b for b in BAD if b[2] != 0):
        path = tmp_path / f"{name}.json"
        path.write_text(body if isinstance(body, str) else json.dumps(body))
        args = (path, good) if i % 2 else (good, path)
        line = one_line(*run(capsys, "diff", *args)[::2], code)
        assert str(path) in line and all(w in line for w in words), (name, line)
