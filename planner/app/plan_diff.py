"""What changed between two plan files and what each change does to the prediction (`planner diff`).

The changes: every field of the two files that differs (model, cluster, nodes, each workload field, each plan
field), the saved estimates left out. The effect: both plans are re-estimated now (planner.cost.estimate, via
planner.planfile.resolve_plan_file, so a file's stale estimate never enters), then B's changes are applied to A
one group of fields at a time, in the order of GROUPS, and the plan re-estimated after each. A step's delta is
the change since the last step that could be estimated, so the deltas sum to B minus A exactly (they
telescope). A step whose intermediate plan is invalid (e.g. tp changed but sp not yet, where sp needs tp > 1)
is skipped and said so: its effect is counted in the next step that is valid. When a step changes pp or vpp,
A's explicit stage partition (it has A's pp x vpp chunks) gives way to the even split until the step that
applies B's partition. The last step is B itself,
always valid, so nothing is lost. Attribution by sequential substitution depends on the order: GROUPS puts
what was asked (workload, model, cluster) first, then the plan's decisions, the parallel degrees first.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from planner.core.errors import PlannerError
from planner.core.plan import Estimate, ParallelPlan, PlanFile, parse_plan_file

# (name, fields): a field is a top-level PlanFile key or a ParallelPlan field ("plan." prefixed); degrees go
# together (dp x tp x pp x cp must stay the device count), sp with them (it needs tp > 1).
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("workload", ("workload",)),
    ("model", ("model",)),
    ("cluster", ("cluster", "nodes")),
    ("degrees", ("plan.dp", "plan.tp", "plan.pp", "plan.cp", "plan.ep", "plan.etp", "plan.sp")),
    ("pipeline", ("plan.schedule", "plan.vpp", "plan.partition", "plan.seq_chunks")),
    ("micro-batch", ("plan.mbs", "plan.num_microbatches")),
    ("zero", ("plan.zero",)),
    ("recompute", ("plan.recompute", "plan.recompute_num_layers")),
    ("offload", ("plan.offload",)),
    ("communication", ("plan.overlap_grad_reduce", "plan.overlap_tp_comm", "plan.cp_comm", "plan.moe_dispatch")),
    ("attention", ("plan.flash_attention", "plan.attention_pool")),
)
_NAMED = {f.removeprefix("plan.") for _, fields in GROUPS for f in fields if f.startswith("plan.")}
# a ParallelPlan field added later and not yet placed in a group still takes part, in a last group of its own
GROUPS += (("other", tuple(f"plan.{f}" for f in ParallelPlan.model_fields if f not in _NAMED)),)

# the predicted quantities each step's delta is given for: (key, Estimate attribute)
METRICS = (("step_time_s", "step_time_s"), ("tokens_per_s", "tokens_per_s"), ("peak_memory_bytes",
           "peak_memory_bytes"), ("mfu", "mfu"))

# what a null field means, for the list of changes
_NULL = {"plan.etp": "null (= tp)", "plan.num_microbatches": "null (from the batch)",
         "plan.recompute_num_layers": "null (every block)", "plan.partition": "null (even split)",
         "nodes": "null (the cluster's own)", "workload.documents": "null (full sequences)"}


@dataclass
class Step:
    """One group of B's fields applied to the plan so far."""

    group: str
    changes: list[dict]  # {"field", "a", "b"} of the fields this step changes
    valid: bool
    reason: str = ""  # why the intermediate plan is invalid (valid False)
    includes: list[str] = field(default_factory=list)  # skipped groups whose effect this step's delta holds
    fits: bool | None = None
    values: dict = field(default_factory=dict)  # the metrics after this step
    delta: dict = field(default_factory=dict)  # the metrics' change since the last valid step


def _plain(pf: PlanFile) -> dict:
    """The file's fields as JSON values, without the saved estimate and the version."""
    return pf.model_dump(mode="json", exclude={"estimate", "schema_version"})


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return d


def _set(d: dict, key: str, value) -> None:
    *head, last = key.split(".")
    for part in head:
        d = d[part]
    d[last] = value


