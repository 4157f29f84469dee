"""`simulate PLAN.json` and planner.app.viz: the timeline of one step comes from the cost model's own pipeline
simulation (its makespan plus estimate()'s step-level terms is estimate()'s step time), its events show the
schedule's phases, and the picture is written atomically at the size the layout promises."""
from __future__ import annotations

import json
import os

import pytest
from cli_helpers import one_line, run

from planner.app import viz
from planner.catalog import load_cluster
from planner.core.plan import ParallelPlan, PlanFile, Workload
from planner.cost.estimate import estimate
from planner.importers import load_model

P, V, M = 4, 2, 8  # interleaved 1F1B: pp 4, vpp 2, 8 micro-batches
INTERLEAVED = ParallelPlan(tp=2, pp=P, vpp=V, dp=1, mbs=1, sp=True, zero=1, recompute="selective",
                           schedule="interleaved-1f1b")
WORKLOAD = Workload(global_batch=M, seq_len=4096)


@pytest.fixture(scope="module")
def llama8b():
    return load_model("llama3-8b"), load_cluster("dgx-h100", 1)


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    pf = PlanFile(model="llama3-8b", cluster="dgx-h100", nodes=1, workload=WORKLOAD, plan=INTERLEAVED)
    path.write_text(pf.model_dump_json())
    return path


def test_interleaved_phases_from_the_events(capsys, plan_file):
    """The event list of `simulate --json` for interleaved 1F1B, pp 4, vpp 2: each stage i runs only forwards
    first, 2(p-i-1) + (v-1)p of them (Megatron's warm-up) before the forward that opens the steady phase; then
    strictly alternating F, B; then only backwards, as many as the warm-up forwards."""
    rc, out, err = run(capsys, "simulate", plan_file, "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert (data["pp"], data["vpp"], data["microbatches"], data["schedule"]) == (P, V, M, "interleaved-1f1b")
    assert data["consistent"] and data["step_time_s"] == pytest.approx(data["estimate_step_time_s"], rel=1e-12)
    events = data["events"]
    assert len(events) == 2 * P * V * M
    for i in range(P):
        evs = sorted((e for e in events if e["stage"] == i), key=lambda e: e["start_s"])
        kinds = "".join(e["kind"] for e in evs)
        total = M * V
        assert kinds.count("F") == kinds.count("B") == total
        warm = 2 * (P - i - 1) + (V - 1) * P  # 10, 8, 6, 4
        steady = total - warm
        assert kinds == "F" * warm + "FB" * steady + "B" * warm, (i, kinds)
        # warm-up: chunk 0 for micro-batches 0..p-1, then chunk 1 for the same, then chunk 0 of the next group
        chunks = [e["chunk"] for e in evs if e["kind"] == "F"]
        assert chunks[:2 * P] == [0] * P + [1] * P
        # the cool-down ends with chunk 0's backward of the last micro-batch
        assert (evs[-1]["kind"], evs[-1]["chunk"], evs[-1]["microbatch"]) == ("B", 0, M - 1)
        # ops on a stage never overlap
        assert all(a["end_s"] <= b["start_s"] + 1e-15 for a, b in zip(evs, evs[1:]))
        st = data["stages"][i]
        assert (st["warmup_forwards"], st["steady_pairs"], st["cooldown_backwards"]) == (warm, steady, warm)
    # a forward starts only after the same micro-batch's forward on the previous virtual stage, plus the p2p
    end = {(e["kind"], e["virtual_stage"], e["microbatch"]): e["end_s"] for e in events}
    for e in events:
        if e["kind"] == "F" and e["virtual_stage"] > 0:
            assert e["start_s"] >= end[("F", e["virtual_stage"] - 1, e["microbatch"])] + data["p2p_s"] - 1e-12


def test_png_written_at_its_size(capsys, plan_file, tmp_path):
    out = tmp_path / "timeline.png"
    rc, text, err = run(capsys, "simulate", plan_file, "-o", out)
    assert rc == 0, err
    assert out.exists() and viz.png_size(out) == viz.figure_size_px(P) == (1600, 600)
    assert "warm-up" in text and f"timeline written to {out}" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600
    # refuses to overwrite, then overwrites with --force
    before = out.stat().st_mtime_ns
    one_line(*run(capsys, "simulate", plan_file, "-o", out)[::2])
    assert out.stat().st_mtime_ns == before
    assert run(capsys, "simulate", plan_file, "-o", out, "--force")[0] == 0


def test_default_output_and_errors(capsys, plan_file, tmp_path):
    rc, text, err = run(capsys, "simulate", plan_file)
    assert rc == 0, err
    assert (tmp_path / "plan.timeline.png").exists()
    assert "exists" in one_line(*run(capsys, "simulate", plan_file)[::2])
    assert "no such file" in one_line(*run(capsys, "simulate", tmp_path / "missing.json")[::2])
    assert "format" in one_line(*run(capsys, "simulate", plan_file, "-o", tmp_path / "t.gif")[::2])
    assert "does not exist" in one_line(*run(capsys, "simulate", plan_file, "-o", tmp_path / "no" / "t.png")[::2])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(plan_file.read_text()), "schema_version": 99}))
    assert "schema_version" in one_line(*run(capsys, "simulate", bad, "--json")[::2])
    wrong = tmp_path / "wrong.json"  # a plan for 8 devices on a 16-device cluster
    wrong.write_text(json.dumps({**json.loads(plan_file.read_text()), "nodes": 2}))
    assert "devices" in one_line(*run(capsys, "simulate", wrong, "--json")[::2])


