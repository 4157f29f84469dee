"""`planner estimate`: step time, throughput, MFU and memory of one plan, given by flags or a plan file."""
from __future__ import annotations

import argparse

from planner import catalog
from planner.app import table
from planner.app.commands.flags import (add_goodput_flags, add_low_bandwidth_flags, goodput_of, goodput_text,
                                        parse_documents)
from planner.app.commands.output import emit, request_of
from planner.core import dtypes
from planner.core.dims import SCHEDULES
from planner.core.errors import BadInput


def _plan_from_args(args, cluster, stack=None):
    from pydantic import ValidationError

    from planner.core.limits import MAX_DEVICES, MAX_GLOBAL_BATCH, MAX_SEQ_LEN, check_int
    from planner.core.plan import ParallelPlan

    tp, pp, cp = args.tp, args.pp, args.cp
    # degrees (and vpp, chunks per device) count devices; mbs is at most the global batch
    for flag, v, cap in (("--tp", tp, MAX_DEVICES), ("--pp", pp, MAX_DEVICES), ("--cp", cp, MAX_DEVICES),
                         ("--dp", args.dp, MAX_DEVICES), ("--ep", args.ep, MAX_DEVICES),
                         ("--vpp", args.vpp, MAX_DEVICES), ("--mbs", args.mbs, MAX_GLOBAL_BATCH),
                         ("--gbs", args.gbs, MAX_GLOBAL_BATCH), ("--seq", args.seq, MAX_SEQ_LEN)):
        check_int(flag, v, cap)
    if args.seq_chunks > MAX_SEQ_LEN:  # below 1: the plan's own check (seq_chunks) says so
        check_int("--seq-chunks", args.seq_chunks, MAX_SEQ_LEN)
    if args.recompute_num_layers is not None and not 0 <= args.recompute_num_layers <= MAX_DEVICES:
        raise BadInput(f"--recompute-num-layers must be between 0 and the blocks of a pipeline chunk, "
                       f"got {args.recompute_num_layers}")
    dp = args.dp
    if dp is None:
        if cluster.device_count % (tp * pp * cp):
            raise BadInput(f"{cluster.device_count} devices are not divisible by tp*pp*cp = {tp * pp * cp}; "
                           "change --tp/--pp/--cp or --nodes")
        dp = cluster.device_count // (tp * pp * cp)
    schedule = args.schedule or ("interleaved-1f1b" if args.vpp > 1 else "1f1b")
    if stack is not None:
        stack.check_schedule(schedule, "--schedule" if args.schedule else "schedule")
    # tp_slice places E/tp whole experts on each TP rank: ep = tp and etp = 1 unless --ep says otherwise
    ep, etp = args.ep, None
    if args.moe_dispatch == "tp_slice":
        ep, etp = (tp if args.ep == 1 else args.ep), 1
    try:
        return ParallelPlan(dp=dp, tp=tp, pp=pp, vpp=args.vpp, cp=cp, ep=ep, etp=etp, zero=args.zero, sp=args.sp,
                            mbs=args.mbs, recompute=args.recompute, schedule=schedule,
                            recompute_num_layers=args.recompute_num_layers, moe_dispatch=args.moe_dispatch,
                            seq_chunks=args.seq_chunks, attention_pool=args.attention_pool,
                            local_steps=args.local_steps, grad_compression=args.grad_compression,
                            act_compression=args.act_compression, fill_frozen=bool(args.fill_frozen),
                            offload={"activations": args.offload_activations},
                            **(stack.plan_defaults.model_dump() if stack is not None else {}))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise BadInput("plan: " + (f"{where}: " if where else "") + err["msg"].removeprefix("Value error, ")) \
            from None


def read_plan_file(path: str):
    """A PlanFile from disk, checked as every command needs it (planner.planfile.load_plan_file: safe read, strict
    parsing, names resolved, the rules `estimate` applies); BadInput or Infeasible in one line otherwise."""
    from planner.planfile import load_plan_file

    return load_plan_file(path).pf


