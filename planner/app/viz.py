"""One training step as the cost model sees it: a timeline (Gantt chart, a row per pipeline stage) and a
per-stage memory chart, drawn with matplotlib's Agg backend (no display needed).

`timeline(model, cluster, workload, plan)` reruns the cost model's own pipeline simulation
(planner.cost.pipeline.simulate, the event-list twin of the simulate_times that estimate() calls) on the
per-chunk forward and backward times estimate() computes, with the same stage-to-stage transfer time. So the
simulated makespan plus the step-level terms estimate() adds after it (exposed data-parallel gradient
traffic, optimizer step, offload) is estimate()'s step_time_s; `Timeline.consistent` says whether they agree
(tests hold it true).

Inside an op the chart splits the time into the parts estimate() attributes to each layer:
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
from typing import Any

import numpy as np

from planner.core.plan import Estimate, ParallelPlan, Workload

# Share of each layer's exposed ring-attention (cp) traffic that belongs to its forward pass (estimate():
# a third of the K/V traffic is the forward's, two thirds the backward's).
CP_FORWARD_SHARE = 1 / 3
DPI = 100
WIDTH_IN = 16.0

COLORS = {
    "forward": "#2b6cb0",
    "backward": "#dd6b20",
    "weight-grad": "#d69e2e",
    "recompute": "#805ad5",
    "comm": "#e53e3e",
    "p2p": "#fc8181",
    "bubble": "#e2e8f0",
    "dp-comm": "#c53030",
    "optimizer": "#2f855a",
    "offload": "#718096",
}
MEMORY_COLORS = {
    "weights_bytes": ("weights", "#2b6cb0"),
    "gradients_bytes": ("gradients", "#dd6b20"),
    "optimizer_bytes": ("optimizer states", "#2f855a"),
    "activations_bytes": ("activations", "#805ad5"),
    "backward_working_bytes": ("backward working set", "#b794f4"),
    "logits_transient_bytes": ("loss logits copy", "#d6bcfa"),
    "seq_chunk_kv_bytes": ("K/V kept for later sequence chunks", "#fbb6ce"),
    "cp_ring_buffers_bytes": ("ring attention step buffers", "#feb2b2"),
    "overhead_bytes": ("allocator overhead", "#a0aec0"),
}


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


# ---------------------------------------------------------------------------------------------------------
# drawing


def figure_size_px(pp: int) -> tuple[int, int]:
    """(width, height) in pixels of the figure `plot_timeline` draws for a pipeline of pp stages."""
    w, h = _figsize(pp)
    return int(round(w * DPI)), int(round(h * DPI))


def _figsize(pp: int) -> tuple[float, float]:
    return WIDTH_IN, min(16.0, 3.2 + 0.7 * max(pp, 2))


def _shade(color: str, chunk: int, v: int):
    """The chunk's shade of a colour: chunk 0 full, later chunks lighter (interleaved schedules)."""
    from matplotlib.colors import to_rgb

    if v <= 1:
        return to_rgb(color)
    t = 0.55 * chunk / (v - 1)
    r, g, b = to_rgb(color)
    return (r + (1 - r) * t, g + (1 - g) * t, b + (1 - b) * t)


