"""`simulate PLAN.json --trace out.json` and planner.app.trace: Chrome trace events of the simulated step, a
track per pipeline stage whose slices tile the step (compute, recompute, exposed comm, p2p wait, bubble, the
step-level tail) exactly as the Timeline has them."""
from __future__ import annotations

import json
from collections import defaultdict

import pytest
from cli_helpers import one_line, run

from planner.app import trace, viz
from planner.catalog import load_cluster
from planner.core.plan import ParallelPlan, PlanFile, Workload
from planner.importers import load_model

P, V, M = 4, 2, 8
PLAN = ParallelPlan(tp=2, pp=P, vpp=V, dp=1, mbs=1, sp=True, zero=1, recompute="full",
                    schedule="interleaved-1f1b")
WORKLOAD = Workload(global_batch=M, seq_len=4096)
OP_NAMES = {"forward", "backward", "weight-grad", "recompute", "TP/CP/EP comm"}
ALL_NAMES = OP_NAMES | {"p2p wait", "bubble", "DP grad sync", "optimizer", "offload"}


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    pf = PlanFile(model="llama3-8b", cluster="dgx-h100", nodes=1, workload=WORKLOAD, plan=PLAN)
    path.write_text(pf.model_dump_json())
    return path


def by_track(data: dict) -> dict[int, list[dict]]:
    tracks = defaultdict(list)
    for e in data["traceEvents"]:
        if e["ph"] == "X":
            tracks[e["tid"]].append(e)
    return dict(tracks)


def test_cli_trace_one_event_list_per_stage(capsys, plan_file, tmp_path):
    out = tmp_path / "step.trace.json"
    rc, text, err = run(capsys, "simulate", plan_file, "--trace", out)
    assert rc == 0, err
    assert f"trace written to {out}" in text
    assert not (tmp_path / "plan.timeline.png").exists()  # --trace alone writes no image
    with open(out) as f:
        data = json.load(f)
    assert data["displayTimeUnit"] == "ms"
    tracks = by_track(data)
    assert sorted(tracks) == list(range(P))  # one event list per stage
    names = {e["tid"]: e["args"]["name"] for e in data["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    # stage i holds ranks [2i, 2i + 1] (tp 2, pp slowest in Megatron's order)
    assert names == {i: f"stage {i} (ranks {2 * i}-{2 * i + 1})" for i in range(P)}
    step_us = data["otherData"]["step_time_s"] * 1e6
    for stage, events in tracks.items():
        assert {e["name"] for e in events} <= ALL_NAMES
        assert all(e["pid"] == 1 and e["dur"] >= 0 for e in events)
        # slices tile the track: each starts where the previous one ended, the last ends at the step time
        events.sort(key=lambda e: e["ts"])
        assert events[0]["ts"] == 0
        for a, b in zip(events, events[1:]):
            assert b["ts"] == pytest.approx(a["ts"] + a["dur"], abs=2e-3), (stage, a, b)
        assert events[-1]["ts"] + events[-1]["dur"] == pytest.approx(step_us, rel=1e-9)
        # every op of every micro-batch and chunk, with its args
        fwd = [e for e in events if e["name"] == "forward"]
        assert sorted((e["args"]["micro-batch"], e["args"]["chunk"]) for e in fwd) == \
            sorted((mb, c) for mb in range(M) for c in range(V))
        assert all(e["args"]["virtual stage"] == e["args"]["chunk"] * P + stage for e in fwd)
        # full recompute: each backward opens with its forward re-run, same micro-batch and chunk
        rec = [e for e in events if e["name"] == "recompute"]
        assert len(rec) == M * V
        bwd_start = {(e["args"]["micro-batch"], e["args"]["chunk"]): e["ts"] for e in events
                     if e["name"] == "backward"}
        for e in rec:
            key = (e["args"]["micro-batch"], e["args"]["chunk"])
            assert bwd_start[key] == pytest.approx(e["ts"] + e["dur"], abs=2e-3)
        assert any(e["name"] == "TP/CP/EP comm" and e["cat"] == "comm" for e in events)  # tp 2
        assert events[-1]["name"] in ("optimizer", "offload")
    # pipeline idle: stage 0 waits at the end, the last stage at the start; p2p waits exist (pp > 1)
    assert tracks[P - 1][0]["name"] in ("bubble", "p2p wait")
    assert any(e["name"] == "p2p wait" for t in tracks.values() for e in t)


def test_trace_agrees_with_the_timeline():
    """Per stage, the time in each kind of slice is the Timeline's: busy ops, idle gaps, the tail."""
    model, cluster = load_model("tiny-llama-20m"), load_cluster("dgx-h100", 1, devices=4)
    plan = ParallelPlan(tp=2, pp=2, dp=1, mbs=1, sp=True, schedule="zb-h1", recompute="full")
    tl = viz.timeline(model, cluster, Workload(global_batch=8, seq_len=512), plan)
    tracks = by_track(trace.trace_events(tl))
    for stage in range(2):
        ev = tracks[stage]
        ops_us = sum(e["dur"] for e in ev if e["name"] in OP_NAMES)
        assert ops_us == pytest.approx(1e6 * sum(o.duration_s for o in tl.ops if o.stage == stage), rel=1e-6)
        idle_us = sum(e["dur"] for e in ev if e["name"] in ("bubble", "p2p wait"))
        assert idle_us == pytest.approx(1e6 * sum(g["end_s"] - g["start_s"] for g in tl.gaps
                                                  if g["stage"] == stage), rel=1e-6, abs=1e-2)
        assert sum(1 for e in ev if e["name"] == "weight-grad") == 8  # zb-h1: one W per micro-batch
        assert [e["name"] for e in ev if e["cat"] in ("step",) or e["name"] == "DP grad sync"] == \
            [n for k, n in (("dp_comm_exposed_s", "DP grad sync"), ("optimizer_s", "optimizer"),
                            ("offload_s", "offload")) if tl.tail[k] > 0]


def test_trace_output_refusals(capsys, plan_file, tmp_path):
    out = tmp_path / "t.json"
    assert run(capsys, "simulate", plan_file, "--trace", out)[0] == 0
    before = out.read_bytes()
    assert "exists" in one_line(*run(capsys, "simulate", plan_file, "--trace", out)[::2])
    assert out.read_bytes() == before
    assert run(capsys, "simulate", plan_file, "--trace", out, "--force")[0] == 0
    assert "does not exist" in one_line(*run(capsys, "simulate", plan_file, "--trace", tmp_path / "no" / "t.json")[::2])
    png = tmp_path / "same.png"
    assert "different names" in one_line(*run(capsys, "simulate", plan_file, "-o", png, "--trace", png)[::2])
    # image and trace together; no temporary file left behind
    rc, text, err = run(capsys, "simulate", plan_file, "-o", tmp_path / "t.png", "--trace", tmp_path / "t2.json")
    assert rc == 0, err
    assert (tmp_path / "t.png").exists() and json.loads((tmp_path / "t2.json").read_text())["traceEvents"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