def cmd_estimate(args) -> None:
    from planner.core.plan import Workload
    from planner.cost.estimate import estimate
    from planner.importers import load_model

    if args.infer:  # generation (prefill + decode) of one inference engine: planner/cost/inference.py
        from planner.app.rl_job import run_infer

        missing = [f"--{f.replace('_', '-')}" for f in ("model", "cluster", "batch", "prompt_len", "gen_len")
                   if getattr(args, f) is None]
        if missing or args.plan:
            raise BadInput(f"estimate --infer needs {', '.join(missing) or 'no --plan'} "
                           "(--model M --cluster C --batch B --prompt-len P --gen-len G [--tp T --pp P])")
        out, text = run_infer(args.model, args.cluster, args.nodes, batch=args.batch, prompt_len=args.prompt_len,
                              gen_len=args.gen_len, tp=args.tp, pp=args.pp, as_json=args.json)
        return emit(out, args.json, text)
    if args.plan:
        # Everything comes from the plan file (what `plan --save` wrote); the flags that pick a plan are
        # refused rather than silently ignored.
        given = [f for f in ("model", "cluster", "nodes", "mbs", "gbs", "seq") if getattr(args, f) is not None]
        given += [f for f, d in (("local_steps", 1), ("grad_compression", 1.0), ("act_compression", 1.0),
                                 ("fill_frozen", None))
                  if getattr(args, f) != d]
        if given:
            raise BadInput(f"--plan {args.plan} fixes the model, cluster and plan; drop --{given[0].replace('_', '-')}")
        pf = read_plan_file(args.plan)  # held to the caps and checked in full (planner/planfile.py)
        model = load_model(pf.model)
        cluster = catalog.load_cluster(pf.cluster, pf.nodes)
        plan, workload = pf.plan, pf.workload
        # the file's stack, or --stack instead: then that stack decides the plan fields it owns
        stack = catalog.load_stack(args.stack or pf.stack) if (args.stack or pf.stack) else None
        if args.stack:
            stack.check_schedule(plan.schedule, f"--plan {args.plan}: plan.schedule")
            plan = plan.model_copy(update=stack.plan_defaults.model_dump())
        cluster = catalog.apply_stack(cluster, stack)
    else:
        missing = [f"--{f}" for f in ("model", "cluster", "mbs", "gbs", "seq") if getattr(args, f) is None]
        if missing:
            raise BadInput(f"planner estimate: the following arguments are required: {', '.join(missing)} "
                           "(or --plan PLAN.json)")
        model = load_model(args.model)
        stack = catalog.load_stack(args.stack) if args.stack else None
        cluster = catalog.apply_stack(catalog.load_cluster(args.cluster, args.nodes), stack)
        plan = _plan_from_args(args, cluster, stack)
        workload = Workload(global_batch=args.gbs, seq_len=args.seq, dtype=args.dtype,
                            documents=parse_documents(args.documents))
        if plan.attention_pool and workload.documents is None:
            raise BadInput("--attention-pool balances variable-length documents: give --documents MEAN[:MAX] too")
        from planner.core.limits import check_microbatches

        check_microbatches(args.gbs, cluster.device_count, mbs=plan.mbs, dp=plan.dp)
    est = estimate(model, cluster, workload, plan)
    if args.price_per_hour is not None:  # the user's price of a device-hour replaces the catalog's
        from planner.cost.energy import priced
        from planner.search.objective import Objective

        Objective("cost", cluster, workload.tokens_per_step, args.price_per_hour)  # refuses a bad price
        est = priced(est, cluster, workload.tokens_per_step, args.price_per_hour)
    good = goodput_of(args, est, model, cluster, workload)  # None without --mtbf-hours
    if args.json:
        out = est.model_dump()
        if good is not None:
            out["goodput"] = good
        out["plan"] = plan.model_dump()
        out["stack"] = stack.name if stack is not None else None
        out["request"] = request_of(args)
        return emit(out, True, "")
    emit(None, False, _as_text(args, plan, est) + ("" if good is None else "\n" + goodput_text(good)))


def band_text(est) -> str:
    """The step time's 80% band as 'P10-P90' seconds, three significant figures ('' for an older estimate)."""
    if est.step_time_s_p10 is None or est.step_time_s_p90 is None:
        return ""
    return f"{est.step_time_s_p10:.3g}-{est.step_time_s_p90:.3g}"


# One plan as one row: the default view says how fast and how big; --wide adds the plan's degrees, every
# step-time term (seconds) and every memory term (GB, as mem_<term>_gb).
ESTIMATE_COLUMNS = ["label", "step_time_s", "band", "tokens_per_s", "mfu", "hfu", "peak_memory_gb",
                    "memory_capacity_gb", "fits", "why"]
ESTIMATE_HEADERS = {"label": "plan", "step_time_s": "step s", "band": "80% band s", "tokens_per_s": "tokens/s",
                    "mfu": "MFU", "hfu": "HFU", "peak_memory_gb": "mem GB", "memory_capacity_gb": "cap GB"}
ESTIMATE_FORMATS = {"step_time_s": ".3f", "tokens_per_s": ",.0f", "mfu": ".1%", "hfu": ".1%",
                    "peak_memory_gb": ".1f", "memory_capacity_gb": ".0f"}


