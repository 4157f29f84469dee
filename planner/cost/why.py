"""Estimate.why: the one-line explanation of an estimate, in words.

First what limits the step (the largest term of the breakdown) or why the plan does not fit; then, for a
plan that fits, one clause per choice worth explaining (context parallelism, documents, chunked sequences,
Pipeline MoE, DeepEP), each with the figure that makes the case. Text only: every number comes from
estimate(); nothing here changes one.
"""
from __future__ import annotations

from planner.cost import comm

# Breakdown keys (Estimate.breakdown) as the explanation names them.
TERM_NAMES = {"compute_s": "compute", "pipeline_bubble_s": "pipeline bubble", "tp_comm_s": "TP communication",
              "dp_comm_exposed_s": "exposed DP communication", "ep_comm_s": "expert all-to-all",
              "cp_comm_s": "context-parallel communication", "optimizer_s": "optimizer step",
              "recompute_s": "recomputation", "pp_comm_s": "pipeline transfers", "offload_s": "offload",
              "act_offload_s": "activation offload", "attn_pool_s": "attention pool transfers"}


def limiting_term(breakdown: dict, step_s: float, fits: bool, mem: dict, device) -> str:
    """What does not fit (memory needed against `device`'s), or the breakdown's largest term and its share."""
    if not fits:
        return (f"does not fit: needs {mem['total_bytes'] / 1e9:.1f} GB per device, has "
                f"{device.memory_bytes / 1e9:.0f} GB")
    top = max(breakdown.items(), key=lambda kv: kv[1])
    return f"limited by {TERM_NAMES.get(top[0], top[0])} ({top[1] / step_s:.0%} of the step)"


def context_parallel_clause(plan, seq_len: int, mem: dict) -> str:
    """Why context parallelism: each rank keeps seq/cp tokens' activations and does 1/cp of the s^2
    attention."""
    cp = plan.cp
    return (f"; cp {cp} ({'Ulysses all-to-all' if plan.cp_comm == 'a2a' else 'ring'}) gives each GPU "
            f"{seq_len // cp} of the {seq_len} tokens: {mem['activations_bytes'] / 1e9:.1f} GB "
            f"of activations, which "
            f"cp 1 would multiply by {cp}, and 1/{cp} of the quadratic attention")


def documents_clause(plan, documents, factors) -> str:
    """Why (not) pool the attention: the slowest replica's documents against the balanced share (DistCA)."""
    return (f"; documents (mean {documents.mean_tokens} tokens): attention runs at "
            f"{factors.straggler / factors.mean:.2f}x the mean replica's work on the slowest of {plan.dp} "
            f"replicas" + (f", {factors.pooled / factors.mean:.2f}x pooled (DistCA)" if plan.attention_pool
                           else ""))


def seq_chunks_clause(plan, microbatches: int, item_tokens: int, pipe, mem: dict) -> str:
    """Why chunk the sequence: n times more, smaller work items fill and drain the pipeline (its bubble
    (p-1)/(m n + p-1) of the step, TeraPipe section 3), at the price of the K/V kept for later chunks."""
    m, items = microbatches, microbatches * plan.seq_chunks
    return (f"; seq_chunks {plan.seq_chunks}: {m} micro-batch{'es' if m > 1 else ''} run as {items} chunks of "
            f"{item_tokens} tokens through {plan.pp} stages (bubble {pipe.bubble_s / pipe.step_time_s:.0%} of the "
            f"pipeline), {mem['seq_chunk_kv_bytes'] / 1e9:.1f} GB of K/V kept for later chunks")


def tp_slice_clause(model, plan) -> str:
    """Why Pipeline MoE: its only MoE traffic is the TP group's all-reduce, usually inside a node."""
    n_exp = max(layer.experts for layer in model.layers if layer.kind == "moe")
    return (f"; MoE tp_slice (Pipeline MoE): {n_exp // plan.tp} of {n_exp} experts whole on each of the {plan.tp} TP "
            f"ranks, tokens picked by index and combined by the TP all-reduce, no expert all-to-all")


