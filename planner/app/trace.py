"""A simulated step (planner.app.viz.Timeline) as Chrome trace events: the JSON that Perfetto
(ui.perfetto.dev) and chrome://tracing open, zoomable down to one op of one micro-batch.

Format (the Trace Event Format's JSON object form): {"traceEvents": [...], "displayTimeUnit": "ms"}. One
process (pid 1, named after the model, cluster and plan); one thread per pipeline stage (tid = stage, named
"stage i (ranks a-b)" by "M" metadata events, sorted by stage). Every slice is an "X" (complete) event with
ts and dur in microseconds. A stage's slices tile its track from 0 to the step time, without overlap:

  forward, backward, weight-grad   compute of one op (args: micro-batch, chunk, virtual stage);
  recompute                        the forward re-run that opens a backward (args as above);
  TP/CP/EP comm                    the op's exposed tensor/context/expert-parallel traffic (args as above);
  p2p wait                         idle while the neighbouring stage's activation or gradient arrives;
  bubble                           other pipeline idle time;
  DP grad sync, optimizer, offload the step-level terms estimate() adds after the pipeline.

The parts of an op follow one another as in the Gantt chart (planner/app/viz.py says why).
"""
from __future__ import annotations

import json

US_PER_S = 1e6
PID = 1

# slice name and category of each part
_OP_PART = {"F": "forward", "B": "backward", "W": "weight-grad"}
_TAIL = (("dp_comm_exposed_s", "DP grad sync", "comm"), ("optimizer_s", "optimizer", "step"),
         ("offload_s", "offload", "step"))


def _us(t_s: float) -> float:
    return round(t_s * US_PER_S, 3)  # nanosecond resolution is far below anything the model resolves


def _slice(stage: int, name: str, cat: str, start_s: float, end_s: float, args: dict | None = None) -> dict:
    ts = _us(start_s)
    ev = {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": round(_us(end_s) - ts, 3), "pid": PID,
          "tid": stage}
    if args:
        ev["args"] = args
    return ev


def _op_slices(o) -> list[dict]:
    """An op as its consecutive parts: [recompute,] compute, [exposed comm]."""
    args = {"micro-batch": o.microbatch, "chunk": o.chunk, "virtual stage": o.virtual_stage, "op": o.kind}
    parts = []
    if o.recompute_s > 0:
        parts.append(("recompute", "compute", o.recompute_s))
    parts.append((_OP_PART[o.kind], "compute", o.duration_s - o.recompute_s - o.comm_s))
    if o.comm_s > 0:
        parts.append(("TP/CP/EP comm", "comm", o.comm_s))
    out, t = [], o.start_s
    for i, (name, cat, d) in enumerate(parts):
        end = o.end_s if i == len(parts) - 1 else t + d  # the last part ends where the op does, exactly
        out.append(_slice(o.stage, name, cat, t, end, args))
        t = end
    return out


def _ranks(tl, stage: int) -> str:
    """The global ranks of a stage: pp is the slowest-varying dimension (Megatron's order), so stage i holds
    ranks [i * n, (i + 1) * n) with n = tp x cp x dp."""
    n = tl.plan.devices // tl.plan.pp
    return f"rank {stage * n}" if n == 1 else f"ranks {stage * n}-{(stage + 1) * n - 1}"


def trace_events(tl) -> dict:
    """The Chrome trace (a dict ready for json.dump) of a Timeline."""
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": PID, "tid": 0,
                           "args": {"name": f"{tl.model} on {tl.cluster}: {tl.label()}"}}]
    for stage in range(tl.plan.pp):
        events.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": stage,
                       "args": {"name": f"stage {stage} ({_ranks(tl, stage)})"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": stage,
                       "args": {"sort_index": stage}})
    slices = [s for o in tl.ops for s in _op_slices(o)]
    for g in tl.gaps:
        name, cat = ("p2p wait", "comm") if g["kind"] == "p2p" else ("bubble", "idle")
        slices.append(_slice(g["stage"], name, cat, g["start_s"], g["end_s"]))
    for stage in range(tl.plan.pp):
        t = tl.pipeline_s
        for key, name, cat in _TAIL:
            d = tl.tail.get(key, 0.0)
            if d > 0:
                slices.append(_slice(stage, name, cat, t, t + d))
                t += d
    slices.sort(key=lambda e: (e["tid"], e["ts"]))
    est = tl.estimate
    return {"traceEvents": events + slices, "displayTimeUnit": "ms",
            "otherData": {"model": tl.model, "cluster": tl.cluster, "plan": tl.label(),
                          "schedule": tl.plan.schedule, "microbatches": tl.microbatches,
                          "step_time_s": tl.step_time_s, "tokens_per_s": est.tokens_per_s, "mfu": est.mfu}}


def write_trace(tl, path) -> int:
    """Write the trace of a Timeline (planner.files.write_atomic; the caller has run check_output); the number
    of slices written."""
    from planner.files import write_atomic

    trace = trace_events(tl)
    write_atomic(path, json.dumps(trace, separators=(",", ":")))
    return sum(1 for e in trace["traceEvents"] if e["ph"] == "X")
