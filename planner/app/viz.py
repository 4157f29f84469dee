"""One training step as the cost model sees it: every op, idle gap and step-level term of the simulated step
(a Timeline), which planner/app/gantt.py draws (Gantt chart and per-stage memory) and planner/app/trace.py
writes as Chrome trace events.

`timeline(model, cluster, workload, plan)` reruns the cost model's own pipeline simulation
(planner.cost.pipeline.simulate, the event-list twin of the simulate_times that estimate() calls) on the
per-chunk forward and backward times estimate() computes, with the same stage-to-stage transfer time. So the
simulated makespan plus the step-level terms estimate() adds after it (exposed data-parallel gradient
traffic, optimizer step, offload) is estimate()'s step_time_s; `Timeline.consistent` says whether they agree
(tests hold it true).

Inside an op the chart and the trace split the time into the parts estimate() attributes to each layer:
  forward op   forward compute, then the exposed communication of the forward (half of the TP and EP traffic
               and a third of the ring-attention traffic: the forward's share);
  backward op  recompute (a forward re-run, before the backward), backward compute, then the backward's
               exposed communication;
  W op         (zb-h1) weight-gradient compute.
The parts are drawn one after the other within the op: the cost model sums them per layer, it does not say
where in the op each lies. Gaps in a row are idle time: the part of a wait that is the activation (or
gradient) transfer from the neighbouring stage (p2p) is exposed communication, the rest is pipeline bubble.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# the drawing lives in planner/app/gantt.py; these names stay importable from here (planner.app.api uses them)
from planner.app.gantt import (  # noqa: F401
    COLORS,
    DPI,
    MEMORY_COLORS,
    figure_size_px,
    plot_breakdown,
    plot_timeline,
    png_size,
    save_figure,
)
from planner.core.plan import Estimate, ParallelPlan, Workload

# Share of each layer's exposed ring-attention (cp) traffic that belongs to its forward pass (estimate():
# a third of the K/V traffic is the forward's, two thirds the backward's).
CP_FORWARD_SHARE = 1 / 3


@dataclass(frozen=True)
class Op:
    """One scheduled op of one micro-batch on one pipeline stage (kind F, B or W; chunk: the model chunk
    on that stage, virtual stage chunk * pp + stage), with the parts of its time the chart colours."""

    stage: int
    kind: str
    microbatch: int
    chunk: int
    virtual_stage: int
    start_s: float
    end_s: float
    recompute_s: float = 0.0
    comm_s: float = 0.0

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def as_dict(self) -> dict:
        return {"stage": self.stage, "kind": self.kind, "microbatch": self.microbatch, "chunk": self.chunk,
                "virtual_stage": self.virtual_stage, "start_s": self.start_s, "end_s": self.end_s,
                "recompute_s": self.recompute_s, "comm_s": self.comm_s}


@dataclass
class Timeline:
    """One step: every op, the idle gaps (bubble or p2p wait), the step-level tail, per-stage phases and
    memory, and the Estimate it came from."""

    model: str
    cluster: str
    devices: int
    plan: ParallelPlan
    workload: Workload
    estimate: Estimate
    microbatches: int
    p2p_s: float
    pipeline_s: float  # the simulated makespan
    tail: dict[str, float]  # what estimate() adds after the makespan, in order
    ops: list[Op]
    gaps: list[dict]  # {"stage", "kind": "bubble" | "p2p", "start_s", "end_s"}
    stages: list[dict] = field(default_factory=list)
    consistent: bool = True  # pipeline_s + tail == estimate.step_time_s (relative 1e-9)

    @property
    def step_time_s(self) -> float:
        return self.pipeline_s + sum(self.tail.values())

    def stage_ops(self, stage: int) -> list[Op]:
        return sorted((o for o in self.ops if o.stage == stage), key=lambda o: o.start_s)

    def kinds(self, stage: int) -> str:
        """The stage's op kinds in the order it runs them, e.g. 'FFFFFBFBFB...BBB'."""
        return "".join(o.kind for o in self.stage_ops(stage))

    def phase_spans(self, stage: int) -> list[tuple[str, float, float]]:
        """(name, start_s, end_s) of the stage's warm-up, steady 1F1B and cool-down phases (those present)."""
        ops = self.stage_ops(stage)
        fb = [o for o in ops if o.kind != "W"]
        if not fb:
            return []
        ph = phases("".join(o.kind for o in ops), self.plan.schedule)
        w, st = ph["warmup_forwards"], ph["steady_pairs"]
        out = []
        if w:
            out.append(("warm-up", fb[0].start_s, fb[w - 1].end_s))
        if st:
            out.append(("steady 1F1B", fb[w].start_s, fb[w + 2 * st - 1].end_s))
        if ph["cooldown_backwards"]:
            out.append(("cool-down", fb[w + 2 * st].start_s, ops[-1].end_s))
        return out

    def label(self) -> str:
        from planner.search.search import RankedPlan

        return RankedPlan(self.plan, self.estimate).label()

    def as_dict(self) -> dict:
        return {
            "model": self.model, "cluster": self.cluster, "devices": self.devices,
            "schedule": self.plan.schedule, "pp": self.plan.pp, "vpp": self.plan.vpp,
            "microbatches": self.microbatches, "p2p_s": self.p2p_s, "pipeline_s": self.pipeline_s,
            "tail": self.tail, "step_time_s": self.step_time_s,
            "estimate_step_time_s": self.estimate.step_time_s, "consistent": self.consistent,
            "plan": self.plan.model_dump(), "stages": self.stages,
            "events": [o.as_dict() for o in self.ops], "gaps": self.gaps,
        }


