"""Drawing one simulated step (planner.app.viz.Timeline): a Gantt chart, a row per pipeline stage, beside the
per-stage memory; and the step-time breakdown bars of several plans. matplotlib's Agg canvas, no display.

A long pipeline (hundreds of micro-batches) puts thousands of ops on a row a thousand pixels wide: drawn one
by one they read as a barcode. When the typical op would be narrower than MIN_BAR_PX, the chart aggregates:
each stage row splits into a lane per op kind (forward above backward, W below), consecutive ops of a kind
closer than MIN_BAR_PX merge into one span, and only idle gaps at least that wide are drawn. The title says
so. Images are saved cropped to what is drawn (bbox_inches="tight"), so the legends below the axes are kept.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

DPI = 100
WIDTH_IN = 16.0
# narrower than this, an op is a sliver: the chart switches to aggregated lanes (see the module docstring)
MIN_BAR_PX = 2.0

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
KIND_NAMES = {"F": "forward", "B": "backward", "W": "weight-grad"}
TAIL = (("dp_comm_exposed_s", "dp-comm"), ("optimizer_s", "optimizer"), ("offload_s", "offload"))
HEIGHT = 0.72  # of a stage row
LEGEND_GAP_IN = 0.5  # between an axes' bottom edge and its legend: room for tick labels and the axis label


def figure_size_px(pp: int) -> tuple[int, int]:
    """(width, height) in pixels of the figure `plot_timeline` lays out for pp stages, before the saved image
    is cropped to what is drawn (the legends below the axes make it taller)."""
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


def is_dense(tl, px_per_s: float) -> bool:
    """Whether the median op would be drawn narrower than MIN_BAR_PX at px_per_s pixels per second."""
    if not tl.ops:
        return False
    return float(np.median([o.duration_s for o in tl.ops])) * px_per_s < MIN_BAR_PX


def merge_spans(spans, min_gap_s: float) -> list[tuple[float, float]]:
    """(start, end) spans, sorted by start, with those less than min_gap_s apart merged into one."""
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a - out[-1][1] < min_gap_s:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def bar_count(ax) -> int:
    """Bars drawn on a Gantt axes: every rectangle of its broken_barh collections, plus single patches."""
    return sum(len(c.get_paths()) for c in ax.collections) + len(ax.patches)


def _draw_ops(ax, tl, stage: int, scale: float, bar) -> None:
    """Every op of a stage, split into the parts estimate() gives it (recompute, compute, exposed comm)."""
    v = tl.plan.vpp
    by: dict[Any, list] = {}
    label_ops = max((s["ops"] for s in tl.stages), default=0) <= 48
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
            ax.text((o.start_s + o.duration_s / 2) * scale, stage, str(o.microbatch), ha="center",
                    va="center", fontsize=6.5, color="white" if o.kind == "F" else "black", clip_on=True)
    ops_kinds = ("forward", "backward", "weight-grad")
    for (kind, chunk), segs in by.items():
        color = _shade(COLORS[kind], chunk, v) if kind in ops_kinds else COLORS[kind]
        bar(stage, segs, color, edge="white" if kind in ops_kinds else "none")
    gaps = [g for g in tl.gaps if g["stage"] == stage]
    for kind in ("bubble", "p2p"):
        bar(stage, [(g["start_s"], g["end_s"] - g["start_s"]) for g in gaps if g["kind"] == kind], COLORS[kind])


def _draw_aggregated(ax, tl, stage: int, min_s: float, scale: float) -> None:
    """A lane per op kind, consecutive ops of a kind closer than min_s merged; idle gaps of at least min_s."""
    kinds = [k for k in "FBW" if any(o.kind == k for o in tl.ops)]
    lane_h = HEIGHT / len(kinds)
    top = stage - HEIGHT / 2
    ops = tl.stage_ops(stage)
    for i, k in enumerate(kinds):
        spans = merge_spans([(o.start_s, o.end_s) for o in ops if o.kind == k], min_s)
        if spans:
            ax.broken_barh([(a * scale, (b - a) * scale) for a, b in spans], (top + i * lane_h, lane_h),
                           facecolors=COLORS[KIND_NAMES[k]], edgecolors="none")
    # an idle stretch is its consecutive bubble and p2p pieces together; slivers are left out
    idle = merge_spans([(g["start_s"], g["end_s"]) for g in tl.gaps if g["stage"] == stage], 1e-12)
    wide = [(a * scale, (b - a) * scale) for a, b in idle if b - a >= min_s]
    if wide:
        ax.broken_barh(wide, (top, HEIGHT), facecolors=COLORS["bubble"], edgecolors="none")


def plot_timeline(tl, path: str | None = None, title: str | None = None):
    """Draw the Gantt chart (left) and per-stage memory (right, aligned with the stage rows) of a Timeline.

    Returns the matplotlib Figure (its `aggregated` attribute says whether the ops were merged into lanes);
    with `path`, also writes it, cropped to what is drawn (format from the suffix: png, svg, pdf)."""
    from matplotlib.figure import Figure

    p = tl.plan.pp
    fig = Figure(figsize=_figsize(p), dpi=DPI)
    gs = fig.add_gridspec(1, 2, width_ratios=[4.2, 1.0], wspace=0.08, left=0.06, right=0.98, top=0.86,
                          bottom=0.2)
    ax = fig.add_subplot(gs[0, 0])
    axm = fig.add_subplot(gs[0, 1], sharey=ax)
    step = tl.step_time_s
    scale, unit = (1e3, "ms") if step < 2 else (1.0, "s")
    x_max_s = step * 1.005
    px_per_s = ax.get_window_extent().width / x_max_s  # the axes' place is fixed by the gridspec already
    dense = is_dense(tl, px_per_s)
    min_s = MIN_BAR_PX / px_per_s

    def bar(stage, segs, color, edge="none"):
        if segs:
            ax.broken_barh([(a * scale, w * scale) for a, w in segs], (stage - HEIGHT / 2, HEIGHT),
                           facecolors=color, edgecolors=edge, linewidth=0.3)

    for stage in range(p):
        if dense:
            _draw_aggregated(ax, tl, stage, min_s, scale)
        else:
            _draw_ops(ax, tl, stage, scale, bar)
        t = tl.pipeline_s
        for key, name in TAIL:
            d = tl.tail.get(key, 0.0)
            if d > 0:
                bar(stage, [(t, d)], COLORS[name])
                t += d
        # phase boundaries: end of warm-up, start of cool-down
        for name, lo, hi in tl.phase_spans(stage):
            if name == "steady 1F1B":
                for x in (lo, hi):
                    ax.plot([x * scale, x * scale], [stage - 0.5, stage + 0.5], color="black", lw=1.0,
                            ls=(0, (2, 2)))

    # phase names above the first stage
    for name, a, b in tl.phase_spans(0):
        ax.annotate("", xy=(a * scale, -0.62), xytext=(b * scale, -0.62),
                    arrowprops=dict(arrowstyle="|-|", lw=0.8, shrinkA=0, shrinkB=0, mutation_scale=3))
        ax.text((a + b) / 2 * scale, -0.72, f"{name} (stage 0)", ha="center", va="bottom", fontsize=8)

    ax.set_ylim(p - 0.5, -1.0)
    ax.set_yticks(range(p))
    # the idle share per row: in an aggregated chart the steady phase's small waits are not drawn
    ax.set_yticklabels([f"stage {i}\nidle {s['idle_s'] / tl.pipeline_s:.1%}" if tl.pipeline_s > 0 else f"stage {i}"
                        for i, s in enumerate(tl.stages)], fontsize=8.5)
    ax.set_xlim(0, x_max_s * scale)
    ax.set_xlabel(f"time in the step ({unit})")
    ax.grid(axis="x", color="#cbd5e0", lw=0.5)
    ax.set_axisbelow(True)
    _draw_memory(axm, tl)
    handles = _legend_handles(tl, dense)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, 0.0), bbox_transform=_below(ax),
              ncol=min(7, len(handles)), fontsize=7.5, frameon=False)
    fig.suptitle(title or _title(tl, scale, unit, dense), fontsize=10.5)
    fig.aggregated = dense
    if path is not None:
        save_figure(fig, path)
    return fig


def _draw_memory(axm, tl) -> None:
    """Stacked horizontal bars per stage, the device capacity as a line."""
    p, gb = tl.plan.pp, 1e9
    left = np.zeros(p)
    for key, (name, color) in MEMORY_COLORS.items():
        vals = np.array([s.get("memory", {}).get(key, 0.0) / gb for s in tl.stages])
        axm.barh(range(p), vals, left=left, height=HEIGHT, color=color, label=name)
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
    axm.legend(loc="upper left", bbox_to_anchor=(0.0, 0.0), bbox_transform=_below(axm), ncol=2, fontsize=7,
               frameon=False)


def _below(ax):
    """Axes coordinates moved LEGEND_GAP_IN down: a legend anchored at (0, 0) clears the tick labels and the
    axis label whatever the axes' height (an axes fraction would not, on a short two-stage chart)."""
    from matplotlib.transforms import ScaledTranslation

    return ax.transAxes + ScaledTranslation(0, -LEGEND_GAP_IN, ax.figure.dpi_scale_trans)


