"""`planner diff A.json B.json`: what changed between two plan files and the predicted effect of each change
(planner/app/plan_diff.py)."""
from __future__ import annotations

from planner.app.commands.output import emit

CHANGES_CHARS = 40  # of the table's "changes" column; the full list is printed above the table


def _context(side: dict) -> str:
    nodes = f" x{side['nodes']}" if side["nodes"] is not None else ""
    return f"{side['model']} on {side['cluster']}{nodes}"


def _step_changes(step) -> str:
    text = ", ".join(f"{c['field'].removeprefix('plan.')} {_short(c['a'])}->{_short(c['b'])}"
                     if c["field"] != "plan.partition" else "partition" if c["b"] else "even split"
                     for c in step.changes)
    return text if len(text) <= CHANGES_CHARS else text[:CHANGES_CHARS - 3] + "..."


def _short(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return "null" if v is None else str(v)


def _deltas(delta: dict, values: dict) -> str:
    """The step-time, throughput and memory columns; a change below rounding noise prints as 0."""
    def noise(k):
        return abs(delta[k]) <= 1e-12 * abs(values[k])

    dt = "0" if noise("step_time_s") else f"{delta['step_time_s']:+.3g}"
    tok = "0" if noise("tokens_per_s") else f"{delta['tokens_per_s']:+,.0f}"
    mem = "0" if noise("peak_memory_bytes") else f"{delta['peak_memory_bytes'] / 1e9:+.1f}"
    return f"{dt:>10} {tok:>10} {mem:>10}"


def report_text(d) -> str:
    from planner.app.plan_diff import show

    lines = [f"A  {d.a['path']}: {_context(d.a)}: {d.a['label']}",
             f"B  {d.b['path']}: {_context(d.b)}: {d.b['label']}"]
    if not d.changes:
        return "\n".join(lines + [d.as_dict()["summary"]])
    lines.append("changed:")
    width = max(len(c["field"]) for c in d.changes)
    lines += [f"  {c['field']:<{width}}  {show(c['field'], c['a'])} -> {show(c['field'], c['b'])}"
              for c in d.changes]
    names = [s.group if s.valid else f"({s.group})" for s in d.steps]
    w = max([len("total (B - A)")] + [len(n) for n in names])
    lines += ["", "effect of B's changes applied to A one group at a time (re-estimated after each):",
              f"{'step':<{w}} {'changes':<{CHANGES_CHARS}} {'step s':>8} {'+/- step s':>10} {'+/- tok/s':>10} "
              f"{'+/- mem GB':>10}",
              f"{'A':<{w}} {'':<{CHANGES_CHARS}} {d.a['step_time_s']:8.4g}"]
    for s, name in zip(d.steps, names):
        if not s.valid:
            lines.append(f"{name:<{w}} {_step_changes(s):<{CHANGES_CHARS}} skipped: invalid alone")
            continue
        lines.append(f"{name:<{w}} {_step_changes(s):<{CHANGES_CHARS}} {s.values['step_time_s']:8.4g} "
                     + _deltas(s.delta, s.values)
                     + (f"  incl. {', '.join(s.includes)}" if s.includes else "")
                     + ("" if s.fits else "  does not fit"))
    t = d.total
    lines.append(f"{'total (B - A)':<{w}} {'':<{CHANGES_CHARS}} {d.b['step_time_s']:8.4g} " + _deltas(t, d.b))
    for s in d.steps:
        if not s.valid:
            lines.append(f"skipped ({s.group}): {s.reason}; its effect is in the next step")
    lines.append(d.as_dict()["summary"])
    return "\n".join(lines)


def cmd_diff(args) -> None:
    from planner.app.plan_diff import diff_plans

    d = diff_plans(args.a, args.b)
    emit(d.as_dict(), args.json, report_text(d))


def register(sub) -> None:
    """Adds `diff A.json B.json`."""
    di = sub.add_parser("diff", help="what changed between two plan files and the predicted effect of each change")
    di.add_argument("a", metavar="A.json", help="a plan file (plan --save): the baseline")
    di.add_argument("b", metavar="B.json", help="a plan file: the one compared with A")
    di.add_argument("--json", action="store_true", help="the changes, each step's deltas and the totals as JSON")
    di.set_defaults(func=cmd_diff)
