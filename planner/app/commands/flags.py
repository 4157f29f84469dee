"""Flag values that are more than one int or name: --documents MEAN[:MAX] and lists like --seq-chunks 1,2,4.
Each parser turns the text into a checked value or one BadInput line naming the flag."""
from __future__ import annotations

from planner.core.errors import BadInput


def parse_documents(text: str | None):
    """--documents MEAN[:MAX] (tokens): a DocumentMix, or None; BadInput for anything else."""
    from pydantic import ValidationError

    from planner.core.plan import DocumentMix

    if text is None:
        return None
    try:
        parts = [int(x) for x in text.split(":")]
        if len(parts) > 2 or min(parts) <= 0:
            raise ValueError
    except ValueError:
        raise BadInput(f"--documents {text!r}: want MEAN or MEAN:MAX, positive token counts (e.g. 32768:524288)") \
            from None
    from planner.core.limits import MAX_SEQ_LEN

    if max(parts) > MAX_SEQ_LEN:  # a document is at most a sequence
        raise BadInput(f"--documents {text!r}: {max(parts)} tokens is past the sequence cap of {MAX_SEQ_LEN:,}; "
                       "give at most that")
    try:
        return DocumentMix(mean_tokens=parts[0], max_tokens=parts[1] if len(parts) == 2 else None)
    except ValidationError as e:
        raise BadInput(f"--documents {text!r}: " + e.errors()[0]["msg"].removeprefix("Value error, ")) from None


# values one list flag may hold: each is a whole search dimension
MAX_LIST_ITEMS = 64


def parse_int_list(flag: str, text: str, cap: int | None = None) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4) (duplicates dropped), each positive and at most cap; BadInput otherwise."""
    try:
        vals = tuple(dict.fromkeys(int(x) for x in text.split(",")))
        if min(vals) <= 0:
            raise ValueError
    except ValueError:
        raise BadInput(f"{flag} {text!r}: want positive integers separated by commas (e.g. 1,2,4,8)") from None
    if len(vals) > MAX_LIST_ITEMS:
        raise BadInput(f"{flag}: {len(vals)} values, past the cap of {MAX_LIST_ITEMS}; give fewer")
    if cap is not None and max(vals) > cap:
        raise BadInput(f"{flag} {max(vals)} is past the cap of {cap:,}; give at most {cap:,}")
    return vals


def add_goodput_flags(parser) -> None:
    """--mtbf-hours and --restart-s: expected goodput under device failures (planner/cost/goodput.py)."""
    parser.add_argument("--mtbf-hours", type=float, metavar="H",
                        help="mean time between failures of one device, hours: adds goodput (Young/Daly "
                             "checkpoint interval) and a table of goodput against cluster size")
    parser.add_argument("--restart-s", type=float, metavar="S", help="with --mtbf-hours: seconds to restart "
                                                                     "after a failure (re-schedule, load checkpoint)")


def goodput_of(args, est, model, cluster, workload) -> dict | None:
    """The goodput output (None without --mtbf-hours): this job's, and the table of larger clusters."""
    if getattr(args, "mtbf_hours", None) is None:
        if getattr(args, "restart_s", None) is not None:
            raise BadInput("--restart-s needs --mtbf-hours H (a device's mean time between failures)")
        return None
    if args.restart_s is None:
        raise BadInput("--mtbf-hours needs --restart-s S too (seconds to restart after a failure)")
    from planner.cost import goodput as gp

    kw = dict(params=model.params, mtbf_hours=args.mtbf_hours, restart_s=args.restart_s, dtype=workload.dtype,
              optimizer=workload.optimizer)
    nodes = len(cluster.nodes)
    one = gp.goodput(est.tokens_per_s, cluster.device_count, nodes, **kw)
    table = gp.scaling_table(est.tokens_per_s, cluster.device_count, nodes, **kw)
    return {**one.as_dict(), "by_cluster_size": [g.as_dict() for g in table]}


def goodput_text(g: dict) -> str:
    """goodput_of's output as lines: this job, then goodput falling with cluster size."""
    lines = [f"goodput {g['fraction']:.1%}: {g['tokens_per_s']:,.0f} effective tokens/s (cluster MTBF "
             f"{g['cluster_mtbf_s'] / 3600:.2f} h, checkpoint {g['checkpoint_bytes'] / 1e9:.0f} GB in "
             f"{g['checkpoint_s']:.0f} s every {g['interval_s'] / 60:.0f} min (Young/Daly), restart "
             f"{g['restart_s']:.0f} s)",
             f"  {'devices':>8} {'MTBF h':>8} {'interval min':>13} {'goodput':>8}"]
    lines += [f"  {r['devices']:>8,} {r['cluster_mtbf_s'] / 3600:>8.2f} {r['interval_s'] / 60:>13.1f} "
              f"{r['fraction']:>8.1%}" for r in g["by_cluster_size"]]
    return "\n".join(lines)


def add_low_bandwidth_flags(parser) -> None:
    """--local-steps, --grad-compression, --act-compression (DiLoCo / SparseLoCo / activation compression) and
    --price-per-hour: the flags `plan` and `estimate` share (docs/guide/low_bandwidth_and_cost.md)."""
    parser.add_argument("--local-steps", type=int, default=1, metavar="H",
                        help="DiLoCo: sync the pseudo-gradient every H steps (default 1: every step); needs zero 0")
    parser.add_argument("--grad-compression", type=float, default=1.0, metavar="R",
                        help="fraction of gradient bytes sent (SparseLoCo top-k / quantisation; default 1)")
    parser.add_argument("--act-compression", type=float, default=1.0, metavar="R",
                        help="fraction of pipeline activation bytes sent (subspace compression; default 1)")
    parser.add_argument("--price-per-hour", type=float, metavar="USD",
                        help="US dollars per device-hour (default: hardware_profiles/prices.yaml)")
