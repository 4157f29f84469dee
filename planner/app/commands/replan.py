"""`planner replan PLAN.json --lose N | --lose-devices LIST`: a plan for the devices that survive a failure,
keeping the global batch (planner/planners/elastic.py), beside the naive alternatives."""
from __future__ import annotations

from planner.app.commands.output import emit
from planner.core.errors import BadInput


def cmd_replan(args) -> None:
    from planner.planfile import load_plan_file
    from planner.planners.elastic import lost_ranks, replan

    if (args.lose is None) == (args.lose_devices is None):
        raise BadInput("replan: give one of --lose N (the last N devices) or --lose-devices 3,17")
    loaded = load_plan_file(args.plan)
    pf = loaded.pf
    devices = pf.plan.devices
    listed = None
    if args.lose_devices is not None:
        try:
            listed = tuple(int(x) for x in args.lose_devices.split(","))
        except ValueError:
            raise BadInput(f"--lose-devices {args.lose_devices!r}: want device ranks separated by commas "
                           "(e.g. 3,17)") from None
    lost = lost_ranks(devices, args.lose, listed)
    r = replan(loaded.model, loaded.cluster, pf.workload, pf.plan, lost, loaded.estimate)
    workload = pf.workload.model_dump()
    out = {"lost_devices": list(lost),
           "before": {"tokens_per_s": r.before.tokens_per_s, "step_time_s": r.before.step_time_s,
                      "plan": {**pf.plan.model_dump(), "workload": workload}},
           "after": {"tokens_per_s": r.after_tokens_per_s, "step_time_s": r.after_step_s,
                     "plan": {**r.after_plan.model_dump(), "workload": workload}, "replicas": r.replicas},
           "throughput_kept": r.after_tokens_per_s / r.before.tokens_per_s,
           "migration_bytes": r.migration_bytes, "migration_s": r.migration_s, "alternatives": r.alternatives}
    lines = [f"lost {len(lost)} of {devices} devices; global batch {pf.workload.global_batch} kept",
             f"before  {r.before.tokens_per_s:12,.0f} tokens/s  step {r.before.step_time_s:.3f} s",
             f"after   {r.after_tokens_per_s:12,.0f} tokens/s  step {r.after_step_s:.3f} s  "
             f"({out['throughput_kept']:.1%} kept; {sum(x['pp'] < pf.plan.pp for x in r.replicas)} replicas on fewer "
             f"stages, samples {sorted({x['samples'] for x in r.replicas})})",
             f"migration {r.migration_bytes / 1e9:.1f} GB, {r.migration_s:.2f} s over the NICs"]
    lines += [f"naive: {a['name']:<26} {a['tokens_per_s']:12,.0f} tokens/s "
              f"({a['tokens_per_s'] / r.before.tokens_per_s:.1%}; {a['note']})" for a in r.alternatives]
    emit(out, args.json, "\n".join(lines))


def register(sub) -> None:
    """Adds `replan`."""
    rp = sub.add_parser("replan", help="re-plan a plan file for the devices left after failures, keeping the "
                                       "global batch (uneven micro-batches, layer migration; ElasWave)")
    rp.add_argument("plan", help="a plan file (plan --save)")
    rp.add_argument("--lose", type=int, metavar="N", help="the last N devices fail (8: the last node of 8)")
    rp.add_argument("--lose-devices", metavar="LIST", help="the failed device ranks, 0-based, e.g. 3,17")
    rp.add_argument("--keep-gbs", action="store_true",
                    help="keep the global batch (the default and only mode: changing it changes training)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_replan)
