"""`planner sweep`: the what-if grid (planner/app/sweep.py), the best plan of every combination as CSV."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from planner.app.commands.output import emit


def cmd_sweep(args) -> None:
    from planner.app.sweep import parse_list, sweep, write_csv
    from planner.core.limits import MAX_DEVICES, MAX_GLOBAL_BATCH, MAX_SEQ_LEN
    from planner.files import check_output

    out = Path(args.output) if args.output is not None else None
    if out is not None:
        check_output(args.output, args.force, "-o")
    df = sweep(parse_list(args.model, str, "model"), parse_list(args.cluster, str, "cluster"),
               nodes=parse_list(args.nodes, int, "--nodes", MAX_DEVICES),
               seqs=parse_list(args.seq, int, "--seq", MAX_SEQ_LEN),
               gbs=parse_list(args.gbs, int, "--gbs", MAX_GLOBAL_BATCH), links=parse_list(args.link, str, "link"),
               dtypes=parse_list(args.dtype, str, "dtype"), refine_partition=not args.no_refine, progress=None)
    if out is None:
        if args.json:
            emit(json.loads(df.to_json(orient="records")), True, "")
        else:
            sys.stdout.write(df.to_csv(index=False, float_format="%.6g"))
        return
    write_csv(df, out, force=args.force)
    if args.json:  # the CSV is written; stdout gets the same rows as JSON instead of the summary
        return emit(json.loads(df.to_json(orient="records")), True, "")
    lines = [f"{'model':<14} {'cluster':<16} {'nodes':>5} {'link':<9} {'seq':>6} {'gbs':>5} {'step s':>9} "
             f"{'tokens/s':>11} {'MFU':>6}  best plan / why"]
    for r in df.itertuples():
        if r.status == "ok":
            lines.append(f"{r.model:<14} {r.cluster:<16} {r.nodes:>5} {r.link or '-':<9} {r.seq:>6} {r.gbs:>5} "
                         f"{r.step_time_s:9.3f} {r.tokens_per_s:11,.0f} {r.mfu:6.1%}  {r.label}: {r.why}")
        else:
            lines.append(f"{r.model:<14} {r.cluster:<16} {r.nodes if r.nodes is not None else '-':>5} "
                         f"{r.link or '-':<9} {r.seq:>6} {r.gbs:>5} {r.status:>9}  {r.why}")
    lines.append(f"{len(df)} cells ({(df['status'] == 'ok').sum()} with a plan) written to {out}")
    sys.stdout.write("\n".join(lines) + "\n")


def register(sub) -> None:
    """Adds `sweep`: comma-separated lists per axis."""
    sw = sub.add_parser("sweep", help="what-if grid: the best plan of every combination, as CSV")
    sw.add_argument("--model", required=True, help="comma-separated models")
    sw.add_argument("--cluster", required=True, help="comma-separated clusters")
    sw.add_argument("--nodes", help="comma-separated node counts (node-type presets)")
    sw.add_argument("--seq", required=True, help="comma-separated sequence lengths")
    sw.add_argument("--gbs", required=True, help="comma-separated global batch sizes")
    sw.add_argument("--link", help="comma-separated scale-out links replacing the nodes' NICs and fabric")
    sw.add_argument("--dtype", default="bf16", help="comma-separated precisions (default bf16)")
    sw.add_argument("-o", "--output", metavar="FILE.csv", help="CSV to write (default: CSV on stdout)")
    sw.add_argument("--force", action="store_true", help="overwrite an existing CSV")
    sw.add_argument("--no-refine", action="store_true", help="skip the DP stage-partition refinement (faster)")
    sw.add_argument("--json", action="store_true", help="print the rows as JSON instead of CSV (or of the summary)")
    sw.set_defaults(func=cmd_sweep)
