"""`planner sweep`: the what-if grid (planner/app/sweep.py), the best plan of every combination, serially or on a
Dask cluster. Without --format: CSV on stdout, or with -o the CSV file and a summary table on stdout."""
from __future__ import annotations

import json
from pathlib import Path

from planner.app.commands.output import emit

# the summary's and --format table/markdown's default view, in priority order; --wide: every column by name
VIEW_FORMATS = {"step s": ".3f", "tokens/s": ",.0f", "MFU": ".1%", "mem GB": ".1f"}
WIDE_FORMATS = {"step_time_s": ".3f", "tokens_per_s": ",.0f", "mfu": ".1%", "hfu": ".1%", "peak_memory_gb": ".1f",
                "memory_capacity_gb": ".0f", "bubble_s": ".3g", "search_s": ".2f"}
# integer columns that pandas holds as floats once a cell without a plan leaves them empty
INT_COLUMNS = ("nodes", "devices", "seq", "gbs", "tp", "pp", "dp", "vpp", "cp", "ep", "zero", "mbs", "evaluated")


def _records(df) -> list[dict]:
    """The rows as dicts for the table renderer: NaN as None (shown "-"), integer columns as int."""
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    for r in rows:
        for c in INT_COLUMNS:
            if r.get(c) is not None:
                r[c] = int(r[c])
    return rows


def _view(rows: list[dict]) -> list[dict]:
    """The default view: the grid's axes, the best plan's numbers, and one free-text column last (cut first
    when the terminal is narrow) with the plan and what limits it, or the status and why no plan."""
    links = any(r["link"] for r in rows)  # the link column only when the sweep replaced one
    stacks = any(r.get("stack") for r in rows)  # and the stack column only when the sweep named one
    out = []
    for r in rows:
        v = {k: r[k] for k in ("model", "cluster", "nodes")}
        if links:
            v["link"] = r["link"] or "-"
        if stacks:
            v["stack"] = r["stack"] or "-"
        v.update({"seq": r["seq"], "gbs": r["gbs"], "step s": r["step_time_s"], "tokens/s": r["tokens_per_s"],
                  "MFU": r["mfu"], "mem GB": r["peak_memory_gb"]})
        v["best plan / why"] = f"{r['label']}: {r['why']}" if r["status"] == "ok" else f"{r['status']}: {r['why']}"
        out.append(v)
    return out


def render_rows(df, fmt: str, wide: bool = False) -> str:
    """The sweep's rows in fmt: csv and json carry every column and raw values (the CSV is the -o file's)."""
    from planner.app.table import render

    if fmt == "csv":
        return df.to_csv(index=False, float_format="%.6g").rstrip("\n")
    if fmt == "json":
        return json.dumps(json.loads(df.to_json(orient="records")), indent=2)
    if wide:
        return render(_records(df), fmt, list(df.columns), wide=True, formats=WIDE_FORMATS)
    return render(_view(_records(df)), fmt, formats=VIEW_FORMATS)


def cmd_sweep(args) -> None:
    from planner.app.sweep import check_executor, parse_list, sweep, write_csv
    from planner.core.limits import MAX_DEVICES, MAX_GLOBAL_BATCH, MAX_SEQ_LEN
    from planner.files import check_output

    check_executor(args.executor, args.workers, args.scheduler)  # before the grid's names: the flags are cheap
    out = Path(args.output) if args.output is not None else None
    if out is not None:
        check_output(args.output, args.force, "-o")
    df = sweep(parse_list(args.model, str, "model"), parse_list(args.cluster, str, "cluster"),
               nodes=parse_list(args.nodes, int, "--nodes", MAX_DEVICES),
               seqs=parse_list(args.seq, int, "--seq", MAX_SEQ_LEN),
               gbs=parse_list(args.gbs, int, "--gbs", MAX_GLOBAL_BATCH), links=parse_list(args.link, str, "link"),
               dtypes=parse_list(args.dtype, str, "dtype"), refine_partition=not args.no_refine, progress=None,
               executor=args.executor, workers=args.workers, scheduler=args.scheduler,
               stacks=parse_list(args.stack, str, "stack"))
    if out is not None:
        write_csv(df, out, force=args.force)
    fmt = args.format or ("csv" if out is None else None)
    if fmt is not None:  # -o with --format: the file is written, stdout gets the rows in that format
        return emit(None, False, render_rows(df, fmt, args.wide))
    summary = render_rows(df, "table", args.wide)
    emit(None, False, f"{summary}\n{len(df)} cells ({(df['status'] == 'ok').sum()} with a plan) written to {out}")


def register(sub) -> None:
    """Adds `sweep`: comma-separated lists per axis."""
    from planner.app.table import add_format_flags

    sw = sub.add_parser("sweep", help="what-if grid: the best plan of every combination, as CSV")
    sw.add_argument("--model", required=True, help="comma-separated models")
    sw.add_argument("--cluster", required=True, help="comma-separated clusters")
    sw.add_argument("--nodes", help="comma-separated node counts (node-type presets)")
    sw.add_argument("--seq", required=True, help="comma-separated sequence lengths")
    sw.add_argument("--gbs", required=True, help="comma-separated global batch sizes")
    sw.add_argument("--link", help="comma-separated scale-out links replacing the nodes' NICs and fabric")
    sw.add_argument("--dtype", default="bf16", help="comma-separated precisions (default bf16)")
    sw.add_argument("--stack", help="comma-separated software stacks (hardware_profiles/stacks/, `profiles list`): "
                                    "their efficiencies, plan defaults and pipeline schedules")
    sw.add_argument("-o", "--output", metavar="FILE.csv", help="CSV to write (default: CSV on stdout)")
    sw.add_argument("--force", action="store_true", help="overwrite an existing CSV")
    sw.add_argument("--no-refine", action="store_true", help="skip the DP stage-partition refinement (faster)")
    sw.add_argument("--executor", choices=["serial", "dask"], default="serial",
                    help="serial (this process) or dask (a Dask cluster; pip install 'parallel-planner[dask]')")
    sw.add_argument("--workers", type=int, metavar="N",
                    help="dask: a local cluster of N worker processes (default: one per CPU, at most one per cell)")
    sw.add_argument("--scheduler", metavar="ADDRESS",
                    help="dask: an existing cluster's scheduler, e.g. tcp://host:8786 (docs/guide/sweep.md)")
    add_format_flags(sw)
    # sweep's own default (no --format): CSV on stdout, or the summary table once -o has the CSV
    sw.set_defaults(format=None, func=cmd_sweep)
    next(a for a in sw._actions if a.dest == "format").help = (
        "table, markdown, csv or json on stdout (default: csv, or a summary table with -o)")