def _legend_handles(tl, dense: bool) -> list:
    from matplotlib.patches import Patch

    v = tl.plan.vpp
    handles = []
    if dense:
        handles += [Patch(color=COLORS["forward"], label="forward (upper lane)"),
                    Patch(color=COLORS["backward"], label="backward (lower lane)")]
    elif v > 3:  # the first and last chunk's shades: later chunks are lighter
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
    present = {"recompute": not dense and any(o.recompute_s > 0 for o in tl.ops),
               "comm": not dense and any(o.comm_s > 0 for o in tl.ops),
               "p2p": not dense and any(g["kind"] == "p2p" for g in tl.gaps), "bubble": True,
               "dp-comm": tl.tail.get("dp_comm_exposed_s", 0.0) > 0, "optimizer": tl.tail.get("optimizer_s", 0.0) > 0,
               "offload": tl.tail.get("offload_s", 0.0) > 0}
    names = {"recompute": "recompute", "comm": "exposed TP/CP/EP comm.", "p2p": "waiting on p2p transfer",
             "bubble": "bubble (idle)" if not dense else f"idle (>= {MIN_BAR_PX:g} px)",
             "dp-comm": "exposed DP grad. sync", "optimizer": "optimizer step", "offload": "offload"}
    return handles + [Patch(color=COLORS[k], label=names[k]) for k, on in present.items() if on]


def _title(tl, scale: float, unit: str, dense: bool) -> str:
    est, plan, step = tl.estimate, tl.plan, tl.step_time_s
    bubble = sum(g["end_s"] - g["start_s"] for g in tl.gaps if g["stage"] == 0)
    text = (f"{tl.model} on {tl.cluster} ({tl.devices} devices): {tl.label()}\n"
            f"{tl.microbatches} micro-batches of {plan.mbs} x {tl.workload.seq_len} tokens; "
            f"step {step * scale:.4g} {unit}, {est.tokens_per_s:,.0f} tokens/s, MFU {est.mfu:.1%}; "
            f"stage 0 idle {bubble / step:.1%}{'' if est.fits else '; DOES NOT FIT'}")
    if dense:
        text += (f"\naggregated (ops under {MIN_BAR_PX:g} px wide): consecutive ops of a kind merged into one span "
                 "per lane, recompute and exposed comm. inside their ops")
    return text


def save_figure(fig, path, formats=("png", "svg", "pdf")) -> None:
    """Write a matplotlib Figure atomically (rendered in memory, then planner.files.write_atomic), cropped to
    what is drawn (bbox_inches="tight": legends outside the axes are kept, empty margins dropped)."""
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
    fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches="tight")
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
