"""Command line: `python cli.py ...` in a checkout, `planner ...` once installed (docs/ARCHITECTURE.md#contracts).

Every user error ends as one line on stderr and exit status 2 (1 for infeasible requests); a traceback
means a bug in the planner, never in the input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from planner import catalog
from planner.core.dims import SCHEDULES
from planner.core.errors import BadInput, PlannerError, did_you_mean
from planner.files import path_exists
from planner.files import write_atomic as _write_atomic
from planner.core import dtypes


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the contract), not usage text plus a line."""

    def error(self, message: str):  # noqa: D102
        raise BadInput(f"{self.prog}: {message} (see --help)")


def _emit(obj, as_json: bool, text: str) -> None:
    if as_json:
        json.dump(obj, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text.rstrip() + "\n")


# ---------------------------------------------------------------------------------------------------
# profiles


def _all_presets() -> dict[str, list[str]]:
    from planner.importers import model_names

    return {
        "devices": catalog.names("devices"),
        "links": catalog.names("links"),
        "clusters": catalog.cluster_names(),
        "models": model_names(),
    }


def cmd_profiles_list(args) -> None:
    presets = _all_presets()
    lines = []
    for section, names in presets.items():
        lines.append(f"{section} ({len(names)}):")
        lines.extend(f"  {n}" for n in names)
    _emit(presets, args.json, "\n".join(lines))


def _cluster_summary(name: str) -> dict:
    spec = catalog.cluster_spec(name)
    cluster = catalog.resolve_cluster(spec, nodes=1 if spec.needs_node_count else None)
    out = spec.model_dump()
    out["resolved"] = {
        "nodes": len(cluster.nodes),
        "devices": cluster.device_count,
        "device_types": cluster.device_types,
        "devices_per_node": cluster.devices_per_node,
        "islands": sorted({n.island for n in cluster.nodes}),
        "per_node_is_preset": spec.needs_node_count,
    }
    if spec.needs_node_count:
        out["resolved"]["note"] = "a node-type preset: --nodes N sets how many nodes"
    return out


def cmd_profiles_show(args) -> None:
    from planner.importers import load_model, model_names

    name = args.name
    for section, getter in (("devices", catalog.device), ("links", catalog.link)):
        if name in catalog.names(section):
            obj = getter(name).model_dump()
            obj["type"] = section[:-1]
            return _emit(obj, args.json, _as_text(obj))
    if name in catalog.cluster_names():
        obj = _cluster_summary(name)
        obj["type"] = "cluster"
        return _emit(obj, args.json, _as_text(obj))
    if name in model_names() or path_exists(name) or Path(name).suffix in (".json", ".yaml", ".yml"):
        path = Path(name)
        if path.suffix in (".yaml", ".yml") and path_exists(path) and _looks_like_cluster(path):
            obj = _cluster_summary(str(path))
            obj["type"] = "cluster"
            return _emit(obj, args.json, _as_text(obj))
        graph = load_model(name)
        obj = graph.summary()
        obj["type"] = "model"
        return _emit(obj, args.json, _as_text(obj))
    from planner import userdata

    if name in userdata.LOCAL_NAMES:  # the user's own calibration, not made yet
        raise BadInput(userdata.no_calibration_message(name))
    known = [n for names in _all_presets().values() for n in names]
    raise BadInput(f"unknown preset '{name}'{did_you_mean(name, known)}; see `profiles list`, "
                   "or give a path to a config.json, model file or cluster file")


def _looks_like_cluster(path: Path) -> bool:
    data = catalog.read_data_file(path)
    return isinstance(data, dict) and "groups" in data


