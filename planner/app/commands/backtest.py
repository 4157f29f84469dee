"""`planner backtest`: predict a table of published runs and report the error of each and overall."""
from __future__ import annotations

import sys

from planner.app.commands.output import emit
from planner.core.errors import BadInput


def cmd_backtest(args) -> None:
    from planner.eval.backtest import run_backtest

    res = run_backtest(args.runs)
    lines = [f"{'id':>6} {'source':<14} {'target':<13} {'measured':>12} {'predicted':>12} {'error':>8}"]
    for r in res["rows"]:
        # ids and sources come from the user's file: one line each, however they are written
        rid, src = (" ".join(str(r[k]).split()) for k in ("id", "source_code"))
        if r["status"] == "ok":
            lines.append(f"{rid:>6} {src:<14} {r['target']:<13} {r['measured']:12.4g} "
                         f"{r['predicted']:12.4g} {r['error_pct']:7.1f}%")
        else:
            lines.append(f"{rid:>6} {src:<14} skipped: {' '.join(r['reason'].split())}")
    lines.append("")
    lines.extend(f"{k:<16} MAPE {v:5.1f}%" for k, v in res["by_source"].items())
    mape = "n/a" if res["mape_pct"] is None else f"{res['mape_pct']:.1f}%"
    lines.append(f"overall MAPE {mape}  coverage {res['coverage']:.0%}  "
                 f"({res['rows_ok']} predicted, {res['rows_skipped']} skipped)")
    emit(res, args.json, "\n".join(lines))
    bugs = f", {res['internal_errors']} of them by an internal error of the planner (a bug)" \
        if res["internal_errors"] else ""
    if not res["rows_ok"]:
        # exit 2, not 1: every row was skipped for what the table says (its cells, or a configuration the
        # cost model refuses), so the fix is in the file; the report above says why for each row.
        first = next((r for r in res["rows"] if not r["reason"].startswith("unusable")), res["rows"][0])
        raise BadInput(f"{args.runs}: no row could be predicted ({res['rows_skipped']} skipped{bugs}; first: "
                       f"id {first['id']!r}: {first['reason']})")
    if bugs:
        print(f"warning: {res['rows_skipped']} rows skipped{bugs}; their reasons say where", file=sys.stderr)


def register(sub) -> None:
    """Adds `backtest --runs CSV`."""
    bt = sub.add_parser("backtest", help="predict a table of published runs and report the error")
    bt.add_argument("--runs", required=True, help="CSV in the columns of calibration_runs_clean.csv")
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=cmd_backtest)
