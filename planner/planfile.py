"""Reading a plan file the way every command needs it: a safe read, the strict parse of planner.core.plan,
then the checks that resolve its model and cluster names (catalog, importers) and run the cost model's own
rules on it (estimate). It sits above cost/ because checking a plan file means costing it; core/plan.py
keeps the data classes and the parse, which need nothing above core."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from planner import catalog
from planner.core import limits
from planner.core.errors import BadInput, PlannerError
from planner.core.hardware import Cluster
from planner.core.model import ModelGraph
from planner.core.plan import Estimate, PlanFile, parse_plan_file, short_repr
from planner.cost.estimate import estimate
from planner.cost.schedule_order import check_schedule_args
from planner.files import read_input
from planner.importers import load_model


@dataclass(frozen=True)
class LoadedPlan:
    """A plan file that passed resolve_plan_file: what it names, resolved, and its estimate now."""

    pf: PlanFile
    model: ModelGraph
    cluster: Cluster
    estimate: Estimate


def load_plan_file(path) -> LoadedPlan:
    """Read (planner.files.read_input: no FIFO, device, directory or oversized file), parse strictly and check
    a plan file: what `estimate --plan`, `export`, `simulate` and `validate` use."""
    where = str(path)
    text = read_input(Path(path), "plan file (JSON, from `plan --save`)")
    return resolve_plan_file(parse_plan_file(text, where), where)


def resolve_plan_file(pf: PlanFile, where: str = "plan file") -> LoadedPlan:
    """The plan file held to what every command needs: sizes within planner.core.limits, a micro-batch count
    that is global_batch / (mbs x dp), a model, cluster and stack that resolve, and everything `estimate` checks
    (devices, pp x vpp <= blocks, the partition, ep, cp, seq_chunks, ...), by running it. BadInput (one
    line naming the file and field) or Infeasible; the loaded model, cluster and a fresh estimate."""
    p, w = pf.plan, pf.workload
    _check_sizes(pf, where)
    for i, stage in enumerate(p.partition or ()):
        if stage.layers[1] <= stage.layers[0]:
            raise BadInput(f"{where}: plan.partition.{i}.layers {list(stage.layers)}: every pipeline chunk runs "
                           "at least one block (first < last)")
    if p.devices > limits.MAX_DEVICES:
        raise BadInput(f"{where}: plan dp*tp*pp*cp = {p.devices:,} devices, past the cap of "
                       f"{limits.MAX_DEVICES:,}")
    # Megatron, DeepSpeed and torchtitan derive the micro-batch count from the batch (docs/launchers.md#batch
    # "Global batch size"), and estimate's tokens per step are global_batch x seq_len: a count that
    # disagrees would time a different number of sequences than it reports (8 for 1 gave 7.6x tokens/s).
    if w.global_batch % (p.mbs * p.dp):
        raise BadInput(f"{where}: workload.global_batch {w.global_batch} is not divisible by plan.mbs x plan.dp "
                       f"= {p.mbs} x {p.dp}; change the batch or the plan")
    m = w.global_batch // (p.mbs * p.dp)
    if p.num_microbatches is not None and p.num_microbatches != m:
        raise BadInput(f"{where}: plan.num_microbatches {p.num_microbatches} != global_batch / (mbs x dp) = "
                       f"{w.global_batch} / ({p.mbs} x {p.dp}) = {m}; set it to {m} or null")
    if m > limits.MAX_MICROBATCHES:
        raise BadInput(f"{where}: {m:,} micro-batches per step (global_batch / (mbs x dp)), past the cap of "
                       f"{limits.MAX_MICROBATCHES:,}; raise plan.mbs or lower workload.global_batch")
    # the pipeline simulator's own argument rules (interleaved 1F1B needs m >= pp, ...), which it
    # raises as ValueError for callers that are code; here they are the file's mistakes
    _in_file(where, "plan", _schedule_rules, p.schedule, p.pp, m, p.vpp, p.seq_chunks)
    model = _in_file(where, "model", load_model, pf.model)
    cluster = _in_file(where, "cluster", catalog.load_cluster, pf.cluster, pf.nodes)
    if pf.stack is not None:  # the stack the plan was made for: its efficiencies, schedules and error band
        stack = _in_file(where, "stack", catalog.load_stack, pf.stack)
        _in_file(where, "plan", stack.check_schedule, p.schedule, "schedule")
        cluster = cluster.with_stack(stack)
    est = _in_file(where, "plan", estimate, model, cluster, w, p)
    return LoadedPlan(pf=pf, model=model, cluster=cluster, estimate=est)


def _check_sizes(pf: PlanFile, where: str) -> None:
    """Every size of the file within its cap (planner.core.limits), so no later step allocates by a hostile one."""
    p, w = pf.plan, pf.workload
    caps = [(f"plan.{k}", getattr(p, k), limits.MAX_DEVICES, "devices") for k in ("dp", "tp", "pp", "vpp", "cp", "ep")]
    caps += [("plan.etp", p.etp, limits.MAX_DEVICES, "devices"), ("nodes", pf.nodes, limits.MAX_DEVICES, "nodes"),
             ("workload.seq_len", w.seq_len, limits.MAX_SEQ_LEN, "tokens"),
             ("workload.global_batch", w.global_batch, limits.MAX_GLOBAL_BATCH, "sequences"),
             ("plan.num_microbatches", p.num_microbatches, limits.MAX_MICROBATCHES, "micro-batches"),
             ("plan.seq_chunks", p.seq_chunks, w.seq_len, "chunks (one token each)"),
             ("plan.mbs", p.mbs, w.global_batch, "sequences (the global batch)")]
    if w.documents is not None:
        caps.append(("workload.documents.mean_tokens", w.documents.mean_tokens, w.seq_len, "tokens (the sequence)"))
    for field, value, cap, unit in caps:
        if value is not None and value > cap:
            raise BadInput(f"{where}: {field} {value} is past the cap of {cap:,} {unit}")


def _schedule_rules(schedule: str, pp: int, m: int, vpp: int, seq_chunks: int) -> None:
    try:
        check_schedule_args(schedule, pp, m, vpp, seq_chunks)
    except ValueError as e:
        raise BadInput(str(e)) from None


def _in_file(where: str, field: str, fn, *args):
    """fn(*args), its one-line refusal (BadInput, Infeasible) prefixed with the file and field."""
    try:
        return fn(*args)
    except PlannerError as e:
        # the checks speak of the flags that set these fields on the command line; here they are file fields
        text = re.sub(r"--(dp|tp|pp|vpp|cp|ep|mbs)\b", r"plan.\1", str(e))
        text = text.replace("--nodes", "nodes").replace("--gbs", "workload.global_batch")
        raise type(e)(f"{where}: {'' if text.startswith(field) else field + ': '}{text}") from None
    except OSError as e:  # a name the OS refuses as a path (too long, ...) while looking it up
        raise BadInput(f"{where}: {field}: {short_repr(args[0])} cannot be read ({e.strerror or e})") from None
