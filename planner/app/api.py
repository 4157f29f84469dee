"""The Python API: what the notebooks use, with results as pandas DataFrames.

    from planner.app import api
    top = api.plan("llama3-70b", "dgx-h100", nodes=8, gbs=128, seq=8192, top=5)   # DataFrame, best first
    top[["label", "step_time_s", "mfu", "peak_memory_gb", "why"]]
    best = top.loc[1, "plan"]                      # the ParallelPlan; top.loc[1, "estimate"]: its Estimate
    est = api.estimate("llama3-70b", "dgx-h100", nodes=8, gbs=128, seq=8192, tp=4, pp=4, vpp=5, sp=True,
                       mbs=1, zero=1, recompute="full")
    tl = api.timeline("llama3-70b", "dgx-h100", nodes=8, gbs=128, seq=8192, plan=best)
    api.plot_timeline(tl, "timeline.png")
    grid = api.sweep(["llama3-8b", "llama3-70b"], "dgx-h100", nodes=[1, 2, 4], seqs=[4096, 8192], gbs=512)
    api.estimate("llama3-8b", "dgx-h100", gbs=64, seq=8192, tp=2, mbs=1, stack="torchtitan")  # a software stack

`stack=` names a software stack (hardware_profiles/stacks/, `profiles list`): its efficiencies on the
cluster's devices, the plan fields it decides (flash attention, overlapped gradient reduction, TP overlap)
unless given explicitly, the pipeline schedules the search may use, and the estimate's error band.

Models and clusters are catalog names or paths (as on the command line) or objects already loaded
(ModelGraph, Cluster). Errors are the planner's own: BadInput for a request that is wrong, Infeasible (or
its NoPlanFits, with the closest plans attached) when no plan fits.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from planner.app.loaders import load_cluster, load_model, with_link
from planner.app.rows import plan_row
from planner.app.sweep import stack_search
from planner.core.errors import BadInput
from planner.core.hardware import Cluster
from planner.core.model import ModelGraph
from planner.core.plan import Estimate, ParallelPlan, PlanFile, Workload

__all__ = [
    "load_model", "load_cluster", "with_link", "workload", "make_plan", "plan", "plan_row", "estimate", "stack_search",
    "estimates", "breakdown", "memory", "timeline", "simulate", "plot_timeline", "plot_breakdown", "sweep",
    "to_plan_file", "save_plan", "load_plan",
]


# ---------------------------------------------------------------------------------------------------------
# inputs (load_model, load_cluster, with_link: planner.app.loaders, shared with the sweep)


def workload(gbs: int, seq: int, dtype: str = "bf16", **extra) -> Workload:
    """Workload(global_batch=gbs, seq_len=seq, dtype=dtype, ...), refusing bad values as BadInput."""
    return _validated(Workload, "workload", global_batch=gbs, seq_len=seq, dtype=dtype, **extra)


def _validated(cls, what: str, **fields):
    from pydantic import ValidationError

    try:
        return cls(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise BadInput(f"{what}: {where + ': ' if where else ''}"
                       f"{err['msg'].removeprefix('Value error, ')}") from None


def make_plan(cluster: Cluster, **fields) -> ParallelPlan:
    """A ParallelPlan from keyword fields (tp, pp, dp, vpp, cp, ep, zero, sp, mbs, recompute, schedule, ...).
    dp defaults to devices / (tp*pp*cp); the schedule to interleaved-1f1b when vpp > 1, else 1f1b."""
    tp, pp, cp = fields.get("tp", 1), fields.get("pp", 1), fields.get("cp", 1)
    for k in ("tp", "pp", "cp"):
        v = fields.get(k, 1)
        if not isinstance(v, int) or v < 1:
            raise BadInput(f"{k} must be a positive integer, got {v!r}")
    if fields.get("dp") is None:
        if cluster.device_count % (tp * pp * cp):
            raise BadInput(f"{cluster.device_count} devices are not divisible by tp*pp*cp = {tp * pp * cp}")
        fields["dp"] = cluster.device_count // (tp * pp * cp)
    if fields.get("schedule") is None:
        fields["schedule"] = "interleaved-1f1b" if fields.get("vpp", 1) > 1 else "1f1b"
    return _validated(ParallelPlan, "plan", **fields)


# ---------------------------------------------------------------------------------------------------------
# plan: the search


def _constraints(**kw):
    from planner.search.space import Constraints

    known = {f.name for f in dataclasses.fields(Constraints)}
    for k in kw:
        if k not in known:
            from planner.core.errors import did_you_mean

            raise BadInput(f"unknown constraint '{k}'{did_you_mean(k, known)}; constraints are: "
                           + ", ".join(sorted(known)))
    if "offload_optimizer" in kw and isinstance(kw["offload_optimizer"], (int, float)):
        kw["offload_optimizer"] = (float(kw["offload_optimizer"]),)
    c = Constraints(**kw)
    c.check()
    return c


def _frame(rows: list[dict], objects: list[tuple[ParallelPlan, Estimate]], attrs: dict):
    import pandas as pd

    df = pd.DataFrame(rows)
    df.index = pd.RangeIndex(1, len(rows) + 1, name="rank")
    df["plan"] = [p for p, _ in objects]
    df["estimate"] = [e for _, e in objects]
    df.attrs.update(attrs)
    return df


def _stacked(cl: Cluster, stack: str | None):
    """(the cluster running `stack`, the Stack) or (cl, None) without one; BadInput for an unknown stack."""
    if stack is None:
        return cl, None
    from planner import catalog

    st = catalog.load_stack(stack)
    return cl.with_stack(st), st


def plan(model: str | ModelGraph, cluster: str | Cluster, nodes: int | None = None, *, gbs: int, seq: int,
         dtype: str = "bf16", top: int = 5, link: str | None = None, refine_partition: bool = True,
         progress: bool | None = False, stack: str | None = None, **constraints):
    """The `top` fastest plans that fit, best first, as a DataFrame indexed by rank (1 = best).

    Columns: label, tp, pp, dp, vpp, cp, ep, etp, zero, sp, mbs, recompute, recompute_num_layers, schedule,
    uneven_partition, step_time_s, tokens_per_s, mfu, hfu, peak_memory_gb, memory_capacity_gb, fits,
    bubble_s, why, and the objects: plan (ParallelPlan) and estimate (Estimate). df.attrs holds the model,
    cluster, nodes, link, workload and the search's counts. Keyword constraints are those of `plan` on the
    command line (planner.search.space.Constraints: tp=4, max_pp=8, recompute="full", sp=True,
    allow_cross_node_tp=True, ...). stack: a software stack's plan fields (unless given as constraints) and
    only its pipeline schedules (stack_search).
    """
    cl, st = _stacked(load_cluster(cluster, nodes, link), stack)
    c = _constraints(**{**(st.plan_defaults.model_dump() if st else {}), **constraints})
    m = load_model(model)
    w = workload(gbs, seq, dtype)
    res = stack_search(m, cl, w, c, st, top_k=top, refine_partition=refine_partition, progress=progress)
    attrs = {"model": model if isinstance(model, str) else m.name,
             "cluster": cluster if isinstance(cluster, str) else cl.name, "nodes": nodes, "link": link,
             "stack": st.name if st else None, "devices": cl.device_count, "workload": w.model_dump(),
             "search": res.summary()}
    return _frame([plan_row(rp.plan, rp.estimate) for rp in res.plans],
                  [(rp.plan, rp.estimate) for rp in res.plans], attrs)


# ---------------------------------------------------------------------------------------------------------
# fixed plans


def _resolve_plan(cl: Cluster, plan: ParallelPlan | dict | str | None, fields: dict) -> ParallelPlan:
    """The plan with the fields given; on a cluster running a stack, the stack's plan fields first (a field
    given explicitly, as a keyword or in a dict, wins)."""
    if cl.stack is not None:
        defaults = cl.stack.plan_defaults.model_dump()
        if isinstance(plan, ParallelPlan):
            plan = {**plan.model_dump(), **defaults}
        elif isinstance(plan, dict):
            plan = {**defaults, **plan}
        else:
            fields = {**defaults, **fields}
    if isinstance(plan, ParallelPlan):
        if fields:
            return _validated(ParallelPlan, "plan", **{**plan.model_dump(), **fields})
        return plan
    if isinstance(plan, dict):
        return make_plan(cl, **{**plan, **fields})
    if plan is not None:
        raise BadInput(f"plan must be a ParallelPlan or a dict of its fields, got {type(plan).__name__}")
    return make_plan(cl, **fields)


def estimate(model: str | ModelGraph, cluster: str | Cluster, nodes: int | None = None, *, gbs: int, seq: int,
             dtype: str = "bf16", link: str | None = None, plan: ParallelPlan | dict | None = None,
             stack: str | None = None, **fields) -> Estimate:
    """estimate() of one plan: a ParallelPlan, a dict of its fields, or the fields as keywords (tp=4, pp=2,
    mbs=1, ...; dp defaults to what the devices leave). stack: a software stack (its efficiencies, plan
    fields and error band)."""
    from planner.cost.estimate import estimate as _estimate

    m = load_model(model)
    cl, st = _stacked(load_cluster(cluster, nodes, link), stack)
    if st is not None and plan is None and fields.get("schedule"):
        st.check_schedule(fields["schedule"], "schedule")
    return _estimate(m, cl, workload(gbs, seq, dtype), _resolve_plan(cl, plan, fields))


def estimates(model: str | ModelGraph, cluster: str | Cluster, plans: dict[str, Any] | list, nodes: int | None = None,
              *, gbs: int, seq: int, dtype: str = "bf16", link: str | None = None, stack: str | None = None):
    """Estimates of several fixed plans (a {name: plan or field dict} or a list) as a DataFrame like plan()'s,
    indexed by name, in the order given (not ranked)."""
    import pandas as pd

    m = load_model(model)
    cl, st = _stacked(load_cluster(cluster, nodes, link), stack)
    w = workload(gbs, seq, dtype)
    from planner.cost.estimate import estimate as _estimate

    items = list(plans.items()) if isinstance(plans, dict) else [(None, p) for p in plans]
    rows, objs, names = [], [], []
    for name, p in items:
        pl = _resolve_plan(cl, p, {})
        est = _estimate(m, cl, w, pl)
        row = plan_row(pl, est)
        rows.append(row)
        objs.append((pl, est))
        names.append(name if name is not None else row["label"])
    df = _frame(rows, objs, {"model": model if isinstance(model, str) else m.name,
                             "cluster": cluster if isinstance(cluster, str) else cl.name, "nodes": nodes,
                             "link": link, "stack": st.name if st else None, "devices": cl.device_count,
                             "workload": w.model_dump()})
    df.index = pd.Index(names, name="plan_name")
    return df


def breakdown(table) -> Any:
    """Step-time breakdown (seconds, estimate()'s terms) of each plan of a plan()/estimates() table, or of
    one Estimate, as a DataFrame (one row per plan)."""
    import pandas as pd

    if isinstance(table, Estimate):
        return pd.DataFrame([table.breakdown])
    df = pd.DataFrame([e.breakdown for e in table["estimate"]], index=table.index)
    df.insert(0, "label", list(table["label"]))
    return df


def memory(est: Estimate | Any) -> Any:
    """Per pipeline stage memory (GB: weights, gradients, optimizer, activations, overhead, total) of an
    Estimate (or the best plan of a plan() table) as a DataFrame indexed by stage."""
    import pandas as pd

    if not isinstance(est, Estimate):
        est = est["estimate"].iloc[0]
    rows = [{k.removesuffix("_bytes"): v / 1e9 for k, v in s.items() if k.endswith("_bytes")} for s in est.stages]
    df = pd.DataFrame(rows)
    df.index.name = "stage"
    df["capacity"] = est.memory_capacity_bytes / 1e9
    return df


# ---------------------------------------------------------------------------------------------------------
# timeline


def timeline(model: str | ModelGraph, cluster: str | Cluster, nodes: int | None = None, *, gbs: int, seq: int,
             dtype: str = "bf16", link: str | None = None, plan: ParallelPlan | dict | None = None,
             stack: str | None = None, **fields):
    """The simulated step of one plan (planner.app.viz.Timeline: ops, gaps, phases, memory, its Estimate)."""
    from planner.app.viz import timeline as _timeline

    m = load_model(model)
    cl, _ = _stacked(load_cluster(cluster, nodes, link), stack)
    return _timeline(m, cl, workload(gbs, seq, dtype), _resolve_plan(cl, plan, fields))


def simulate(plan_file: str | Path | PlanFile):
    """The Timeline of a plan file (what `plan --save` writes), as `simulate PLAN.json` draws it."""
    from planner.app.viz import timeline as _timeline

    pf = load_plan(plan_file) if not isinstance(plan_file, PlanFile) else plan_file
    m = load_model(pf.model)
    cl, _ = _stacked(load_cluster(pf.cluster, pf.nodes), pf.stack)
    return _timeline(m, cl, pf.workload, pf.plan)


def plot_timeline(tl, path: str | Path | None = None, title: str | None = None):
    """Gantt chart and per-stage memory of a Timeline (planner.app.viz.plot_timeline); with path, also written."""
    from planner.app.viz import plot_timeline as _plot

    return _plot(tl, None if path is None else str(path), title=title)


def plot_breakdown(table, ax=None, title: str | None = None):
    """Stacked bars of each plan's step-time breakdown (planner.app.viz.plot_breakdown)."""
    from planner.app.viz import plot_breakdown as _plot

    return _plot(table, ax=ax, title=title)


# ---------------------------------------------------------------------------------------------------------
# sweep and plan files


def sweep(models, clusters, nodes=None, seqs=(4096,), gbs=(512,), links=None, dtypes=("bf16",), stacks=None,
          refine_partition: bool = True, progress: bool | None = False, executor: str = "serial",
          workers: int | None = None, scheduler: str | None = None, **constraints):
    """The best plan of every cell of a what-if grid (planner.app.sweep.sweep) as a DataFrame. stacks: software
    stacks as one more axis (None: no stack); executor / workers / scheduler: serial or on Dask, as there."""
    from planner.app.sweep import sweep as _sweep

    c = _constraints(**constraints) if constraints else None
    return _sweep(models, clusters, nodes=nodes, seqs=seqs, gbs=gbs, links=links, dtypes=dtypes, stacks=stacks,
                  constraints=c, refine_partition=refine_partition, progress=progress, executor=executor,
                  workers=workers, scheduler=scheduler)


def to_plan_file(table, rank: int = 1) -> PlanFile:
    """The PlanFile of one row of a plan()/estimates() table (rank: its index value)."""
    a = table.attrs
    if "model" not in a or "workload" not in a:
        raise BadInput("this table has no model/cluster/workload in its attrs: use a table from api.plan()")
    try:
        row = table.loc[rank]
    except KeyError:
        raise BadInput(f"no plan with rank {rank!r} in this table (ranks: {list(table.index)})") from None
    if a.get("link"):
        raise BadInput("a plan file names a catalog cluster; this table was searched with link "
                       f"'{a['link']}', which a plan file cannot record")
    return PlanFile(model=str(a["model"]), cluster=str(a["cluster"]), nodes=a.get("nodes"),
                    workload=Workload(**a["workload"]), plan=row["plan"], estimate=row["estimate"],
                    stack=a.get("stack"))


def save_plan(table_or_file, path: str | Path, rank: int = 1, force: bool = False) -> Path:
    """Write a PlanFile (or the row `rank` of a plan() table) as JSON, atomically; an existing file needs
    force. Returns the path."""
    from planner.files import check_output, write_atomic

    pf = table_or_file if isinstance(table_or_file, PlanFile) else to_plan_file(table_or_file, rank)
    path = Path(path)
    check_output(path, force)
    write_atomic(path, pf.model_dump_json(indent=2) + "\n")
    return path


def load_plan(path: str | Path) -> PlanFile:
    """A plan file from disk, checked as the commands check it (BadInput or Infeasible, one line, for a
    missing, broken or unknown-version file or one `estimate` refuses)."""
    from planner.planfile import load_plan_file

    return load_plan_file(str(path)).pf
