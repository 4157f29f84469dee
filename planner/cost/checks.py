"""What the cost model refuses to price, and why: one function per rule, each raising BadInput (or Infeasible
for a cluster that lacks what the plan needs). estimate() runs check_plan on its plan; estimate_batch runs
the column form of the same rules (batch._check), calling these once per distinct row where a rule reads the
model. The plan-level rules that need no model (vpp needs an interleaved schedule, ...) are ParallelPlan's
and planner/core/dims.py's.
"""
from __future__ import annotations

import numpy as np

from planner.core.errors import BadInput, Infeasible
from planner.core.hardware import Cluster
from planner.core.model import ModelGraph
from planner.core.plan import ParallelPlan, Workload


def check_plan(model: ModelGraph, cluster: Cluster, workload: Workload, plan: ParallelPlan) -> None:
    """Refuse (BadInput) a plan the cost model cannot price on this cluster, model and workload."""
    n = plan.devices
    if n != cluster.device_count:
        raise BadInput(f"plan uses dp*tp*pp*cp = {plan.dp}*{plan.tp}*{plan.pp}*{plan.cp} = {n} devices, "
                       f"cluster {cluster.name} has {cluster.device_count}")
    check_expert_parallel(model, plan)
    check_context_parallel(model, plan)
    check_deepep(plan.moe_dispatch == "deepep", workload)
    if workload.global_batch % (plan.mbs * plan.dp):
        raise BadInput(f"global batch {workload.global_batch} is not divisible by mbs*dp = "
                       f"{plan.mbs}*{plan.dp}")
    check_seq_chunks(model, plan, workload.seq_len)
    if (plan.offload.optimizer > 0 or plan.offload.activations > 0) and cluster.nodes[0].host_link is None:
        raise Infeasible(f"node type {cluster.nodes[0].node_type.name} has no host_link: offload needs one")


def check_expert_parallel(model: ModelGraph, plan: ParallelPlan) -> None:
    """ep must divide every MoE layer's experts and fold into the dp x cp x tp ranks (Megatron's
    expert_tensor x expert x expert-data grid over the same devices); a dense model takes ep = 1.
    moe_dispatch 'tp_slice' has ep = tp (ParallelPlan checks it), so tp divides the experts here."""
    if plan.moe_dispatch == "tp_slice" and not any(layer.kind == "moe" for layer in model.layers):
        raise BadInput(f"moe_dispatch tp_slice: model {model.name} has no MoE layers; use moe_dispatch a2a")
    if plan.ep == 1:
        return
    experts = {layer.experts for layer in model.layers if layer.kind == "moe"}
    if not experts:
        raise BadInput(f"--ep {plan.ep}: model {model.name} has no MoE layers; use --ep 1")
    for n_exp in sorted(experts):
        if n_exp % plan.ep:
            raise BadInput(f"--ep {plan.ep} does not divide the {n_exp} experts of model {model.name}")
    etp = plan.etp or plan.tp
    ranks = plan.dp * plan.cp * plan.tp
    if ranks % (plan.ep * etp):
        raise BadInput(f"ep*etp = {plan.ep}*{etp} must divide dp*cp*tp = {ranks}; change --ep")


def check_deepep(deepep, workload: Workload) -> None:
    """DeepEP's dispatch (moe_dispatch 'deepep') runs dropless routing only (Megatron-Bridge's recipes turn
    DeepEP off when they turn token dropping on)."""
    if np.any(deepep) and workload.moe_capacity_factor is not None:
        raise BadInput(f"moe_dispatch deepep needs dropless routing; the workload drops tokens at capacity factor "
                       f"{workload.moe_capacity_factor}: use moe_dispatch a2a or drop the capacity factor")


def check_context_parallel(model: ModelGraph, plan: ParallelPlan) -> None:
    """Ulysses (cp_comm 'a2a') gives each cp rank heads/(tp*cp) whole heads (Jacobs et al. 2023 section 3.2:
    the degree must divide the heads)."""
    if plan.cp_comm != "a2a":
        return
    for layer in model.layers:
        if layer.kind == "attention" and layer.heads % (plan.tp * plan.cp):
            raise BadInput(f"cp_comm a2a: tp*cp = {plan.tp}*{plan.cp} must divide the {layer.heads} heads of "
                           f"model {model.name}; use the ring")


def check_seq_chunks(model: ModelGraph, plan: ParallelPlan, seq_len: int) -> None:
    """seq_chunks n needs causal attention (a chunk may only read earlier chunks: TeraPipe section 3) and
    chunks that split evenly, also over the 2*cp load-balanced halves of context parallelism (Megatron)."""
    n = plan.seq_chunks
    if n == 1:
        return
    if any(layer.kind in ("attention", "encoder") and layer.trainable and not layer.causal for layer in model.layers):
        raise BadInput(f"seq_chunks {n}: model {model.name} has non-causal attention, whose chunks would read later "
                       f"chunks; use seq_chunks 1")
    unit = n * (2 * plan.cp if plan.cp > 1 else 1)
    if seq_len % unit:
        raise BadInput(f"seq_chunks {n}: sequence {seq_len} must divide into {n} chunks"
                       + (f" of 2*cp = {2 * plan.cp} parts" if plan.cp > 1 else ""))