# ---------------------------------------------------------------------------------------------------------
# the simulation


def _chunk_times(model, cluster, workload: Workload, plan: ParallelPlan):
    """Per pipeline chunk: one micro-batch's forward and backward time and estimate()'s parts of them
    (compute_s, recompute_s, tp/cp/ep_comm_s), and the stage-to-stage transfer time: the values estimate()
    hands to the pipeline simulation (planner.cost.estimate.chunk_times)."""
    from planner.cost.estimate import chunk_times

    return chunk_times(model, cluster, workload, plan)


def phases(kinds: str, schedule: str = "1f1b") -> dict[str, int]:
    """Warm-up, steady and cool-down of one stage's op sequence (a string of F, B and W).

    Megatron's reading: the warm-up forwards run before the first backward, except the forward that
    opens the steady phase (a forward directly followed by a backward); the steady phase alternates
    one forward and one backward; the cool-down runs the remaining backwards. GPipe has no steady phase
    (all forwards are warm-up). W ops (zb-h1) are left out of the count.
    """
    fb = kinds.replace("W", "")
    lead = len(fb) - len(fb.lstrip("F"))
    n_f, n_b = fb.count("F"), fb.count("B")
    warm = lead if schedule == "gpipe" or n_b == 0 else lead - 1
    steady = n_f - warm
    return {"warmup_forwards": warm, "steady_pairs": steady, "cooldown_backwards": n_b - steady}