@pytest.mark.parametrize("schedule,pp,extra", [
    ("1f1b", 2, {}), ("gpipe", 3, {}), ("zb-h1", 2, {"recompute": "full"}),
    ("interleaved-1f1b", 2, {"vpp": 3, "cp": 2}),
])
def test_timeline_matches_estimate(schedule, pp, extra):
    """For every schedule: makespan + tail == estimate()'s step; ops and gaps tile each stage's row exactly;
    the phases follow the schedule."""
    cp = extra.get("cp", 1)
    dp = max(1, 8 // (2 * pp * cp))
    model, cluster = load_model("tiny-llama-20m"), load_cluster("dgx-h100", 1, devices=2 * pp * cp * dp)
    plan = ParallelPlan(tp=2, pp=pp, dp=dp, mbs=1, sp=True, schedule=schedule, **extra)
    w = Workload(global_batch=8, seq_len=512)
    tl = viz.timeline(model, cluster, w, plan)
    est = estimate(model, cluster, w, plan)
    assert tl.consistent
    assert tl.step_time_s == pytest.approx(est.step_time_s, rel=1e-12)
    m = plan.microbatches(w)
    for stage in range(pp):
        busy = sum(o.duration_s for o in tl.ops if o.stage == stage)
        idle = sum(g["end_s"] - g["start_s"] for g in tl.gaps if g["stage"] == stage)
        assert busy + idle == pytest.approx(tl.pipeline_s, rel=1e-9)
        ph = tl.stages[stage]
        if schedule == "gpipe":
            assert (ph["warmup_forwards"], ph["steady_pairs"]) == (m, 0)
        elif schedule in ("1f1b", "zb-h1"):
            assert ph["warmup_forwards"] == min(pp - stage - 1, m)
    if schedule == "zb-h1":
        assert any(o.kind == "W" for o in tl.ops)
        assert all(o.recompute_s > 0 for o in tl.ops if o.kind == "B")
    assert all(o.comm_s > 0 for o in tl.ops if o.kind in "FB")  # tp 2: exposed TP traffic inside each op
    assert all(0 <= o.recompute_s + o.comm_s <= o.duration_s + 1e-15 for o in tl.ops)
    fig = viz.plot_timeline(tl)
    assert len(fig.axes) == 2


def test_phases_reading():
    assert viz.phases("FFFFBFBBBB") == {"warmup_forwards": 3, "steady_pairs": 2, "cooldown_backwards": 3}
    assert viz.phases("FFFBBB", "gpipe") == {"warmup_forwards": 3, "steady_pairs": 0, "cooldown_backwards": 3}
    assert viz.phases("FBWFBWBW") == {"warmup_forwards": 0, "steady_pairs": 2, "cooldown_backwards": 1}