def _as_text(obj: dict, indent: int = 0) -> str:
    lines = []
    for k, v in obj.items():
        if isinstance(v, dict):
            lines.append(" " * indent + f"{k}:")
            lines.append(_as_text(v, indent + 2))
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**6:
            lines.append(" " * indent + f"{k}: {v:,} ({v / 1e9:.3f} B)")
        else:
            lines.append(" " * indent + f"{k}: {v}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# estimate and backtest


def _plan_from_args(args, cluster):
    from pydantic import ValidationError

    from planner.core.plan import ParallelPlan

    from planner.core.limits import MAX_DEVICES, MAX_GLOBAL_BATCH, MAX_SEQ_LEN, check_int

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
    # tp_slice places E/tp whole experts on each TP rank: ep = tp and etp = 1 unless --ep says otherwise
    ep, etp = args.ep, None
    if args.moe_dispatch == "tp_slice":
        ep, etp = (tp if args.ep == 1 else args.ep), 1
    try:
        return ParallelPlan(dp=dp, tp=tp, pp=pp, vpp=args.vpp, cp=cp, ep=ep, etp=etp, zero=args.zero, sp=args.sp,
                            mbs=args.mbs, recompute=args.recompute, schedule=schedule,
                            recompute_num_layers=args.recompute_num_layers, moe_dispatch=args.moe_dispatch,
                            seq_chunks=args.seq_chunks, attention_pool=args.attention_pool,
                            offload={"activations": args.offload_activations})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise BadInput("plan: " + (f"{where}: " if where else "") + err["msg"].removeprefix("Value error, ")) \
            from None


def _documents(text: str | None):
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
_MAX_LIST_ITEMS = 64


def _int_list(flag: str, text: str, cap: int | None = None) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4) (duplicates dropped), each positive and at most cap; BadInput otherwise."""
    try:
        vals = tuple(dict.fromkeys(int(x) for x in text.split(",")))
        if min(vals) <= 0:
            raise ValueError
    except ValueError:
        raise BadInput(f"{flag} {text!r}: want positive integers separated by commas (e.g. 1,2,4,8)") from None
    if len(vals) > _MAX_LIST_ITEMS:
        raise BadInput(f"{flag}: {len(vals)} values, past the cap of {_MAX_LIST_ITEMS}; give fewer")
    if cap is not None and max(vals) > cap:
        raise BadInput(f"{flag} {max(vals)} is past the cap of {cap:,}; give at most {cap:,}")
    return vals


def read_plan_file(path: str):
    """A PlanFile from disk, checked as every command needs it (planner.planfile.load_plan_file: safe read, strict
    parsing, names resolved, the rules `estimate` applies); BadInput or Infeasible in one line otherwise."""
    from planner.planfile import load_plan_file

    return load_plan_file(path).pf


def cmd_estimate(args) -> None:
    from planner.cost.estimate import estimate
    from planner.importers import load_model
    from planner.core.plan import Workload

    if args.plan:
        # Everything comes from the plan file (what `plan --save` wrote); the flags that pick a plan are
        # refused rather than silently ignored.
        given = [f for f in ("model", "cluster", "nodes", "mbs", "gbs", "seq") if getattr(args, f) is not None]
        if given:
            raise BadInput(f"--plan {args.plan} fixes the model, cluster and plan; drop --{given[0]}")
        pf = read_plan_file(args.plan)
        from planner.core.limits import check_plan_file

        check_plan_file(pf, args.plan)
        model = load_model(pf.model)
        cluster = catalog.load_cluster(pf.cluster, pf.nodes)
        plan, workload = pf.plan, pf.workload
    else:
        missing = [f"--{f}" for f in ("model", "cluster", "mbs", "gbs", "seq") if getattr(args, f) is None]
        if missing:
            raise BadInput(f"planner estimate: the following arguments are required: {', '.join(missing)} "
                           "(or --plan PLAN.json)")
        model = load_model(args.model)
        cluster = catalog.load_cluster(args.cluster, args.nodes)
        plan = _plan_from_args(args, cluster)
        workload = Workload(global_batch=args.gbs, seq_len=args.seq, dtype=args.dtype,
                            documents=_documents(args.documents))
        if plan.attention_pool and workload.documents is None:
            raise BadInput("--attention-pool balances variable-length documents: give --documents MEAN[:MAX] too")
        from planner.core.limits import check_microbatches

        check_microbatches(args.gbs, cluster.device_count, mbs=plan.mbs, dp=plan.dp)
    est = estimate(model, cluster, workload, plan)
    out = est.model_dump()
    out["plan"] = plan.model_dump()
    text = (f"step {est.step_time_s:.3f} s   {est.tokens_per_s:,.0f} tokens/s   MFU {est.mfu:.1%}   "
            f"HFU {est.hfu:.1%}\n"
            f"memory {est.peak_memory_bytes / 1e9:.1f} / {est.memory_capacity_bytes / 1e9:.0f} GB per device "
            f"({'fits' if est.fits else 'DOES NOT FIT'})\n{est.why}\n" +
            "\n".join(f"  {k:<22} {v:10.4f} s" for k, v in est.breakdown.items()) + "\n" +
            "\n".join(f"  {k:<22} {v / 1e9:10.2f} GB" for k, v in est.memory.items()))
    _emit(out, args.json, text)


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
    _emit(res, args.json, "\n".join(lines))
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


# ---------------------------------------------------------------------------------------------------
# plan


def _constraints_from_args(args):
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
                    overlap_tp_comm=args.overlap_tp_comm,
                    moe_dispatch=(args.moe_dispatch,) if args.moe_dispatch else ("a2a", "tp_slice", "deepep"),
                    offload_activations=(0.0, 0.5, 0.75, 1.0) if args.offload_activations else (0.0,),
                    seq_chunks=_int_list("--seq-chunks", args.seq_chunks, MAX_SEQ_LEN),
                    attention_pool=(False, True) if args.attention_pool else (False,))
    c.check()
    check_constraints(c)
    return c




def cmd_plan(args) -> None:
    from planner.importers import load_model
    from planner.core.plan import PlanFile, Workload
    from planner.search.search import search

    from planner.files import check_output
    from planner.core.limits import MAX_HETERO_MICROBATCHES, MAX_MICROBATCHES, check_microbatches

    save = Path(args.save) if args.save is not None else None
    if save is not None:  # refuse before searching, not after ('' too: it is not "no file")
        check_output(args.save, args.force, "--save")
    constraints = _constraints_from_args(args)
    documents = _documents(args.documents)
    model = load_model(args.model)
    cluster = catalog.load_cluster(args.cluster, args.nodes)
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
        return hetero_cli.cmd_plan(args, model, cluster, workload, kind, save, _emit, _write_atomic)
    res = search(model, cluster, workload, constraints, top_k=args.top)
    if save is not None:
        best = res.plans[0]
        pf = PlanFile(model=args.model, cluster=args.cluster, nodes=args.nodes, workload=workload, plan=best.plan,
                      estimate=best.estimate)
        _write_atomic(save, pf.model_dump_json(indent=2) + "\n")
    out = {"plans": [rp.as_dict(model) for rp in res.plans], "search": res.summary()}
    lines = [f"{model.name} on {cluster.name} ({cluster.device_count} devices), global batch {workload.global_batch}, "
             f"seq {workload.seq_len}, {workload.dtype}",
             f"{'#':>2} {'tp':>3} {'pp':>3} {'dp':>5} {'vpp':>3} {'cp':>3} {'ep':>3} {'zero':>4} {'sp':>3} {'mbs':>3} "
             f"{'moe':<8} {'recompute':<9} {'schedule':<16} {'step s':>9} {'tokens/s':>12} {'MFU':>6} "
             f"{'mem GB':>7}  why"]
    for i, rp in enumerate(res.plans, 1):
        p, e = rp.plan, rp.estimate
        rec = p.recompute if p.recompute_num_layers is None else f"full:{p.recompute_num_layers}"
        # what the columns do not show: sequence chunks, activation offload, the attention pool
        sched = (p.schedule + ("*" if p.partition is not None else "")
                 + (f" c{p.seq_chunks}" if p.seq_chunks > 1 else "")
                 + (f" off{p.offload.activations:g}" if p.offload.activations else "")
                 + (" pool" if p.attention_pool else ""))
        moe_col = p.moe_dispatch if any(layer.kind == "moe" for layer in model.layers) else "-"
        lines.append(f"{i:>2} {p.tp:>3} {p.pp:>3} {p.dp:>5} {p.vpp:>3} {p.cp:>3} {p.ep:>3} {p.zero:>4} "
                     f"{'y' if p.sp else '-':>3} {p.mbs:>3} {moe_col:<8} {rec:<9} {sched:<16} {e.step_time_s:9.3f} "
                     f"{e.tokens_per_s:12,.0f} {e.mfu:6.1%} {e.peak_memory_bytes / 1e9:7.1f}  {e.why}")
    lines.append(f"searched {res.enumerated:,} plans: {res.pruned_memory:,} pruned by memory, {res.pruned_bound:,} "
                 f"by the step-time bound, {res.evaluated:,} costed, in {res.wall_s:.2f} s"
                 + (" (* uneven stage partition)" if any(rp.plan.partition for rp in res.plans) else "")
                 + ("; schedule cN: N sequence chunks, offF: share of activations offloaded, pool: attention pool"
                    if any(rp.plan.seq_chunks > 1 or rp.plan.offload.activations or rp.plan.attention_pool
                           for rp in res.plans) else ""))
    if save is not None:
        lines.append(f"best plan written to {save}")
    _emit(out, args.json, "\n".join(lines))


# ---------------------------------------------------------------------------------------------------
# simulate and sweep (planner/app/viz.py, planner/app/sweep.py)


def cmd_simulate(args) -> None:
    from planner.files import check_output
    from planner.planfile import load_plan_file
    from planner.app.viz import plot_timeline, timeline

    if args.output == "":
        raise BadInput("-o '': give an image file name (.png, .svg or .pdf), or leave -o out")
    out = Path(args.output) if args.output else None
    if out is None and not args.json:
        out = Path(args.plan).with_suffix(".timeline.png")
    if out is not None:  # refuse before simulating, not after
        if out.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise BadInput(f"{out}: unknown image format '{out.suffix}'; use .png, .svg or .pdf")
        check_output(out, args.force)
    loaded = load_plan_file(args.plan)
    pf = loaded.pf
    tl = timeline(loaded.model, loaded.cluster, pf.workload, pf.plan)
    if out is not None:
        plot_timeline(tl, str(out))
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
    _emit(tl.as_dict(), args.json, "\n".join(lines))


def cmd_sweep(args) -> None:
    from planner.files import check_output
    from planner.app.sweep import parse_list, sweep, write_csv

    from planner.core.limits import MAX_DEVICES, MAX_GLOBAL_BATCH, MAX_SEQ_LEN

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
            _emit(json.loads(df.to_json(orient="records")), True, "")
        else:
            sys.stdout.write(df.to_csv(index=False, float_format="%.6g"))
        return
    write_csv(df, out, force=args.force)
    if args.json:  # the CSV is written; stdout gets the same rows as JSON instead of the summary
        return _emit(json.loads(df.to_json(orient="records")), True, "")
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


# ---------------------------------------------------------------------------------------------------
# export (planner/export/)


def cmd_export(args) -> None:
    from planner.export import context_of, export_text
    from planner.files import check_output
    from planner.planfile import load_plan_file

    if args.output == "":
        raise BadInput("-o '': give a file name, or leave -o out to write to stdout")
    out = Path(args.output) if args.output else None
    if out is not None:  # refuse before loading anything, not after
        check_output(out, args.force)
    # the plan file as `estimate` would take it, or one line: never a launch script for a plan it refuses
    ctx = context_of(load_plan_file(args.plan))
    text = export_text(ctx, args.to)
    if args.to == "deepspeed":  # JSON has no comments: say on stderr what the file cannot
        from planner.export.deepspeed import notes

        for line in notes(ctx):
            print(f"note: {line}", file=sys.stderr)
    if out is None:
        sys.stdout.write(text)
    else:
        _write_atomic(out, text)
        print(f"{args.to} configuration written to {out}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# validate and calibrate: the torch backend (planner/backends/torch/), imported only when asked for


def _torch_backend(args) -> None:
    if args.backend != "torch":
        raise BadInput(f"unknown backend '{args.backend}'; the only backend is 'torch'")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BadInput("the torch backend needs torch: pip install torch==2.13.0 (the CPU wheel is enough)") from None


def cmd_validate(args) -> None:
    _torch_backend(args)
    from planner.backends.torch.runner import RunOptions
    from planner.backends.torch.validate import MAX_NPROC, check_nproc, report_text, validate
    from planner.planfile import load_plan_file

    # steps: a validation run is a handful of steps (default 6); 1000 is already minutes of a real model
    for flag, cap in (("nproc", MAX_NPROC), ("steps", 1000), ("threads", MAX_NPROC)):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise BadInput(f"--{flag} must be a positive integer, got {v}")
        if v is not None and v > cap:
            raise BadInput(f"--{flag} {v} is past the cap of {cap}")
    if args.warmup < 0:
        raise BadInput(f"--warmup must be >= 0, got {args.warmup}")
    loaded = load_plan_file(args.plan)  # checked as `estimate` checks it, before anything is started
    check_nproc(args.nproc, loaded.pf.plan.devices)
    opts = RunOptions(steps=args.steps, warmup=args.warmup, seed=args.seed, device=args.device,
                      threads=args.threads)
    res = validate(loaded.pf, args.nproc, opts, force=args.force)
    _emit(res, args.json, report_text(res))


def cmd_calibrate(args) -> None:
    _torch_backend(args)
    from planner.backends.torch.calibrate import calibrate, report_text

    from planner.backends.torch.validate import usable_cores

    if args.nproc is not None and args.nproc < 2:
        raise BadInput(f"--nproc must be at least 2 (collectives need two processes), got {args.nproc}")
    # one rank per core (or GPU) is what a plan runs; four per core already measures only contention
    cap = 4 * max(1, usable_cores())
    if args.nproc is not None and args.nproc > cap:
        raise BadInput(f"--nproc {args.nproc}: at most {cap} (4 per usable core) on this machine; "
                       "leave it out for one process per core")
    if args.out_dir == "":
        raise BadInput("--out-dir is empty; give a folder, or leave --out-dir out for your data folder")
    res = calibrate(nproc=args.nproc, quick=args.quick, out_dir=args.out_dir, force=args.force,
                    dry_run=args.dry_run)
    _emit(res, args.json, report_text(res))


def _add_backend_commands(sub) -> None:
    va = sub.add_parser("validate", help="run a plan file for real (torch.distributed) and compare with the prediction")
    va.add_argument("plan", metavar="PLAN.json", help="a plan file (plan --save)")
    va.add_argument("--backend", default="torch", help="execution backend (torch)")
    va.add_argument("--nproc", type=int, help="processes: the plan's dp*tp*pp*cp, the default (at most 4 per core "
                    "and 1024)")
    va.add_argument("--steps", type=int, default=6, help="training steps, warm-up included (default 6)")
    va.add_argument("--warmup", type=int, default=2, help="steps left out of the median (default 2)")
    va.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: one GPU per process with NCCL when there are enough, else CPU with gloo")
    va.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    va.add_argument("--seed", type=int, default=0)
    va.add_argument("--force", action="store_true",
                    help="run even when the plan's predicted peak memory per process exceeds this machine's")
    va.add_argument("--json", action="store_true")
    va.set_defaults(func=cmd_validate)

    ca = sub.add_parser(
        "calibrate", help="measure this machine into your own `local` cluster preset (start with --quick)",
        description="Measure this machine (torch) and write the `local` device, link and node profile into your "
                    "data folder (platformdirs: $XDG_DATA_HOME or ~/.local/share/parallel-planner/calibration), "
                    "never into the package. Start with `planner calibrate --backend torch --quick` (about 2 "
                    "minutes on 2 cores); a full calibration takes about 6 minutes there and prints its progress.")
    ca.add_argument("--backend", default="torch", help="measurement backend (torch)")
    ca.add_argument("--nproc", type=int, help="processes for the collective measurements (default: the cores, >= 2)")
    ca.add_argument("--quick", action="store_true",
                    help="the first step: fewer shapes and sizes, about 2 minutes (a first look, not a profile to trust)")
    ca.add_argument("--out-dir", metavar="DIR",
                    help="write devices/ links/ nodes/ and calibration.json under DIR (created) instead of your data "
                         "folder; plan on it with --cluster DIR")
    ca.add_argument("--force", action="store_true", help="replace an existing full calibration (a --quick one is "
                                                         "replaced without it)")
    ca.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    ca.add_argument("--json", action="store_true")
    ca.set_defaults(func=cmd_calibrate)


# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="planner", description="Parallelism planner and cost model for distributed training.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prof = sub.add_parser("profiles", help="list and show device, link, cluster and model presets")
    prof_sub = prof.add_subparsers(dest="action", required=True, parser_class=_Parser)
    pl = prof_sub.add_parser("list", help="every preset name")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_profiles_list)
    ps = prof_sub.add_parser("show", help="one preset, or a config.json / model / cluster file")
    ps.add_argument("name")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_profiles_show)

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
    est.add_argument("--gbs", type=int)
    est.add_argument("--seq", type=int)
    est.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    est.add_argument("--recompute-num-layers", type=int,
                     help="with --recompute full: blocks per pipeline chunk recomputed (Megatron block method)")
    est.add_argument("--schedule", choices=SCHEDULES)
    est.add_argument("--dtype", choices=dtypes.TRAIN_DTYPES, default="bf16")
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
    est.add_argument("--json", action="store_true")
    est.set_defaults(func=cmd_estimate)

    pl = sub.add_parser("plan", help="search for the fastest plans that fit (top K, best first)")
    pl.add_argument("--model", required=True, help="catalog name, config.json or model file")
    pl.add_argument("--cluster", required=True, help="catalog name or cluster file")
    pl.add_argument("--nodes", type=int)
    pl.add_argument("--gbs", type=int, required=True)
    pl.add_argument("--seq", type=int, required=True)
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
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--save", metavar="PLAN.json", help="write the best plan as a plan file")
    pl.add_argument("--force", action="store_true", help="with --save: overwrite an existing file")
    pl.set_defaults(func=cmd_plan)

    sim = sub.add_parser("simulate", help="timeline of one step of a plan file: Gantt chart, memory, events")
    sim.add_argument("plan", metavar="PLAN.json", help="a plan file (plan --save)")
    sim.add_argument("-o", "--output", metavar="FILE",
                     help="image to write (.png, .svg, .pdf); default PLAN.timeline.png, none with --json")
    sim.add_argument("--json", action="store_true", help="print the event list (every op, gap and phase)")
    sim.add_argument("--force", action="store_true", help="overwrite an existing image")
    sim.set_defaults(func=cmd_simulate)

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

    ex = sub.add_parser("export", help="a plan file as launcher arguments or config (Megatron, DeepSpeed, torchtitan)")
    ex.add_argument("plan", metavar="PLAN.json", help="a plan file (plan --save)")
    ex.add_argument("--to", required=True, choices=["megatron", "deepspeed", "torchtitan", "torchtitan-py"],
                    help="megatron: pretrain_gpt.py launch script; deepspeed: ds_config JSON; torchtitan: TOML "
                         "job config (0.2.x); torchtitan-py: Python Trainer.Config (0.3 and later)")
    ex.add_argument("-o", "--output", metavar="FILE", help="file to write (default: stdout)")
    ex.add_argument("--force", action="store_true", help="overwrite an existing -o file")
    ex.set_defaults(func=cmd_export)

    _add_backend_commands(sub)

    bt = sub.add_parser("backtest", help="predict a table of published runs and report the error")
    bt.add_argument("--runs", required=True, help="CSV in the columns of calibration_runs_clean.csv")
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=cmd_backtest)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
        return 0
    except PlannerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