def plot_timeline(tl: Timeline, path: str | None = None, title: str | None = None):
    """Draw the Gantt chart (left) and per-stage memory (right, aligned with the stage rows) of a Timeline.

    Returns the matplotlib Figure; with `path`, also writes it (format from the suffix: png, svg, pdf)
    through a temporary file and os.replace. Uses the Agg canvas, never a display.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    p, v = tl.plan.pp, tl.plan.vpp
    fig = Figure(figsize=_figsize(p), dpi=DPI)
    gs = fig.add_gridspec(1, 2, width_ratios=[4.2, 1.0], wspace=0.08, left=0.06, right=0.98, top=0.86,
                          bottom=0.2)
    ax = fig.add_subplot(gs[0, 0])
    axm = fig.add_subplot(gs[0, 1], sharey=ax)
    height = 0.72
    step = tl.step_time_s
    scale, unit = (1e3, "ms") if step < 2 else (1.0, "s")

    def bar(stage, segs, color, hatch=None, edge="none"):
        if segs:
            ax.broken_barh([(a * scale, w * scale) for a, w in segs], (stage - height / 2, height),
                           facecolors=color, edgecolors=edge, linewidth=0.3, hatch=hatch)

    label_ops = max((s["ops"] for s in tl.stages), default=0) <= 48
    for stage in range(p):
        y = stage
        by: dict[Any, list] = {}
        for o in tl.stage_ops(stage):
            t = o.start_s
            if o.kind == "F":
                work = o.duration_s - o.comm_s
                by.setdefault(("forward", o.chunk), []).append((t, work))
                t += work
            elif o.kind == "B":
                if o.recompute_s > 0:
                    by.setdefault(("recompute", 0), []).append((t, o.recompute_s))
                    t += o.recompute_s
                work = o.duration_s - o.recompute_s - o.comm_s
                by.setdefault(("backward", o.chunk), []).append((t, work))
                t += work
            else:
                by.setdefault(("weight-grad", o.chunk), []).append((t, o.duration_s))
                t = o.end_s
            if o.comm_s > 0:
                by.setdefault(("comm", 0), []).append((t, o.comm_s))
            if label_ops and o.duration_s * scale > 0:
                ax.text((o.start_s + o.duration_s / 2) * scale, y, str(o.microbatch), ha="center",
                        va="center", fontsize=6.5, color="white" if o.kind == "F" else "black", clip_on=True)
        for (kind, chunk), segs in by.items():
            color = _shade(COLORS[kind], chunk, v) if kind in ("forward", "backward", "weight-grad") else COLORS[kind]
            bar(y, segs, color, edge="white" if kind in ("forward", "backward", "weight-grad") else "none")
        gaps = [g for g in tl.gaps if g["stage"] == stage]
        bar(y, [(g["start_s"], g["end_s"] - g["start_s"]) for g in gaps if g["kind"] == "bubble"], COLORS["bubble"])
        bar(y, [(g["start_s"], g["end_s"] - g["start_s"]) for g in gaps if g["kind"] == "p2p"], COLORS["p2p"])
        t = tl.pipeline_s
        for key, name in (("dp_comm_exposed_s", "dp-comm"), ("optimizer_s", "optimizer"), ("offload_s", "offload")):
            d = tl.tail.get(key, 0.0)
            if d > 0:
                bar(y, [(t, d)], COLORS[name])
                t += d
        # phase boundaries: end of warm-up, start of cool-down
        spans = tl.phase_spans(stage)
        for name, lo, hi in spans:
            if name == "steady 1F1B":
                for x in (lo, hi):
                    ax.plot([x * scale, x * scale], [y - 0.5, y + 0.5], color="black", lw=1.0, ls=(0, (2, 2)))

    # phase names above the first stage
    for name, a, b in tl.phase_spans(0):
        ax.annotate("", xy=(a * scale, -0.62), xytext=(b * scale, -0.62),
                    arrowprops=dict(arrowstyle="|-|", lw=0.8, shrinkA=0, shrinkB=0, mutation_scale=3))
        ax.text((a + b) / 2 * scale, -0.72, f"{name} (stage 0)", ha="center", va="bottom", fontsize=8)

    ax.set_ylim(p - 0.5, -1.0)
    ax.set_yticks(range(p))
    ax.set_yticklabels([f"stage {i}" for i in range(p)])
    ax.set_xlim(0, step * scale * 1.005)
    ax.set_xlabel(f"time in the step ({unit})")
    ax.grid(axis="x", color="#cbd5e0", lw=0.5)
    ax.set_axisbelow(True)

    # memory: stacked horizontal bars per stage, capacity as a line
    gb = 1e9
    left = np.zeros(p)
    for key, (name, color) in MEMORY_COLORS.items():
        vals = np.array([s.get("memory", {}).get(key, 0.0) / gb for s in tl.stages])
        axm.barh(range(p), vals, left=left, height=height, color=color, label=name)
        left += vals
    cap = tl.estimate.memory_capacity_bytes / gb
    axm.axvline(cap, color="black", lw=1.2, ls="--")
    axm.text(cap * 0.97, -0.62, f"capacity {cap:.0f} GB", ha="right", va="bottom", fontsize=8)
    for i, total in enumerate(left):
        axm.text(total, i, f" {total:.1f}", va="center", fontsize=7)
    axm.set_xlim(0, max(cap, float(left.max()) if p else 0.0) * 1.18)
    axm.set_xlabel("memory per device (GB)")
    axm.tick_params(axis="y", labelleft=False)
    axm.grid(axis="x", color="#cbd5e0", lw=0.5)
    axm.set_axisbelow(True)

    handles = []
    if v > 3:  # the first and last chunk's shades: later chunks are lighter
        for kind in ("forward", "backward"):
            handles += [Patch(color=_shade(COLORS[kind], 0, v), label=f"{kind}, chunk 0"),
                        Patch(color=_shade(COLORS[kind], v - 1, v), label=f"{kind}, chunk {v - 1} (lighter)")]
    elif v > 1:
        handles += [Patch(color=_shade(COLORS["forward"], c, v), label=f"forward, chunk {c}") for c in range(v)]
        handles += [Patch(color=_shade(COLORS["backward"], c, v), label=f"backward, chunk {c}") for c in range(v)]
    else:
        handles += [Patch(color=COLORS["forward"], label="forward"), Patch(color=COLORS["backward"], label="backward")]
    if any(o.kind == "W" for o in tl.ops):
        handles.append(Patch(color=COLORS["weight-grad"], label="weight gradient (W)"))
    present = {"recompute": any(o.recompute_s > 0 for o in tl.ops), "comm": any(o.comm_s > 0 for o in tl.ops),
               "p2p": any(g["kind"] == "p2p" for g in tl.gaps), "bubble": True,
               "dp-comm": tl.tail.get("dp_comm_exposed_s", 0.0) > 0, "optimizer": tl.tail.get("optimizer_s", 0.0) > 0,
               "offload": tl.tail.get("offload_s", 0.0) > 0}
    names = {"recompute": "recompute", "comm": "exposed TP/CP/EP comm.", "p2p": "waiting on p2p transfer",
             "bubble": "bubble (idle)", "dp-comm": "exposed DP grad. sync", "optimizer": "optimizer step",
             "offload": "offload"}
    handles += [Patch(color=COLORS[k], label=names[k]) for k, on in present.items() if on]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.12), ncol=min(7, len(handles)),
              fontsize=7.5, frameon=False)
    axm.legend(loc="upper left", bbox_to_anchor=(0.0, -0.12), ncol=2, fontsize=7, frameon=False)

    est = tl.estimate
    plan = tl.plan
    bubble = sum(g["end_s"] - g["start_s"] for g in tl.gaps if g["stage"] == 0)
    fig.suptitle(title or (
        f"{tl.model} on {tl.cluster} ({tl.devices} devices): {tl.label()}\n"
        f"{tl.microbatches} micro-batches of {plan.mbs} x {tl.workload.seq_len} tokens; "
        f"step {tl.step_time_s * scale:.4g} {unit}, "
        f"{est.tokens_per_s:,.0f} tokens/s, MFU {est.mfu:.1%}; stage 0 idle {bubble / step:.1%}"
        f"{'' if est.fits else '; DOES NOT FIT'}"), fontsize=10.5)
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig, path, formats=("png", "svg", "pdf")) -> None:
    """Write a matplotlib Figure atomically (rendered in memory, then planner.files.write_atomic)."""
    import io
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from planner.core.errors import BadInput
    from planner.files import write_atomic

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in formats:
        raise BadInput(f"{path}: unknown image format '{path.suffix}'; use one of "
                       + ", ".join("." + f for f in formats))
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI)
    write_atomic(path, buf.getvalue())


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG file, read from its IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def plot_breakdown(table, ax=None, title: str | None = None):
    """Stacked horizontal bars of the step-time breakdown of each plan of a planner.app.api.plan() table (or of
    a list of (label, Estimate)). Returns the Axes."""
    import matplotlib.pyplot as plt

    rows = _breakdown_rows(table)
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * max(len(rows), 1)))
    keys = [k for k in ("compute_s", "recompute_s", "tp_comm_s", "cp_comm_s", "ep_comm_s", "pp_comm_s",
                        "pipeline_bubble_s", "dp_comm_exposed_s", "optimizer_s", "offload_s")
            if any(bd.get(k, 0.0) > 0 for _, bd in rows)]
    colors = {"compute_s": COLORS["forward"], "recompute_s": COLORS["recompute"], "tp_comm_s": COLORS["comm"],
              "cp_comm_s": "#f6ad55", "ep_comm_s": "#ed64a6", "pp_comm_s": COLORS["p2p"],
              "pipeline_bubble_s": "#a0aec0", "dp_comm_exposed_s": COLORS["dp-comm"],
              "optimizer_s": COLORS["optimizer"], "offload_s": COLORS["offload"]}
    left = np.zeros(len(rows))
    for k in keys:
        vals = np.array([bd.get(k, 0.0) for _, bd in rows])
        ax.barh(range(len(rows)), vals, left=left, color=colors.get(k), label=k.removesuffix("_s").replace("_", " "))
        left += vals
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([name for name, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per step (busiest stage; compute and comm overlap where the model says so)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    if title:
        ax.set_title(title)
    return ax


def _breakdown_rows(table) -> list[tuple[str, dict]]:
    if hasattr(table, "columns") and "estimate" in getattr(table, "columns", ()):
        labels = table["label"] if "label" in table.columns else table.index.astype(str)
        return [(f"#{i} {lab}" if isinstance(i, (int, np.integer)) else str(i), est.breakdown)
                for i, lab, est in zip(table.index, labels, table["estimate"])]
    return [(str(name), est.breakdown) for name, est in table]
