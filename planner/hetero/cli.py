"""`plan` on clusters that are not a row of identical nodes on one fabric: which planner takes them, and how
its answer is printed (text or --json) and saved.

  edge      nodes that are a CPU and a GPU sharing memory (phones): planner/cost/edge.plan_edge
  hetero    several device types (A100 beside H100): planner/search/hetero.plan_hetero
  islands   one device type on several islands (two pods joined by Ethernet): planner/search/ilp.plan_topology
"""
from __future__ import annotations

from planner.errors import BadInput
from planner.hardware import Cluster


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


def cmd_plan(args, model, cluster: Cluster, workload, kind: str, save, emit, write_atomic) -> None:
    fixed = _fixed(args)
    if fixed:
        raise BadInput(f"cluster {cluster.name} is planned by the {kind} planner, which chooses the degrees "
                       f"itself; drop {fixed[0]}")
    if kind == "edge":
        return _edge(args, model, cluster, workload, save, emit)
    if kind == "hetero":
        return _hetero(args, model, cluster, workload, save, emit, write_atomic)
    return _islands(args, model, cluster, workload, save, emit, write_atomic)


def _save(save, args, workload, plan, est, write_atomic) -> str:
    from planner.plan import PlanFile

    if save is None:
        return ""
    pf = PlanFile(model=args.model, cluster=args.cluster, nodes=args.nodes, workload=workload, plan=plan, estimate=est)
    write_atomic(save, pf.model_dump_json(indent=2) + "\n")
    return f"best plan written to {save}"


def _hetero(args, model, cluster, workload, save, emit, write_atomic) -> None:
    from planner.search.hetero import plan_hetero

    mbs = (args.mbs,) if args.mbs else (1, 2, 4)
    res = plan_hetero(model, cluster, workload, mbs_options=mbs)
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
        mark = "*" if c is res.best else " "
        lines.append(f"{mark:<2} {name:<24} {c.step_time_s:9.3f} {c.tokens_per_s:12,.0f}  {c.label}")
    lines.append(f"* best; {res.evaluated} heterogeneous candidates costed in {res.wall_s:.2f} s")
    if save is not None:
        if res.best.plan is None:
            raise BadInput("the best plan gives device groups unequal batch shares, which a plan file cannot hold "
                           "yet; save is refused (drop --save)")
        lines.append(_save(save, args, workload, res.best.plan, res.best.estimate, write_atomic))
    out = {"plans": [res.best.as_dict()] + [c.as_dict() for c in res.candidates[: max(0, (args.top or 1) - 1)]],
           "baselines": {"alone": {k: v.as_dict() for k, v in res.alone.items()},
                         "even": res.even.as_dict() if res.even else None},
           "search": {"evaluated": res.evaluated, "wall_s": res.wall_s, "planner": "hetero"}}
    emit(out, args.json, "\n".join(lines))


def _islands(args, model, cluster, workload, save, emit, write_atomic) -> None:
    from planner.search.ilp import plan_topology
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
    from planner.cost.edge import plan_edge

    if save is not None:
        raise BadInput("an edge plan (sub-models per phone and a CPU/GPU split) cannot be written as a plan file "
                       "yet; drop --save")
    p = plan_edge(model, cluster, workload, mbs=args.mbs or 1)
    lines = [f"{model.name} on {cluster.name} ({len(p.ranges)} phones), global batch {workload.global_batch}, "
             f"seq {workload.seq_len}",
             f"step {p.step_time_s:.3f} s   {p.tokens_per_s:,.1f} tokens/s   {'fits' if p.fits else 'DOES NOT FIT'}",
             f"CPU/GPU split of each block: {p.split.describe()}; one block on one phone: CPU+GPU "
             f"{p.one_phone['both'] * 1e3:.1f} ms, GPU only {p.one_phone['gpu'] * 1e3:.1f} ms "
             f"({p.one_phone['gpu'] / p.one_phone['both']:.2f}x), CPU only {p.one_phone['cpu'] * 1e3:.1f} ms "
             f"({p.one_phone['cpu'] / p.one_phone['both']:.2f}x)"]
    for i, ((lo, hi), mem, cap) in enumerate(zip(p.ranges, p.memory_bytes, p.capacity_bytes)):
        lines.append(f"  phone {i}: blocks {lo}-{hi - 1}  {mem / 1e9:6.2f} / {cap / 1e9:.0f} GB")
    emit({"plans": [p.as_dict()], "search": {"planner": "edge"}}, args.json, "\n".join(lines))
