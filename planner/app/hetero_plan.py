"""`plan` on clusters that are not a row of identical nodes on one fabric: which planner takes them, and how
its answer is printed (text or --json) and saved.

  edge      nodes that are a CPU and a GPU sharing memory (phones): planner/cost/edge.plan_edge
  hetero    several device types (A100 beside H100): planner/search/hetero.plan_hetero
  islands   one device type on several islands (two pods joined by Ethernet): planner/search/ilp.plan_topology
"""
from __future__ import annotations

from planner.core.errors import BadInput, Infeasible
from planner.core.hardware import Cluster


def route(cluster: Cluster) -> str | None:
    """Which planner a cluster needs; None: the ordinary search."""
    kinds = {cluster.devices[i].device.kind for n in cluster.nodes for i in n.devices}
    if all(n.node_type.shared_memory for n in cluster.nodes) and any(k in ("cpu", "mobile-cpu") for k in kinds) \
            and any(len(n.devices) > 1 for n in cluster.nodes):
        return "edge"
    if len({d.device.name for d in cluster.devices}) > 1:
        return "hetero"
    if len({n.island for n in cluster.nodes}) > 1:
        return "islands"
    return None


def _fixed(args) -> list[str]:
    return [f"--{f.replace('_', '-')}" for f in ("tp", "pp", "dp", "cp", "ep", "vpp", "zero", "recompute", "schedule")
            if getattr(args, f, None) is not None]


# The search options of `plan` none of these planners take (they search their own, smaller spaces):
# (attribute, flag, whether the user set it). --mbs is applied by the hetero and edge planners (their
# micro-batch size), not by the islands planner, whose ILP places the ordinary search's plans.
_NOT_APPLIED = (
    ("max_tp", "--max-tp", lambda v: v is not None),
    ("max_pp", "--max-pp", lambda v: v is not None),
    ("max_cp", "--max-cp", lambda v: v is not None),
    ("sp", "--sp/--no-sp", lambda v: v is not None),
    ("allow_cross_node_tp", "--allow-cross-node-tp", bool),
    ("partial_recompute", "--partial-recompute", bool),
    ("offload", "--offload", bool),
    ("overlap_tp_comm", "--overlap-tp-comm", bool),
    ("moe_dispatch", "--moe-dispatch", lambda v: v is not None),
    ("offload_activations", "--offload-activations", bool),
    ("seq_chunks", "--seq-chunks", lambda v: v is not None and str(v).strip() != "1"),
    ("documents", "--documents", lambda v: v is not None),
    ("attention_pool", "--attention-pool", bool),
)


def not_applied(args, kind: str) -> list[str]:
    """The flags the user set that the `kind` planner would not apply."""
    out = [flag for attr, flag, given in _NOT_APPLIED if given(getattr(args, attr, None))]
    if kind == "islands" and getattr(args, "mbs", None) is not None:
        out.append("--mbs")
    return out


def cmd_plan(args, model, cluster: Cluster, workload, kind: str, save, emit, write_atomic) -> None:
    fixed = _fixed(args)
    if fixed:
        raise BadInput(f"cluster {cluster.name} is planned by the {kind} planner, which chooses the degrees "
                       f"itself; drop {fixed[0]}")
    ignored = not_applied(args, kind)
    if ignored:
        raise BadInput(f"cluster {cluster.name} is planned by the {kind} planner, which does not apply "
                       f"{', '.join(ignored)}; drop {'it' if len(ignored) == 1 else 'them'}")
    if kind == "edge":
        return _edge(args, model, cluster, workload, save, emit)
    if kind == "hetero":
        return _hetero(args, model, cluster, workload, save, emit, write_atomic)
    return _islands(args, model, cluster, workload, save, emit, write_atomic)