def _as_text(args, plan, est) -> str:
    """The estimate in args.format: a report that fits the terminal (table), or one row (markdown, csv)."""
    from planner.app.rows import plan_row

    row = {**plan_row(plan, est), "band": band_text(est), **est.breakdown,
           **{f"mem_{k.removesuffix('_bytes')}_gb": v / 1e9 for k, v in est.memory.items()}}
    wide = ESTIMATE_COLUMNS[:-1] + [k for k in row if k not in ESTIMATE_COLUMNS] + ["why"]
    if args.format != "table":
        text = table.render([row], args.format, columns=ESTIMATE_COLUMNS, wide=args.wide, wide_columns=wide,
                            formats=ESTIMATE_FORMATS, headers=ESTIMATE_HEADERS)
        if args.format == "markdown":  # the terms as two more tables, each a key and a value
            terms = [{"term": k, "seconds": v} for k, v in est.breakdown.items()]
            mem = [{"memory": k, "GB": v / 1e9} for k, v in est.memory.items()]
            text += "\n\n" + table.render(terms, "markdown", formats={"seconds": ".4f"})
            text += "\n\n" + table.render(mem, "markdown", formats={"GB": ".2f"})
        return text
    width = None if args.wide else table.terminal_width()
    lines = [f"step {est.step_time_s:.3f} s ({band_text(est)})   {est.tokens_per_s:,.0f} tokens/s   "
             f"MFU {est.mfu:.1%}   HFU {est.hfu:.1%}",
             f"memory {est.peak_memory_bytes / 1e9:.1f} / {est.memory_capacity_bytes / 1e9:.0f} GB per device "
             f"({'fits' if est.fits else 'DOES NOT FIT'})"]
    money = [x for x in (est.cost_usd_per_step is not None and f"${est.cost_usd_per_step:.4g} per step",
                         est.energy_j_per_step is not None and f"{est.energy_j_per_step / 1e3:,.4g} kJ per step",
                         est.tokens_per_joule is not None and f"{est.tokens_per_joule:.4g} tokens/J") if x]
    if money:
        lines.append("   ".join(money))
    if args.wide:
        lines.insert(0, f"plan {row['label']}")
    lines = [table.wrap(x, width) if width else x for x in lines + [est.why]]
    lines += [f"  {k:<22} {v:10.4f} s" for k, v in est.breakdown.items()]
    lines += [f"  {k:<22} {v / 1e9:10.2f} GB" for k, v in est.memory.items()]
    return "\n".join(lines)


def register(sub) -> None:
    """Adds `estimate`: a plan by flags (--model ... --seq) or by --plan FILE."""
    est = sub.add_parser("estimate", help="predict step time, throughput, MFU and memory of one plan")
    est.add_argument("--plan", help="a plan file (plan --save): model, cluster, workload and plan from it")
    est.add_argument("--model", help="catalog name, config.json or model file")
    est.add_argument("--cluster", help="catalog name or cluster file")
    est.add_argument("--nodes", type=int)
    est.add_argument("--tp", type=int, default=1)
    est.add_argument("--pp", type=int, default=1)
    est.add_argument("--dp", type=int)
    est.add_argument("--vpp", type=int, default=1)
    est.add_argument("--cp", type=int, default=1)
    est.add_argument("--ep", type=int, default=1)
    est.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0)
    est.add_argument("--sp", action="store_true")
    est.add_argument("--mbs", type=int)
    est.add_argument("--infer", action="store_true",
                     help="generation cost of one inference engine (tp x pp devices): prefill, decode, KV cache")
    est.add_argument("--batch", type=int, help="with --infer: prompts generated at once")
    est.add_argument("--prompt-len", type=int, help="with --infer: prompt tokens")
    est.add_argument("--gen-len", type=int, help="with --infer: generated tokens per prompt")
    est.add_argument("--gbs", type=int)
    est.add_argument("--seq", type=int)
    est.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    est.add_argument("--recompute-num-layers", type=int,
                     help="with --recompute full: blocks per pipeline chunk recomputed (Megatron block method)")
    est.add_argument("--schedule", choices=SCHEDULES)
    est.add_argument("--dtype", choices=dtypes.TRAIN_DTYPES, default="bf16")
    est.add_argument("--stack", help="software stack (hardware_profiles/stacks/, `profiles list`): its kernel "
                                     "efficiencies, plan defaults and error band; with --plan, replaces the file's")
    est.add_argument("--moe-dispatch", choices=["a2a", "tp_slice", "deepep"], default="a2a",
                     help="MoE token exchange: a2a (all-to-all over ep), tp_slice (Pipeline MoE: E/tp experts per "
                          "TP rank, index slicing + TP all-reduce; sets ep = tp, etp = 1) or deepep (DeepEP: one "
                          "copy per destination node)")
    est.add_argument("--seq-chunks", type=int, default=1,
                     help="run each sequence as N chunks through the pipeline (TeraPipe / Seq1F1B / SPPO)")
    est.add_argument("--offload-activations", type=float, default=0.0, metavar="F",
                     help="share of saved activations kept in host memory (0-1)")
    est.add_argument("--documents", metavar="MEAN[:MAX]",
                     help="sequences packed with variable-length documents (tokens), each its own causal mask")
    est.add_argument("--attention-pool", action="store_true",
                     help="core attention disaggregated to a balanced pool of all devices (DistCA)")
    est.add_argument("--fill-frozen", action=argparse.BooleanOptionalAction, default=None,
                     help="run frozen encoders (text encoder, VAE) in the pipeline bubbles (DiffusionPipe); "
                          "--no-fill-frozen (the default): on the first stage")
    add_goodput_flags(est)
    add_low_bandwidth_flags(est)
    table.add_format_flags(est)
    est.set_defaults(func=cmd_estimate)
