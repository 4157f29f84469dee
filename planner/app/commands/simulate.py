"""`planner simulate`: the timeline of one step of a plan file (planner/app/viz.py) as text, JSON events, an
image (planner/app/gantt.py) or a Chrome trace (planner/app/trace.py, --trace)."""
from __future__ import annotations

from pathlib import Path

from planner.app.commands.output import emit
from planner.core.errors import BadInput


def cmd_simulate(args) -> None:
    from planner.app.trace import write_trace
    from planner.app.viz import plot_timeline, timeline
    from planner.files import check_output
    from planner.planfile import load_plan_file

    if args.output == "":
        raise BadInput("-o '': give an image file name (.png, .svg or .pdf), or leave -o out")
    out = Path(args.output) if args.output else None
    trace = Path(args.trace) if args.trace is not None else None
    if out is None and not args.json and trace is None:
        out = Path(args.plan).with_suffix(".timeline.png")
    # refuse before simulating, not after
    if out is not None:
        if out.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise BadInput(f"{out}: unknown image format '{out.suffix}'; use .png, .svg or .pdf")
        check_output(out, args.force)
    if trace is not None:
        check_output(trace, args.force, "--trace")
        if out is not None and trace.resolve() == out.resolve():
            raise BadInput(f"--trace {trace} is also the image file (-o); give them different names")
    loaded = load_plan_file(args.plan)
    pf = loaded.pf
    tl = timeline(loaded.model, loaded.cluster, pf.workload, pf.plan, loaded.estimate)
    if out is not None:
        plot_timeline(tl, str(out))
    slices = write_trace(tl, trace) if trace is not None else 0
    tail = tl.tail
    lines = [f"{tl.model} on {tl.cluster} ({tl.devices} devices): {tl.label()}",
             f"{pf.plan.schedule}, {tl.microbatches} micro-batches: step {tl.step_time_s:.4g} s = pipeline "
             f"{tl.pipeline_s:.4g} s + exposed DP sync {tail['dp_comm_exposed_s']:.3g} s + optimizer "
             f"{tail['optimizer_s']:.3g} s" + (f" + offload {tail['offload_s']:.3g} s" if tail["offload_s"] else ""),
             f"{'stage':>5} {'warm-up F':>9} {'steady F+B':>10} {'cool-down B':>11} {'busy s':>9} {'idle':>6} "
             f"{'memory GB':>13}"]
    cap = tl.estimate.memory_capacity_bytes / 1e9
    for st in tl.stages:
        mem = st.get("memory", {}).get("total_bytes", 0.0) / 1e9
        lines.append(f"{st['stage']:>5} {st['warmup_forwards']:>9} {st['steady_pairs']:>10} "
                     f"{st['cooldown_backwards']:>11} {st['busy_s']:9.4g} {st['idle_s'] / tl.pipeline_s:6.1%} "
                     f"{mem:6.1f} / {cap:<4.0f}")
    if out is not None:
        lines.append(f"timeline written to {out}")
    if trace is not None:
        lines.append(f"trace written to {trace} ({slices:,} slices, one track per stage; open it in "
                     "ui.perfetto.dev or chrome://tracing)")
    emit(tl.as_dict(), args.json, "\n".join(lines))


def register(sub) -> None:
    """Adds `simulate PLAN.json`."""
    sim = sub.add_parser("simulate", help="timeline of one step of a plan file: Gantt chart, memory, events")
    sim.add_argument("plan", metavar="PLAN.json", help="a plan file (plan --save)")
    sim.add_argument("-o", "--output", metavar="FILE",
                     help="image to write (.png, .svg, .pdf); default PLAN.timeline.png, none with --json or --trace")
    sim.add_argument("--trace", metavar="TRACE.json",
                     help="also write Chrome trace events (Perfetto, chrome://tracing): a track per stage")
    sim.add_argument("--json", action="store_true", help="print the event list (every op, gap and phase)")
    sim.add_argument("--force", action="store_true", help="overwrite an existing image or trace")
    sim.set_defaults(func=cmd_simulate)