def deepep_clause(model, ep_link) -> str:
    """Why DeepEP: the fabric carries one copy of a token per destination node, not one per expert
    (comm.remote_nodes_per_token)."""
    moe_l = max((layer for layer in model.layers if layer.kind == "moe"), key=lambda layer: layer.topk)
    k = moe_l.topk
    remote = comm.remote_nodes_per_token(k, ep_link.nodes, moe_l.route_groups, moe_l.route_topk_groups)
    return (f"; MoE deepep: each token crosses the fabric to {remote:.1f} "
            f"of the {ep_link.nodes - 1} other node{'s' if ep_link.nodes > 2 else ''} of its expert group, "
            f"where an all-to-all sends "
            f"{k * (ep_link.nodes - 1) / ep_link.nodes:.1f} copies")


def stack_clause(stack, device, plan) -> str:
    """What the software stack changes (planner.core.stack): its attention kernel at the efficiency the device
    runs it at, the other efficiencies it sets there (fitted or prior), and the overlaps it turns on that this
    plan uses."""
    eff = device.efficiency
    fitted = set(stack.fitted_fields.get(device.name, ()))
    own = stack.efficiency_for(device.name)

    def origin(fields) -> str:
        if not fields:
            return "device profile"
        return "fitted" if set(fields) <= fitted else "prior" if not set(fields) & fitted else "fitted + prior"

    parts = [f"{stack.attention_kernel} attention at {eff.attention:.2f} of peak on {device.name} "
             f"({origin([f for f in own if f == 'attention'])})" if plan.flash_attention else "unfused attention"]
    rest = [f for f in own if f != "attention"]
    if rest:
        parts.append(", ".join(f"{f} {own[f]:.3g}" for f in rest) + f" ({origin(rest)})")
    if plan.overlap_tp_comm and plan.tp > 1:
        parts.append("TP comm overlapped")
    if plan.overlap_grad_reduce and plan.dp * plan.cp > 1:
        parts.append("grad reduce overlapped")
    return f"; on {stack.name}: " + ", ".join(parts)


def async_clause() -> str:
    """What an asynchronous pipeline changes besides time: the optimizer's semantics (PipeDream-2BW, Narayanan
    et al. 2021 section 3.1; Pipelined Backpropagation, Kosson et al. 2021 sections 3-4)."""
    return ("; async-1f1b never flushes: gradients are 1 step stale (2BW: two weight versions), which changes "
            "the optimizer's semantics; Pipelined Backpropagation compensates with weight prediction and spike "
            "compensation, 2BW with a delay-1 update; validate convergence before using it")


def explain(breakdown: dict, step_s: float, fits: bool, mem: dict, device, *, model, workload, plan, pipe,
            microbatches: int, item_tokens: int, factors, ep_link, stack=None) -> str:
    """Estimate.why: limiting_term, then, when the plan fits, the clause of each choice it makes, and of the
    software stack when the cluster names one."""
    why = limiting_term(breakdown, step_s, fits, mem, device)
    if stack is not None:
        why += stack_clause(stack, device, plan)
    if plan.schedule == "async-1f1b":
        why += async_clause()
    if not fits:
        return why
    if plan.cp > 1:
        why += context_parallel_clause(plan, workload.seq_len, mem)
    if factors is not None:
        why += documents_clause(plan, workload.documents, factors)
    if plan.seq_chunks > 1:
        why += seq_chunks_clause(plan, microbatches, item_tokens, pipe, mem)
    if plan.moe_dispatch == "tp_slice":
        why += tp_slice_clause(model, plan)
    if plan.moe_dispatch == "deepep" and ep_link is not None and ep_link.nodes > 1:
        why += deepep_clause(model, ep_link)
    return why
