"""Memory formulas of planner.cost.memory: ZeRO / Megatron model states, Korthikanti activations, and
the per-layer tensor model of planner.core.model checked against Korthikanti."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.core.model import Layer
from planner.cost.memory import (
    GiB,
    activation_bytes_gpt_layer,
    allocator_overhead_bytes,
    model_state_bytes,
    optimizer_bytes_per_param,
    pipeline_activation_bytes,
)

LLAMA3_8B = 8.03e9


def _per_param(d: dict, params: float) -> float:
    return d["total"] / params


# ----------------------------------------------------------------------------------------------
# model states

@pytest.mark.parametrize("zero,expected", [(0, 16), (1, 4 + 12 / 8), (2, 2 + 14 / 8), (3, 16 / 8)])
def test_llama3_8b_zero_bf16_grads(zero, expected):
    """ZeRO (Rajbhandari 2020 section 5): 2-byte weights and grads, K = 12, N_d = 8."""
    d = model_state_bytes(LLAMA3_8B, 8, zero, weight_dtype_bytes=2, grad_dtype_bytes=2)
    assert _per_param(d, LLAMA3_8B) == pytest.approx(expected)
    assert d["total"] == pytest.approx(LLAMA3_8B * expected)
    assert d["host"] == 0


@pytest.mark.parametrize("zero,expected", [(0, 18), (1, 6 + 12 / 8), (2, 2 + 16 / 8), (3, 18 / 8)])
def test_llama3_8b_megatron_fp32_grads(zero, expected):
    """Megatron (dist_optimizer.md): bf16 params + fp32 grads, 18 B/param; distributed optimizer
    (stage 1) 6 + 12/d. Stages 2 and 3 follow the ZeRO sharding rules."""
    d = model_state_bytes(LLAMA3_8B, 8, zero, grad_dtype_bytes=4)
    assert _per_param(d, LLAMA3_8B) == pytest.approx(expected)
    assert d["weights"] == pytest.approx(LLAMA3_8B * 2 / (8 if zero == 3 else 1))
    assert d["gradients"] == pytest.approx(LLAMA3_8B * 4 / (8 if zero >= 2 else 1))
    assert d["optimizer"] == pytest.approx(LLAMA3_8B * 12 / (8 if zero >= 1 else 1))


@pytest.mark.parametrize("grad_bytes", [2, 4])
def test_llama3_8b_totals_gb(grad_bytes):
    """Llama 3 8B on 8 GPUs, AdamW mixed precision: 128.5 GB (bf16 grads) or 144.5 GB (fp32 grads)
    unsharded; 16.06 GB at ZeRO-3 with bf16 grads."""
    base = model_state_bytes(LLAMA3_8B, 8, 0, grad_dtype_bytes=grad_bytes)["total"]
    assert base / 1e9 == pytest.approx(8.03 * (14 + grad_bytes))
    z3 = model_state_bytes(LLAMA3_8B, 8, 3, grad_dtype_bytes=grad_bytes)["total"]
    assert z3 / 1e9 == pytest.approx(8.03 * (14 + grad_bytes) / 8)


def test_zero_paper_figure1_example():
    """ZeRO Fig. 1: 7.5B parameters, N_d = 64: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB."""
    got = [model_state_bytes(7.5e9, 64, z, grad_dtype_bytes=2)["total"] / 1e9 for z in range(4)]
    assert got == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.05)


def test_megatron_table_other_rows():
    """dist_optimizer.md: fp16 param + fp16 grad 20 vs 4 + 16/d (fp32 main grads kept separately);
    fp32 param + fp32 grad 16 vs 8 + 8/d (no master copy)."""
    d = 8
    fp16 = [model_state_bytes(1.0, d, z, grad_dtype_bytes=2, fp32_main_grads=True)["total"] for z in (0, 1)]
    assert fp16 == pytest.approx([20, 4 + 16 / d])
    fp32 = [model_state_bytes(1.0, d, z, weight_dtype_bytes=4, grad_dtype_bytes=4)["total"] for z in (0, 1)]
    assert fp32 == pytest.approx([16, 8 + 8 / d])


def test_sgd_and_master_weights():
    assert optimizer_bytes_per_param("adamw") == 12
    assert optimizer_bytes_per_param("adam", master_weights=False) == 8
    assert optimizer_bytes_per_param("sgd") == 4  # only the fp32 master copy
    assert optimizer_bytes_per_param("sgd", master_weights=False) == 0
    assert optimizer_bytes_per_param("sgd", weight_dtype_bytes=4) == 0
    d = model_state_bytes(1e9, 8, 0, optimizer="sgd", master_weights=False)
    assert d["optimizer"] == 0 and d["total"] == pytest.approx(6e9)
    with pytest.raises(ValueError):
        optimizer_bytes_per_param("lion")
    with pytest.raises(ValueError):
        model_state_bytes(1e9, 8, 4)


def test_optimizer_offload():
    full = model_state_bytes(LLAMA3_8B, 8, 1)
    half = model_state_bytes(LLAMA3_8B, 8, 1, offload_fraction=0.5)
    assert half["optimizer"] + half["host"] == pytest.approx(full["optimizer"])
    assert half["host"] == pytest.approx(LLAMA3_8B * 12 / 8 / 2)
    assert half["total"] == pytest.approx(full["total"] - half["host"])
    allhost = model_state_bytes(LLAMA3_8B, 8, 0, offload_fraction=1.0)
    assert allhost["optimizer"] == 0 and allhost["total"] == pytest.approx(LLAMA3_8B * 6)
    with pytest.raises(ValueError):
        model_state_bytes(1e9, 8, 0, offload_fraction=1.5)


def test_model_states_vectorize():
    params = np.array([1e9, 8.03e9])
    dp = np.array([8, 16])
    d = model_state_bytes(params, dp, 2)
    assert d["total"] == pytest.approx(params * (2 + 16 / dp))


_states = st.fixed_dictionaries({
    "params": st.floats(1e6, 1e12),
    "dp": st.integers(1, 4096),
    "weight_dtype_bytes": st.sampled_from([1, 2, 4]),
    "grad_dtype_bytes": st.sampled_from([2, 4]),
    "optimizer": st.sampled_from(["adamw", "adam", "sgd"]),
    "master_weights": st.booleans(),
    "offload_fraction": st.floats(0, 1),
    "fp32_main_grads": st.booleans(),
})


@settings(max_examples=200, deadline=None)
@given(_states)
def test_higher_zero_stage_never_uses_more(kw):
    totals = [model_state_bytes(zero=z, **kw)["total"] for z in range(4)]
    for lo, hi in zip(totals, totals[1:]):
        assert hi <= lo * (1 + 1e-12)
    for z in range(4):
        parts = model_state_bytes(zero=z, **kw)
        assert parts["weights"] + parts["gradients"] + parts["optimizer"] == pytest.approx(parts["total"])
        assert all(parts[k] >= 0 for k in parts)


# ----------------------------------------------------------------------------------------------
# activations: the reference formula

def test_korthikanti_table2_values():
    """GPT-3 175B layer: s=2048, b=1, h=12288, a=96, t=8."""
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    assert activation_bytes_gpt_layer(s, b, h, a) == sbh * (34 + 5 * a * s / h)
    assert activation_bytes_gpt_layer(s, b, h, a, t) == pytest.approx(
        sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert activation_bytes_gpt_layer(s, b, h, a, t, sp=True) == pytest.approx(
        sbh * (34 / t + 5 * a * s / (h * t)))
    assert activation_bytes_gpt_layer(s, b, h, a, t, recompute="selective") == pytest.approx(
        sbh * (10 + 24 / t))
    assert activation_bytes_gpt_layer(s, b, h, a, t, sp=True, recompute="selective") == pytest.approx(
        34 * sbh / t)
    assert activation_bytes_gpt_layer(s, b, h, a, t, recompute="full") == 2 * sbh
    # Eq. 2 at t = 1 is Eq. 1; SP divides Eq. 1 by t (Eq. 4); flash drops the score term
    assert activation_bytes_gpt_layer(s, b, h, a, 1) == activation_bytes_gpt_layer(s, b, h, a, 1, sp=True)
    assert activation_bytes_gpt_layer(s, b, h, a, t, sp=True) == pytest.approx(
        activation_bytes_gpt_layer(s, b, h, a) / t)
    assert activation_bytes_gpt_layer(s, b, h, a, t, flash=True) == pytest.approx(
        activation_bytes_gpt_layer(s, b, h, a, t, recompute="selective"))
    with pytest.raises(ValueError):
        activation_bytes_gpt_layer(s, b, h, a, recompute="some")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 32768), st.integers(1, 64), st.sampled_from([64, 128]), st.integers(1, 128),
       st.sampled_from([1, 2, 4, 8, 16]), st.booleans(), st.booleans())
def test_more_recompute_never_uses_more(s, b, d, a, t, sp, flash):
    h = a * d
    none, sel, full = (activation_bytes_gpt_layer(s, b, h, a, t, sp, r, flash)
                       for r in ("none", "selective", "full"))
    assert none >= sel >= full > 0
    assert activation_bytes_gpt_layer(s, b, h, a, t, sp=True) <= activation_bytes_gpt_layer(s, b, h, a, t)


def test_pipeline_activation_bytes():
    per_mb = 1e9
    assert pipeline_activation_bytes(per_mb, "1f1b", 4, 8) == 4e9
    assert pipeline_activation_bytes(per_mb, "gpipe", 4, 8) == 8e9
    assert pipeline_activation_bytes(per_mb, "interleaved-1f1b", 4, 8, v=2) == pytest.approx(5.5e9)
    assert pipeline_activation_bytes(per_mb, "1f1b", 4, 8, offload_fraction=0.25) == 3e9


def test_allocator_overhead():
    assert allocator_overhead_bytes(0) == pytest.approx(0.75 * GiB)
    assert allocator_overhead_bytes(40e9, fragmentation=0.1, context_bytes=1e9) == pytest.approx(5e9)
    with pytest.raises(ValueError):
        allocator_overhead_bytes(1e9, fragmentation=-0.1)


# ----------------------------------------------------------------------------------------------
# planner.core.model's tensor-by-tensor activations against Korthikanti

def _gpt_layers(h: int, a: int) -> tuple[Layer, Layer]:
    common = dict(hidden=h, norm="layernorm", dropout=True, bias=True, block=0)
    att = Layer(name="attn", kind="attention", heads=a, kv_heads=a, head_dim=h // a, **common)
    mlp = Layer(name="mlp", kind="mlp", ffn_hidden=4 * h, gated=False, **common)
    return att, mlp


@pytest.mark.parametrize("t,sp,recompute", [
    (1, False, "none"),        # no parallelism, Eq. 1
    (8, False, "none"),        # TP, Eq. 2
    (8, True, "none"),         # TP + SP, Eq. 4
    (1, False, "selective"),   # selective, t = 1
    (8, False, "selective"),   # TP + selective
    (8, True, "selective"),    # TP + SP + selective
    (1, False, "full"),
    (8, True, "full"),
], ids=["no-tp", "tp", "tp-sp", "selective", "tp-selective", "tp-sp-selective", "full", "tp-sp-full"])
def test_model_layer_matches_korthikanti(t, sp, recompute):
    """GPT-3 175B shape: attention + mlp nodes of planner.core.model summed vs the paper's formula.

    On failure the message gives both sides and the gap in units of sbh and as^2b/t."""
    s, b, h, a = 2048, 1, 12288, 96
    att, mlp = _gpt_layers(h, a)
    got = sum(layer.activation_bytes(b, s, tp=t, sp=sp, recompute=recompute, flash=False)
              for layer in (att, mlp))
    want = activation_bytes_gpt_layer(s, b, h, a, t, sp, recompute, flash=False)
    sbh, score = s * b * h, a * s * s * b / t
    assert got == pytest.approx(want), (
        f"planner.core.model {got:.6g} B vs Korthikanti {want:.6g} B: gap {(got - want) / sbh:.4g} sbh "
        f"= {(got - want) / score:.4g} as^2b/t")
