"""`planner plan`: search for the fastest plans that fit; mixed devices, NIC islands and phones go to their
own planners (planner/app/hetero_plan.py)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from planner import catalog
from planner.app import table
from planner.app.commands.flags import add_low_bandwidth_flags, parse_documents, parse_int_list
from planner.app.commands.output import emit, request_of
from planner.core import dtypes
from planner.core.dims import SCHEDULES
from planner.core.errors import BadInput
from planner.core.limits import MAX_TOP
from planner.files import write_atomic


def _constraints_from_args(args, stack=None):
    from planner.core.limits import MAX_DEVICES, MAX_GLOBAL_BATCH, MAX_SEQ_LEN, MAX_TOP, check_int
    from planner.search.search import check_constraints
    from planner.search.space import Constraints

    caps = {"tp": MAX_DEVICES, "pp": MAX_DEVICES, "dp": MAX_DEVICES, "cp": MAX_DEVICES, "ep": MAX_DEVICES,
            "vpp": MAX_DEVICES, "max_tp": MAX_DEVICES, "max_pp": MAX_DEVICES, "max_cp": MAX_DEVICES,
            "nodes": MAX_DEVICES, "mbs": MAX_GLOBAL_BATCH, "gbs": MAX_GLOBAL_BATCH, "seq": MAX_SEQ_LEN,
            "top": MAX_TOP}
    for flag, cap in caps.items():
        check_int(f"--{flag.replace('_', '-')}", getattr(args, flag), cap)
    c = Constraints(tp=args.tp, pp=args.pp, dp=args.dp, cp=args.cp, ep=args.ep, vpp=args.vpp, zero=args.zero,
                    mbs=args.mbs, recompute=args.recompute, schedule=args.schedule, sp=args.sp,
                    max_tp=args.max_tp, max_pp=args.max_pp, max_cp=args.max_cp,
                    allow_cross_node_tp=args.allow_cross_node_tp,
                    partial_recompute=args.partial_recompute,
                    offload_optimizer=(0.0, 1.0) if args.offload else (0.0,),
                    # the stack decides flash attention and the overlaps; --overlap-tp-comm turns TP overlap on
                    **({"flash_attention": stack.plan_defaults.flash_attention,
                        "overlap_grad_reduce": stack.plan_defaults.overlap_grad_reduce} if stack else {}),
                    overlap_tp_comm=args.overlap_tp_comm or bool(stack and stack.plan_defaults.overlap_tp_comm),
                    moe_dispatch=(args.moe_dispatch,) if args.moe_dispatch else ("a2a", "tp_slice", "deepep"),
                    offload_activations=(0.0, 0.5, 0.75, 1.0) if args.offload_activations else (0.0,),
                    seq_chunks=parse_int_list("--seq-chunks", args.seq_chunks, MAX_SEQ_LEN),
                    attention_pool=(False, True) if args.attention_pool else (False,),
                    local_steps=args.local_steps, grad_compression=args.grad_compression,
                    act_compression=args.act_compression)
    c.check()
    if stack is not None and c.schedule is not None:
        stack.check_schedule(c.schedule)
    check_constraints(c)
    return c


def cmd_plan(args) -> None:
    from planner.app.sweep import stack_search
    from planner.core.limits import MAX_HETERO_MICROBATCHES, MAX_MICROBATCHES, check_microbatches
    from planner.core.plan import PlanFile, Workload
    from planner.files import check_output
    from planner.importers import load_model

    if args.job is not None:  # several models on one cluster (planner/planners/rl.py)
        from planner.app.rl_job import run_job

        clash = [f"--{f}" for f in ("model", "gbs", "seq", "save") if getattr(args, f) is not None]
        if clash:
            raise BadInput(f"plan --job {args.job}: the job file names its models and batches; drop {clash[0]}")
        out, text = run_job(args.job, args.cluster, args.nodes, as_json=args.json)
        return emit(out, args.json, text)
    missing = [f"--{f}" for f in ("model", "gbs", "seq") if getattr(args, f) is None]
    if missing:
        raise BadInput(f"planner plan: the following arguments are required: {', '.join(missing)} (or --job JOB.yaml)")
    save = Path(args.save) if args.save is not None else None
    if save is not None:  # refuse before searching, not after ('' too: it is not "no file")
        check_output(args.save, args.force, "--save")
    if args.save_rank is not None and (save is None or args.save_rank < 1):
        raise BadInput(f"--save-rank {args.save_rank}: give a rank from 1 (the best) with --save PLAN.json")
    if args.launcher is not None:  # --for X: X's stack (its schedules, kernels) unless --stack says otherwise
        from planner.export import launchers

        launchers.check_request(args.launcher, args.model, args.dtype)
        args.stack = args.stack or launchers.STACKS[args.launcher]
    stack = catalog.load_stack(args.stack) if args.stack else None
    constraints = _constraints_from_args(args, stack)
    if args.launcher is not None:
        constraints = launchers.search_limits(constraints, args.launcher)
    documents = parse_documents(args.documents)
    model = load_model(args.model)
    cluster = catalog.apply_stack(catalog.load_cluster(args.cluster, args.nodes), stack)
    workload = Workload(global_batch=args.gbs, seq_len=args.seq, dtype=args.dtype, documents=documents)
    if args.attention_pool and workload.documents is None:
        raise BadInput("--attention-pool balances variable-length documents: give --documents MEAN[:MAX] too")
    from planner.app import hetero_plan as hetero_cli  # mixed devices, islands, phones: planners of their own

    kind = hetero_cli.route(cluster)
    # the hetero and phone planners run pipelines of a single replica (dp 1), micro-batches of up to 4 and 1
    routed = kind in ("edge", "hetero")
    check_microbatches(args.gbs, cluster.device_count, mbs=args.mbs or {"edge": 1, "hetero": 4}.get(kind),
                       dp=args.dp or (1 if routed else None),
                       cap=MAX_HETERO_MICROBATCHES if kind == "hetero" else MAX_MICROBATCHES)
    if kind is not None:
        def emit_with_request(obj, as_json: bool, text: str) -> None:
            emit({"request": request_of(args), **obj} if as_json else obj, as_json, text)

        low_bw = (args.local_steps, args.grad_compression, args.act_compression, args.objective) != (1, 1.0, 1.0, "time")
        if low_bw:
            raise BadInput(f"--local-steps, --grad-compression, --act-compression and --objective are not taken by the "
                           f"{kind} planner that {cluster.name} goes to; drop them or use a one-type cluster")
        return hetero_cli.cmd_plan(args, model, cluster, workload, kind, save, emit_with_request, write_atomic)
    top = max(args.top, args.save_rank or 1)
    # --for X: more plans searched, then those X's exporter refuses dropped (what one Constraints field cannot say)
    kw = dict(top_k=top if args.launcher is None else min(MAX_TOP, max(4 * top, top + 20)),
              objective=args.objective, price_per_hour=args.price_per_hour,
              **({"refine_partition": False} if args.launcher == "deepspeed" else {}))
    if args.launcher == "deepspeed" and constraints.recompute is None:
        res = _search_each(model, cluster, workload, stack, kw,  # whole layers or none: no selective key
                           [dataclasses.replace(constraints, recompute=r) for r in ("none", "full")])
    else:
        res = stack_search(model, cluster, workload, constraints, stack, **kw)
    can_run = _launchers_of(res.plans, args, workload, model, cluster, stack)
    if args.launcher is not None:
        keep = [i for i, names in enumerate(can_run) if args.launcher in names][:top]
        if not keep:
            from planner.core.errors import Infeasible
            from planner.export.launchers import refusal

            why = refusal(_plan_context(res.plans[0], args, workload, model, cluster, stack), args.launcher)
            raise Infeasible(f"--for {args.launcher}: none of the {len(res.plans)} fastest plans that fit runs on "
                             f"{args.launcher} ({why}); loosen the flags or try another --for")
        res = dataclasses.replace(res, plans=[res.plans[i] for i in keep])
        can_run = [can_run[i] for i in keep]
    if save is not None:
        if (args.save_rank or 1) > len(res.plans):
            raise BadInput(f"--save-rank {args.save_rank}: only {len(res.plans)} plans were found; give a rank from "
                           f"1 to {len(res.plans)}")
        best = res.plans[(args.save_rank or 1) - 1]
        pf = PlanFile(model=args.model, cluster=args.cluster, nodes=args.nodes, workload=workload, plan=best.plan,
                      estimate=best.estimate, stack=stack.name if stack is not None else None)
        write_atomic(save, pf.model_dump_json(indent=2) + "\n")
    res = dataclasses.replace(res, plans=res.plans[:args.top])
    out = {"request": request_of(args),
           "plans": [{**rp.as_dict(model), "launchers": names} for rp, names in zip(res.plans, can_run)],
           "search": res.summary(), "stack": stack.name if stack is not None else None,
           "objective": args.objective, "pareto": res.pareto}
    if args.json:
        return emit(out, True, "")
    header = (f"{model.name} on {cluster.name} ({cluster.device_count} devices), global batch "
              f"{workload.global_batch}, seq {workload.seq_len}, {workload.dtype}"
              + (f", stack {stack.name}" if stack is not None else "")
              + (f", ranked by {args.objective} per step" if args.objective != "time" else ""))
    summary = (f"searched {res.enumerated:,} plans: {res.pruned_memory:,} pruned by memory, {res.pruned_bound:,} "
               f"by the step-time bound, {res.evaluated:,} costed, in {res.wall_s:.2f} s"
               + (" (* uneven stage partition)" if any(rp.plan.partition for rp in res.plans) else "")
               + (f"; plan 1 exports to {', '.join(can_run[0]) or 'no launcher'} (--wide: every plan's)"
                  if can_run and not args.wide else ""))
    rows = [{**plan_table_row(i, rp, model), "launchers": ",".join(names) or "-"}
            for i, (rp, names) in enumerate(zip(res.plans, can_run), 1)]
    body = table.render(rows, args.format, columns=PLAN_COLUMNS, wide=args.wide, wide_columns=PLAN_WIDE_COLUMNS,
                        formats=PLAN_FORMATS, headers=PLAN_HEADERS)
    saved = (f"plan {args.save_rank} written to {save}" if args.save_rank else f"best plan written to {save}"
             ) if save is not None else ""
    if args.format == "csv":  # rows only, for a CSV reader
        return emit(None, False, body)
    if args.format == "markdown":
        text = "\n\n".join(x for x in (f"**{header}**", body, summary, saved) if x)
    else:
        text = "\n".join(x for x in (table.wrap(header), body, table.wrap(summary), saved) if x)
    emit(None, False, text)


# The default view: what ranks the plans and why; --wide adds every degree and term (the sweep CSV's columns).
# Which launchers run each plan is in --wide, the JSON, and a line under the table for the best plan: in the
# default view it would crowd out `why` at 100 columns.
PLAN_COLUMNS = ["rank", "label", "step_time_s", "band", "tokens_per_s", "mfu", "peak_memory_gb", "why"]
PLAN_WIDE_COLUMNS = ["rank", "label", "tp", "pp", "dp", "vpp", "cp", "ep", "etp", "zero", "sp", "mbs", "moe_dispatch",
                     "recompute", "recompute_num_layers", "schedule", "seq_chunks", "offload_optimizer",
                     "offload_activations", "attention_pool", "uneven_partition", "step_time_s", "band", "tokens_per_s",
                     "mfu", "hfu", "peak_memory_gb", "memory_capacity_gb", "fits", "bubble_s", "launchers", "why"]
PLAN_HEADERS = {"rank": "#", "label": "plan", "step_time_s": "step s", "band": "80% band s", "tokens_per_s": "tokens/s",
                "mfu": "MFU", "hfu": "HFU", "peak_memory_gb": "mem GB", "memory_capacity_gb": "cap GB",
                "recompute_num_layers": "rec layers", "moe_dispatch": "moe", "offload_optimizer": "opt off",
                "offload_activations": "act off", "attention_pool": "pool", "uneven_partition": "uneven",
                "bubble_s": "bubble s", "seq_chunks": "chunks"}
PLAN_FORMATS = {"step_time_s": ".3f", "tokens_per_s": ",.0f", "mfu": ".1%", "hfu": ".1%", "peak_memory_gb": ".1f",
                "memory_capacity_gb": ".0f", "bubble_s": ".3f"}


def _search_each(model, cluster, workload, stack, kw: dict, constraints: list):
    """stack_search once per Constraints, merged fastest first (the first error when none has a plan)."""
    from planner.app.sweep import stack_search
    from planner.core.errors import Infeasible

    results, errors = [], []
    for c in constraints:
        try:
            results.append(stack_search(model, cluster, workload, c, stack, **kw))
        except (Infeasible, BadInput) as e:
            errors.append(e)
    if not results:
        raise errors[0]
    plans = sorted((rp for r in results for rp in r.plans), key=lambda rp: rp.estimate.step_time_s)
    total = {f: sum(getattr(r, f) for r in results) for f in ("enumerated", "pruned_memory", "pruned_bound",
                                                                "evaluated", "wall_s")}
    return dataclasses.replace(results[0], plans=plans[:kw["top_k"]], **total)


def _plan_context(rp, args, workload, model, cluster, stack):
    from planner.core.plan import PlanFile
    from planner.export import ExportContext, _node_size

    pf = PlanFile(model=args.model, cluster=args.cluster, nodes=args.nodes, workload=workload, plan=rp.plan,
                  estimate=rp.estimate, stack=stack.name if stack is not None else None)
    return ExportContext(pf=pf, model=model, devices_per_node=_node_size(cluster))


def _launchers_of(plans, args, workload, model, cluster, stack) -> list[list[str]]:
    """Which launchers run each plan: their exporters' own refusal checks (planner/export/launchers.py)."""
    from planner.export.launchers import launchers_for

    return [launchers_for(_plan_context(rp, args, workload, model, cluster, stack)) for rp in plans]


