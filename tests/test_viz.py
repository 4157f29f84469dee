"""`simulate PLAN.json`, planner.app.viz and planner.app.gantt: the timeline of one step comes from the cost
model's own pipeline simulation (its makespan plus estimate()'s step-level terms is estimate()'s step time), its
events show the schedule's phases, and the picture is written atomically, cropped so its legends are whole,
and stays readable (a bounded number of bars) at hundreds of micro-batches."""
from __future__ import annotations

import json
import os

import pytest
from cli_helpers import one_line, run

from planner.app import gantt, viz
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
    assert viz.figure_size_px(P) == (1600, 600)
    # cropped to what is drawn: the memory legend reaches past the laid-out figure, so the image is larger
    width, height = viz.png_size(out)
    assert width > 1600 and height > 600
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


def test_saved_image_holds_the_legends(tmp_path, llama8b):
    """The legends sit below the axes, past the laid-out figure (its bottom edge cut them off before): the
    saved PNG is the figure's tight bounding box, which holds both legends whole."""
    model, cluster = llama8b
    tl = viz.timeline(model, cluster, WORKLOAD, INTERLEAVED)
    out = tmp_path / "t.png"
    fig = viz.plot_timeline(tl, out)
    renderer = fig.canvas.get_renderer()
    fig_w, fig_h = viz.figure_size_px(P)
    legends = [ax.get_legend().get_window_extent(renderer) for ax in fig.axes]
    assert min(lg.y0 for lg in legends) < 0 or max(lg.x1 for lg in legends) > fig_w  # outside the layout
    tight = fig.get_tightbbox(renderer).padded(0.1)  # inches; savefig's default pad_inches
    x0, y0 = tight.x0 * gantt.DPI, tight.y0 * gantt.DPI
    width, height = viz.png_size(out)
    assert (width, height) == pytest.approx((tight.width * gantt.DPI, tight.height * gantt.DPI), abs=1.01)
    for lg in legends:  # each legend inside the saved image
        assert x0 <= lg.x0 and lg.x1 <= x0 + width and y0 <= lg.y0 and lg.y1 <= y0 + height
    assert not fig.aggregated  # 8 micro-batches: every op drawn


def test_512_microbatches_aggregate_into_few_bars(tmp_path):
    """512 micro-batches on 4 stages: 4,096 ops, each well under 2 px wide. The chart merges consecutive ops
    of a kind into lanes: far fewer bars than ops (each op drawn would be >= 4,096 bars), at most one per
    2 px of each lane, and no op left outside a drawn span."""
    model, cluster = load_model("tiny-llama-20m"), load_cluster("dgx-h100", 1, devices=8)
    plan = ParallelPlan(tp=2, pp=4, dp=1, mbs=1, sp=True, schedule="1f1b")
    tl = viz.timeline(model, cluster, Workload(global_batch=512, seq_len=512), plan)
    assert tl.microbatches == 512 and len(tl.ops) == 2 * 4 * 512
    out = tmp_path / "long.png"
    fig = viz.plot_timeline(tl, out)
    assert fig.aggregated and "aggregated" in fig.texts[0].get_text()  # the title says so
    ax = fig.axes[0]
    bars = gantt.bar_count(ax)
    axes_px = ax.get_window_extent().width
    lanes = 2  # forward and backward; one idle row and three tail bars per stage at most
    assert bars < len(tl.ops) / 20
    assert bars <= 4 * ((lanes + 1) * (axes_px / gantt.MIN_BAR_PX + 1) + 3)
    width, height = viz.png_size(out)
    assert width > 1000 and height > 400
    # every op of stage 0 lies inside a merged span of its lane
    min_s = gantt.MIN_BAR_PX / (axes_px / (tl.step_time_s * 1.005))
    for kind in "FB":
        spans = gantt.merge_spans([(o.start_s, o.end_s) for o in tl.stage_ops(0) if o.kind == kind], min_s)
        assert len(spans) < 512
        for o in tl.stage_ops(0):
            if o.kind == kind:
                assert any(a <= o.start_s and o.end_s <= b for a, b in spans)


def test_merge_spans():
    assert gantt.merge_spans([(5.0, 6.0), (0.0, 1.0), (1.5, 2.0), (4.0, 4.5)], 0.6) == [(0.0, 2.0), (4.0, 6.0)]
    assert gantt.merge_spans([(0.0, 1.0), (2.0, 3.0)], 0.5) == [(0.0, 1.0), (2.0, 3.0)]
    assert gantt.merge_spans([], 1.0) == []