def _save(save, args, workload, plan, est, write_atomic) -> str:
    from planner.core.plan import PlanFile

    if save is None:
        return ""
    pf = PlanFile(model=args.model, cluster=args.cluster, nodes=args.nodes, workload=workload, plan=plan, estimate=est)
    write_atomic(save, pf.model_dump_json(indent=2) + "\n")
    return f"best plan written to {save}"


def _hetero(args, model, cluster, workload, save, emit, write_atomic) -> None:
    from planner.planners.hetero import plan_hetero

    mbs = (args.mbs,) if args.mbs else (1, 2, 4)
    res = plan_hetero(model, cluster, workload, mbs_options=mbs)
    best = res.best
    if args.mbs:
        # the baselines (one group alone, the even split) run the ordinary search, which picks its own
        # micro-batch size: with --mbs only a way that uses it can be the answer; the others stay as reference
        allowed = [c for c in res.candidates + list(res.alone.values()) + ([res.even] if res.even else [])
                   if c.fits and _mbs_of(c) == args.mbs]
        if not allowed:
            raise Infeasible(f"no plan with --mbs {args.mbs} fits on {cluster.name}; the best without it: "
                             f"{res.best.label} ({res.best.step_time_s:.3f} s per step); drop --mbs or change it")
        best = min(allowed, key=lambda c: c.step_time_s)
    rows = []
    if res.best_pipeline:
        rows.append(("heterogeneous pipeline", res.best_pipeline))
    if res.best_shares:
        rows.append(("unequal batch shares", res.best_shares))
    for name, c in res.alone.items():
        rows.append((f"{name} alone", c))
    if res.even:
        rows.append(("naive even split", res.even))
    lines = [f"{model.name} on {cluster.name} ({cluster.device_count} devices: "
             + ", ".join(f"{sum(d.device.name == t for d in cluster.devices)} {t}" for t in cluster.device_types)
             + f"), global batch {workload.global_batch}, seq {workload.seq_len}, {workload.dtype}",
             f"{'':<2} {'way':<24} {'step s':>9} {'tokens/s':>12}  plan"]
    for name, c in rows:
        mark = "*" if c is best else " "
        lines.append(f"{mark:<2} {name:<24} {c.step_time_s:9.3f} {c.tokens_per_s:12,.0f}  {c.label}")
    lines.append(f"* best; {res.evaluated} heterogeneous candidates costed in {res.wall_s:.2f} s")
    if save is not None:
        if best.plan is None:
            raise BadInput("the best plan gives device groups unequal batch shares, which a plan file cannot hold "
                           "yet; save is refused (drop --save)")
        lines.append(_save(save, args, workload, best.plan, best.estimate, write_atomic))
    others = [c for c in res.candidates if c is not best and (not args.mbs or _mbs_of(c) == args.mbs)]
    out = {"plans": [best.as_dict()] + [c.as_dict() for c in others[: max(0, (args.top or 1) - 1)]],
           "baselines": {"alone": {k: v.as_dict() for k, v in res.alone.items()},
                         "even": res.even.as_dict() if res.even else None},
           "search": {"evaluated": res.evaluated, "wall_s": res.wall_s, "planner": "hetero"}}
    emit(out, args.json, "\n".join(lines))


def _mbs_of(c) -> int | None:
    """The micro-batch size of a hetero candidate: its plan's, or (batch shares) its groups' plans'."""
    if c.plan is not None:
        return c.plan.mbs
    sizes = {g["plan"].mbs for g in c.groups if g.get("plan") is not None}
    return sizes.pop() if len(sizes) == 1 else None