def timeline(model, cluster, workload: Workload, plan: ParallelPlan, est: Estimate | None = None) -> Timeline:
    """Simulate one step of `plan` and return its Timeline (BadInput when estimate() refuses the plan)."""
    from planner.core.errors import BadInput
    from planner.cost import pipeline
    from planner.cost.estimate import estimate

    if est is None:
        est = estimate(model, cluster, workload, plan)
    m = plan.microbatches(workload)
    fwd, bwd, parts, p2p_s = _chunk_times(model, cluster, workload, plan)
    try:
        res = pipeline.simulate(plan.schedule, fwd, bwd, m, v=plan.vpp, p2p_s=p2p_s, seq_chunks=plan.seq_chunks)
    except ValueError as e:
        raise BadInput(f"pipeline: {e}") from None
    p, n_virtual = plan.pp, plan.pp * plan.vpp

    ops: list[Op] = []
    for ev in res.events:
        k = ev.chunk * p + ev.device
        pt = parts[k]
        rc = comm = 0.0
        dur = ev.end_s - ev.start_s
        if ev.kind == "F":
            comm = (pt["tp_comm_s"] + pt["ep_comm_s"]) / 2 + CP_FORWARD_SHARE * pt["cp_comm_s"]
        elif ev.kind == "B":
            rc = min(pt["recompute_s"], dur)
            comm = (pt["tp_comm_s"] + pt["ep_comm_s"]) / 2 + (1 - CP_FORWARD_SHARE) * pt["cp_comm_s"]
        comm = max(0.0, min(comm, dur - rc))
        ops.append(Op(stage=ev.device, kind=ev.kind, microbatch=ev.microbatch, chunk=ev.chunk, virtual_stage=k,
                      start_s=ev.start_s, end_s=ev.end_s, recompute_s=rc, comm_s=comm))

    # idle gaps: the p2p part of a wait for a neighbour's op is exposed communication, the rest bubble
    end_of = {(o.kind, o.virtual_stage, o.microbatch): o.end_s for o in ops}
    gaps: list[dict] = []
    pipe_end = res.step_time_s
    eps = 1e-12 * max(pipe_end, 1.0)
    for stage in range(p):
        free = 0.0
        for o in sorted((o for o in ops if o.stage == stage), key=lambda o: o.start_s):
            if o.start_s > free + eps:
                k = o.virtual_stage
                dep = None
                if o.kind == "F" and k > 0:
                    dep = ("F", k - 1, o.microbatch)
                elif o.kind == "B" and k < n_virtual - 1:
                    dep = ("B", k + 1, o.microbatch)
                lo = free
                if dep is not None and p > 1 and p2p_s > 0:
                    dep_end = end_of[dep]
                    if abs(dep_end + p2p_s - o.start_s) <= eps + 1e-9 * o.start_s:
                        mid = max(free, dep_end)
                        if mid > free + eps:
                            gaps.append({"stage": stage, "kind": "bubble", "start_s": free, "end_s": mid})
                        lo = mid
                        gaps.append({"stage": stage, "kind": "p2p", "start_s": lo, "end_s": o.start_s})
                        lo = o.start_s
                if o.start_s > lo + eps:
                    gaps.append({"stage": stage, "kind": "bubble", "start_s": lo, "end_s": o.start_s})
            free = max(free, o.end_s)
        if pipe_end > free + eps:
            gaps.append({"stage": stage, "kind": "bubble", "start_s": free, "end_s": pipe_end})

    bd = est.breakdown
    tail = {"dp_comm_exposed_s": float(bd.get("dp_comm_exposed_s", 0.0)),
            "optimizer_s": float(bd.get("optimizer_s", 0.0)), "offload_s": float(bd.get("offload_s", 0.0))}
    total = pipe_end + sum(tail.values())
    consistent = math.isclose(total, est.step_time_s, rel_tol=1e-9, abs_tol=1e-15)

    tl = Timeline(model=model.name, cluster=cluster.name, devices=cluster.device_count, plan=plan,
                  workload=workload, estimate=est, microbatches=m, p2p_s=p2p_s, pipeline_s=pipe_end, tail=tail,
                  ops=ops, gaps=gaps, consistent=consistent)
    mem_stages = est.stages
    for stage in range(p):
        kinds = tl.kinds(stage)
        busy = res.busy_s[stage]
        info = {"stage": stage, **phases(kinds, plan.schedule), "ops": len(kinds), "busy_s": busy,
                "idle_s": pipe_end - busy, "peak_inflight": res.peak_inflight[stage]}
        if stage < len(mem_stages):
            info["memory"] = {k: v for k, v in mem_stages[stage].items() if k.endswith("_bytes")}
        tl.stages.append(info)
    return tl