def _leaves(d, prefix: str = "") -> dict:
    """Flatten nested dicts into dotted keys (lists stay whole: a partition is one field)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else k))
    return out


def show(key: str, value) -> str:
    """A field value as the change list prints it."""
    if value is None:
        return _NULL.get(key, "null")
    if key == "plan.partition":
        blocks = ",".join(str(s["layers"][1] - s["layers"][0]) for s in value)
        placed = any(s.get("device_type") or s.get("devices") for s in value)
        return f"{len(value)} chunks of {blocks} blocks" + (" (placed)" if placed else "")
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def changes_between(a: dict, b: dict, keys=None) -> list[dict]:
    """{"field", "a", "b"} for every leaf field (under `keys`, else all) where a and b differ."""
    la, lb = _leaves(a), _leaves(b)
    out = []
    for k in la:
        if keys is not None and not any(k == g or k.startswith(g + ".") for g in keys):
            continue
        if la[k] != lb[k]:
            out.append({"field": k, "a": la[k], "b": lb[k]})
    return out


def _metrics(est: Estimate) -> dict:
    return {key: float(getattr(est, attr)) for key, attr in METRICS}


@dataclass
class PlanDiff:
    a: dict  # {"path", "label", "fits", **metrics}
    b: dict
    changes: list[dict]
    steps: list[Step]
    total: dict  # B - A per metric

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "changes": self.changes, "steps": [asdict(s) for s in self.steps],
                "total": self.total, "summary": summary(self)}


def _side(path: str, loaded) -> dict:
    from planner.search.search import RankedPlan

    pf = loaded.pf
    return {"path": str(path), "model": pf.model, "cluster": pf.cluster, "nodes": pf.nodes,
            "label": RankedPlan(pf.plan, loaded.estimate).label(), "fits": loaded.estimate.fits,
            **_metrics(loaded.estimate)}


def diff_plans(path_a, path_b) -> PlanDiff:
    """Load both plan files (planner.planfile.load_plan_file: every check `estimate --plan` makes) and
    attribute the difference of their predictions to B's changes, group by group (see the module docstring)."""
    from planner.planfile import load_plan_file, resolve_plan_file

    la, lb = load_plan_file(path_a), load_plan_file(path_b)
    a, b = _plain(la.pf), _plain(lb.pf)
    cur = json.loads(json.dumps(a))  # a deep copy that B's values are written into
    prev = _metrics(la.estimate)
    steps: list[Step] = []
    skipped: list[str] = []
    for name, keys in GROUPS:
        todo = [k for k in keys if _get(cur, k) != _get(b, k)]
        if not todo:
            continue
        step_changes = changes_between(cur, b, todo)
        for k in todo:
            _set(cur, k, json.loads(json.dumps(_get(b, k))))
        plan = cur["plan"]
        if plan["partition"] is not None and len(plan["partition"]) != plan["pp"] * plan["vpp"]:
            # A's explicit split has the old pp x vpp chunks: an even split stands in until B's is applied
            step_changes.append({"field": "plan.partition", "a": plan["partition"], "b": None,
                                 "note": "even split until B's partition is applied"})
            plan["partition"] = None
        where = f"A with B's {name}"
        try:
            est = resolve_plan_file(parse_plan_file(json.dumps(cur), where), where).estimate
        except PlannerError as e:
            steps.append(Step(name, step_changes, valid=False, reason=str(e)))
            skipped.append(name)
            continue
        now = _metrics(est)
        steps.append(Step(name, step_changes, valid=True, includes=skipped, fits=est.fits, values=now,
                          delta={k: now[k] - prev[k] for k in now}))
        prev, skipped = now, []
    if cur != b or skipped:  # cannot happen while GROUPS covers every field; a wrong sum must never print
        raise AssertionError(f"diff: the steps did not reach B ({cur != b}, skipped {skipped})")
    end = _metrics(lb.estimate)
    side_a, side_b = _side(path_a, la), _side(path_b, lb)
    return PlanDiff(a=side_a, b=side_b, changes=changes_between(a, b), steps=steps,
                    total={k: end[k] - side_a[k] for k in end})


def summary(d: PlanDiff) -> str:
    """One line: faster or slower by how much (by throughput when the workloads differ), throughput and memory,
    and the step with the largest effect on the step time."""
    a, b = d.a, d.b
    if not d.changes:
        return "the two plan files ask for the same thing: no difference"
    dt = d.total["step_time_s"]
    if any(c["field"].startswith("workload.") for c in d.changes):
        # steps of different workloads process different tokens: throughput is what compares
        dtok = d.total["tokens_per_s"]
        rel = abs(dtok) / a["tokens_per_s"] if a["tokens_per_s"] else 0.0
        speed = ("is as fast as A" if dtok == 0 else
                 f"has {rel:.1%} {'more' if dtok > 0 else 'less'} throughput than A (another workload)")
    else:
        rel = abs(dt) / a["step_time_s"] if a["step_time_s"] else 0.0
        speed = "is as fast as A" if dt == 0 else f"is {rel:.1%} {'faster' if dt < 0 else 'slower'} than A"
    text = (f"B {speed}: step {a['step_time_s']:.4g} -> {b['step_time_s']:.4g} s, "
            f"{a['tokens_per_s']:,.0f} -> {b['tokens_per_s']:,.0f} tokens/s, peak memory "
            f"{a['peak_memory_bytes'] / 1e9:.1f} -> {b['peak_memory_bytes'] / 1e9:.1f} GB")
    valid = [s for s in d.steps if s.valid]
    if len(valid) > 1:
        top = max(valid, key=lambda s: abs(s.delta["step_time_s"]))
        text += f"; largest effect: {'+'.join(top.includes + [top.group])} ({top.delta['step_time_s']:+.3g} s)"
    if not b["fits"]:
        text += "; B does not fit in memory"
    return text