def _islands(args, model, cluster, workload, save, emit, write_atomic) -> None:
    from planner.planners.ilp import plan_topology
    from planner.search.search import RankedPlan

    res = plan_topology(model, cluster, workload)
    b = res.best
    lines = [f"{model.name} on {cluster.name} ({cluster.device_count} devices on "
             f"{len({n.island for n in cluster.nodes})} islands), global batch {workload.global_batch}, "
             f"seq {workload.seq_len}, {workload.dtype}",
             f"{'':<2} {'way':<34} {'step s':>9} {'tokens/s':>12}  plan"]
    for name, plan, est in (("placed by the ILP", b.plan, b.estimate),
                            ("same nodes, one fabric (reference)", res.uniform_plan, res.uniform),
                            ("topology-blind (rank order)", res.blind_plan, res.blind)):
        lines.append(f"{'*' if est is b.estimate else ' ':<2} {name:<34} {est.step_time_s:9.3f} "
                     f"{est.tokens_per_s:12,.0f}  {RankedPlan(plan, est).label()}")
    per_stage = "; ".join(f"stage {s}: " + ", ".join(f"{k} on node {n}" for n, k in enumerate(row) if k)
                          for s, row in enumerate(b.placement.counts))
    lines.append(f"placement (tp groups per node): {per_stage}")
    lines.append(f"{len(res.placed)} structures placed in {res.wall_s:.2f} s")
    if save is not None:
        lines.append(_save(save, args, workload, b.plan, b.estimate, write_atomic))
    out = {"plans": [{**RankedPlan(r.plan, r.estimate).as_dict(model), "placement": r.placement.counts}
                     for r in res.placed[: args.top or 1]],
           "baselines": {"uniform": res.uniform.model_dump(), "blind": res.blind.model_dump()},
           "search": {"evaluated": len(res.placed), "wall_s": res.wall_s, "planner": "ilp"}}
    emit(out, args.json, "\n".join(lines))


def _edge(args, model, cluster, workload, save, emit) -> None:
    from planner.planners.edge import plan_edge

    if save is not None:
        raise BadInput("an edge plan (sub-models per phone and a CPU/GPU split) cannot be written as a plan file "
                       "yet; drop --save")
    p = plan_edge(model, cluster, workload, mbs=args.mbs or 1)
    if not p.fits:
        # plan_edge returns the split with the most headroom when none fits: that is the closest plan
        i = max(range(len(p.ranges)), key=lambda k: p.memory_bytes[k] / p.capacity_bytes[k])
        lo, hi = p.ranges[i]
        raise Infeasible(f"no plan fits: {model.name} on {cluster.name} needs {p.memory_bytes[i] / 1e9:.1f} GB on "
                         f"phone {i} (blocks {lo}-{hi - 1}), which has {p.capacity_bytes[i] / 1e9:.0f} GB; closest: "
                         f"blocks over {len(p.ranges)} phones, "
                         + ", ".join(f"{m / 1e9:.0f}/{c / 1e9:.0f} GB" for m, c in zip(p.memory_bytes,
                                                                                   p.capacity_bytes))
                         + "; try a smaller model, a shorter --seq or a cluster with more phones")
    lines = [f"{model.name} on {cluster.name} ({len(p.ranges)} phones), global batch {workload.global_batch}, "
             f"seq {workload.seq_len}",
             f"step {p.step_time_s:.3f} s   {p.tokens_per_s:,.1f} tokens/s   fits",
             f"CPU/GPU split of each block: {p.split.describe()}; one block on one phone: CPU+GPU "
             f"{p.one_phone['both'] * 1e3:.1f} ms, GPU only {p.one_phone['gpu'] * 1e3:.1f} ms "
             f"({p.one_phone['gpu'] / p.one_phone['both']:.2f}x), CPU only {p.one_phone['cpu'] * 1e3:.1f} ms "
             f"({p.one_phone['cpu'] / p.one_phone['both']:.2f}x)"]
    for i, ((lo, hi), mem, cap) in enumerate(zip(p.ranges, p.memory_bytes, p.capacity_bytes)):
        lines.append(f"  phone {i}: blocks {lo}-{hi - 1}  {mem / 1e9:6.2f} / {cap / 1e9:.0f} GB")
    emit({"plans": [p.as_dict()], "search": {"planner": "edge"}}, args.json, "\n".join(lines))