def plan_table_row(rank: int, rp, model) -> dict:
    """One ranked plan as the table's row: the sweep CSV's columns (planner.app.rows) and what they leave out."""
    from planner.app.commands.estimate import band_text
    from planner.app.rows import plan_row

    p = rp.plan
    row = {"rank": rank, **plan_row(p, rp.estimate), "band": band_text(rp.estimate), "seq_chunks": p.seq_chunks,
           "offload_optimizer": p.offload.optimizer, "offload_activations": p.offload.activations,
           "attention_pool": p.attention_pool,
           "moe_dispatch": p.moe_dispatch if any(layer.kind == "moe" for layer in model.layers) else None}
    if p.partition is not None:
        row["label"] += " *"
    return row


def register(sub) -> None:
    """Adds `plan`: the search's flags (fix a dimension, widen the space) and --save."""
    pl = sub.add_parser("plan", help="search for the fastest plans that fit (top K, best first)")
    pl.add_argument("--model", help="catalog name, config.json or model file")
    pl.add_argument("--job", metavar="JOB.yaml",
                    help="a job of several models (RL post-training: kind rl) instead of --model/--gbs/--seq")
    pl.add_argument("--cluster", required=True, help="catalog name or cluster file")
    pl.add_argument("--nodes", type=int)
    pl.add_argument("--gbs", type=int)
    pl.add_argument("--seq", type=int)
    pl.add_argument("--dtype", choices=dtypes.TRAIN_DTYPES, default="bf16")
    pl.add_argument("--top", type=int, default=5, help="plans to show (default 5, at most 1000)")
    for flag in ("tp", "pp", "dp", "cp", "ep", "vpp", "mbs"):
        pl.add_argument(f"--{flag}", type=int, help=f"fix {flag}")
    pl.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="fix the ZeRO stage")
    pl.add_argument("--recompute", choices=["none", "selective", "full"], help="fix the recompute policy")
    pl.add_argument("--schedule", choices=SCHEDULES)
    pl.add_argument("--max-tp", type=int)
    pl.add_argument("--max-pp", type=int)
    pl.add_argument("--max-cp", type=int, help="largest context-parallel degree to try (default 16, or "
                    "seq/32768 for longer sequences)")
    pl.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None,
                    help="fix sequence parallel on (--sp) or off (--no-sp)")
    pl.add_argument("--allow-cross-node-tp", action="store_true", help="let tp span nodes")
    pl.add_argument("--partial-recompute", action="store_true",
                    help="also search Megatron's partial recompute (--recompute-num-layers)")
    pl.add_argument("--offload", action="store_true", help="also search optimizer offload to the host")
    pl.add_argument("--overlap-tp-comm", action="store_true",
                    help="the stack overlaps TP communication with GEMMs (Megatron --tp-comm-overlap)")
    pl.add_argument("--stack", help="software stack (hardware_profiles/stacks/, `profiles list`): its kernel "
                                    "efficiencies, plan defaults, pipeline schedules and error band")
    pl.add_argument("--moe-dispatch", choices=["a2a", "tp_slice", "deepep"],
                    help="fix the MoE token exchange (default: search all three; tp_slice is Pipeline MoE's, deepep "
                         "DeepEP's node-deduplicated dispatch)")
    pl.add_argument("--offload-activations", action="store_true",
                    help="also search activation offload to the host (0.5, 0.75 and all of the saved activations)")
    pl.add_argument("--seq-chunks", default="1", metavar="N[,N...]",
                    help="sequence chunks per micro-batch to try with pp > 1 (e.g. 1,2,4,8; default 1)")
    pl.add_argument("--documents", metavar="MEAN[:MAX]",
                    help="sequences packed with variable-length documents (tokens), each its own causal mask")
    pl.add_argument("--attention-pool", action="store_true",
                    help="with --documents: also search core attention disaggregated to a balanced pool (DistCA)")
    add_low_bandwidth_flags(pl)
    pl.add_argument("--objective", choices=["time", "cost", "energy"], default="time",
                    help="rank plans by step time, dollars or joules per step (--json adds the Pareto front)")
    table.add_format_flags(pl)
    pl.add_argument("--for", dest="launcher", choices=["megatron", "deepspeed", "torchtitan"],
                    help="search only plans this launcher can run (implies its --stack: megatron-core, deepspeed, "
                         "torchtitan); without it each plan lists the launchers that can run it")
    pl.add_argument("--save", metavar="PLAN.json", help="write the best plan as a plan file")
    pl.add_argument("--save-rank", type=int, metavar="K", help="with --save: write the K-th plan (1 = best)")
    pl.add_argument("--force", action="store_true", help="with --save: overwrite an existing file")
    pl.set_defaults(func=cmd_plan)
