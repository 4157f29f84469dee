"""`planner backtest`: predict a table of published runs and report the error of each and overall."""
from __future__ import annotations

import sys

from planner.app import table
from planner.app.commands.output import emit, request_of
from planner.core.errors import BadInput


def cmd_backtest(args) -> None:
    from planner.eval.backtest import run_backtest

    res = run_backtest(args.runs)
    answer = {"request": request_of(args), **res}
    if args.json:
        if res["rows_ok"]:  # else the report goes out with the error object below (one JSON document)
            emit(answer, True, "")
    else:
        emit(None, False, _as_text(res, args))
    bugs = f", {res['internal_errors']} of them by an internal error of the planner (a bug)" \
        if res["internal_errors"] else ""
    if not res["rows_ok"]:
        # exit 2, not 1: every row was skipped for what the table says (its cells, or a configuration the
        # cost model refuses), so the fix is in the file; the report above says why for each row.
        first = next((r for r in res["rows"] if not r["reason"].startswith("unusable")), res["rows"][0])
        raise BadInput(f"{args.runs}: no row could be predicted ({res['rows_skipped']} skipped{bugs}; first: "
                       f"id {first['id']!r}: {first['reason']})", answer=answer)
    if bugs:
        print(f"warning: {res['rows_skipped']} rows skipped{bugs}; their reasons say where", file=sys.stderr)


# the default view: each run's error; --wide adds the status and what was assumed for unprinted settings
BACKTEST_COLUMNS = ["id", "source_code", "target", "measured", "predicted", "error_pct", "note"]
BACKTEST_WIDE_COLUMNS = ["id", "source_code", "target", "measured", "predicted", "error_pct", "status", "assumed",
                         "note"]
BACKTEST_HEADERS = {"source_code": "source", "error_pct": "error %"}
BACKTEST_FORMATS = {"measured": lambda v: f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}",
                    "predicted": lambda v: f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}", "error_pct": "+.1f"}


def _as_text(res: dict, args) -> str:
    """The rows in args.format, then (table, markdown) the MAPE per source and overall."""
    rows = [{**r, "note": f"skipped: {r['reason']}" if r["status"] != "ok" else "",
             "assumed": " ".join(f"{k}={v}" for k, v in r["assumed"].items()) or None} for r in res["rows"]]
    body = table.render(rows, args.format, columns=BACKTEST_COLUMNS, wide=args.wide,
                        wide_columns=BACKTEST_WIDE_COLUMNS, formats=BACKTEST_FORMATS, headers=BACKTEST_HEADERS)
    if args.format == "csv":
        return body
    mape = "n/a" if res["mape_pct"] is None else f"{res['mape_pct']:.1f}%"
    overall = (f"overall MAPE {mape}  coverage {res['coverage']:.0%}  "
               f"({res['rows_ok']} predicted, {res['rows_skipped']} skipped)")
    by_source = [{"source": k, "MAPE %": v} for k, v in res["by_source"].items()]
    summary = table.render(by_source, args.format, formats={"MAPE %": ".1f"}, wide=args.wide)
    return "\n\n".join([body, summary, table.wrap(overall) if args.format == "table" else overall])


def register(sub) -> None:
    """Adds `backtest --runs CSV`."""
    bt = sub.add_parser("backtest", help="predict a table of published runs and report the error")
    bt.add_argument("--runs", required=True, help="CSV in the columns of calibration_runs_clean.csv")
    table.add_format_flags(bt)
    bt.set_defaults(func=cmd_backtest)
