"""MoE routing terms: expert capacity, token dropping and load imbalance (docs/formulas.md#moe-capacity).

The busiest expert-parallel rank sets the MoE layer's time (every rank waits for it at the combine
all-to-all), so the cost model scales the expert GEMMs and the dispatch/combine traffic of one rank by
`rank_load_factor`: the tokens that rank's experts process over what balanced routing would give them.
All functions are pure; arguments may be numpy arrays.
"""
from __future__ import annotations

import math

import numpy as np


def capacity_tokens(tokens, topk: int, experts: int, capacity_factor: float) -> int:
    """Expert capacity: ceil(T * k / E * CF) tokens (Switch Transformer section 2.2, Eq. 3; Megatron
    moe_utils.get_capacity)."""
    return math.ceil(tokens * topk / experts * capacity_factor)


def expert_load(imbalance, capacity_factor: float | None = None):
    """The busiest expert's processed tokens over the mean, T*k/E. Dropless: the router's imbalance
    gamma = max_e n_e / (T k / E) >= 1 (docs/formulas.md#moe-capacity, Δ). With a capacity factor the expert
    processes at most CF x the mean and drops the rest (Switch section 2.2): min(gamma, CF)."""
    g = np.asarray(imbalance, dtype=float)
    if np.any(g < 1):
        raise ValueError(f"moe imbalance must be >= 1 (busiest expert over the mean), got {imbalance}")
    if capacity_factor is None:
        return float(g) if g.ndim == 0 else g
    out = np.minimum(g, capacity_factor)
    return float(out) if np.ndim(out) == 0 else out


def rank_load_factor(imbalance, capacity_factor: float | None, local_experts):
    """Tokens the busiest rank's experts process over the balanced share: that rank holds the busiest
    expert (load g = expert_load) and local_experts - 1 others at the mean, so
    (g + local_experts - 1) / local_experts (Δ: our model; one expert per rank gives g itself, many
    experts per rank dilute one hot expert)."""
    g = expert_load(imbalance, capacity_factor)
    le = np.maximum(np.asarray(local_experts, dtype=float), 1.0)
    out = (g + le - 1) / le
    return float(out) if np.ndim(out) == 0 else out


def layer_sp(kind: str, sp: bool, tp_slice: bool) -> bool:
    """Whether sequence parallelism splits this layer's tokens over the TP ranks. Not a MoE layer under
    moe_dispatch 'tp_slice': every TP rank reads the whole replicated input to pick its experts' tokens by
    index (Pipeline MoE, Chen et al. 2023 section 3), so that layer runs, and keeps its activations, as
    without SP."""
    return bool(sp) and not (tp_slice and kind == "moe")


def dropped_token_share(imbalance, capacity_factor: float | None, experts: int):
    """Share of the routed token-expert pairs a capacity factor drops, at least: the busiest expert's
    overflow (gamma - CF) x mean out of E x mean (Δ; the others may overflow too). 0 when dropless."""
    if capacity_factor is None:
        return 0.0
    over = np.maximum(np.asarray(imbalance, dtype=float) - capacity_factor, 0.0) / experts
    return float(over) if np.ndim(over) == 0 else over
