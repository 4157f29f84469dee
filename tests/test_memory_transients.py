"""The two transient memory terms of estimate._stage_memory, hand-solved on a small model:

- backward_working_bytes: the block whose backward runs re-materialises what its policy dropped and holds its
  activation gradients (memory.backward_working_bytes; Chen et al. 2016 section 4.1, Korthikanti et al. 2022
  section 5), once per stage;
- logits_transient_bytes: the loss's 16-bit logits copy beside the fp32 ones (Megatron's vocab-parallel cross
  entropy), once, on the stage with the LM head.
"""
from __future__ import annotations

import numpy as np
import pytest

from planner.app.api import load_cluster
from planner.core.builders import TransformerConfig, build_transformer
from planner.core.plan import OffloadPolicy, ParallelPlan, Workload
from planner.cost import memory
from planner.cost.batch import estimate_batch
from planner.cost.estimate import estimate
from planner.search.partition import block_costs, partition_dp

# 2 blocks, h 64, 4 heads of 16 (MHA), SwiGLU f 128, vocab 1000, no dropout; b 2 x s 32 = 64 tokens
MODEL = build_transformer(TransformerConfig(name="tiny-transients", layers=2, hidden=64, heads=4,
                                            ffn_hidden=128, vocab=1000, max_seq=64))
T, H, F, V, E = 64, 64, 128, 1000, 2
# Layer.activation_bytes, no recompute, flash: attention 2the (norm in/out) + t(q + k + v)e + t o e + 4ta (lse)
ATTN_NONE = 2 * T * H * E + T * (64 + 128) * E + T * 64 * E + T * 4 * 4  # 50,176
MLP_NONE = 2 * T * H * E + 3 * T * F * E  # norm in/out + gate, up, activation out: 65,536
ATTN_FULL = T * H * E  # full recompute keeps the block input: 8,192
WORK_FULL = (ATTN_NONE - ATTN_FULL) + (MLP_NONE - 0) + max(ATTN_NONE, MLP_NONE)  # 173,056
WORK_NONE = max(ATTN_NONE, MLP_NONE)  # 65,536: the gradients only
LOGITS_TRANSIENT = T * V * E  # 128,000 at tp 1


def test_hand_solved_constants():
    assert (ATTN_NONE, MLP_NONE, WORK_FULL, WORK_NONE, LOGITS_TRANSIENT) == (50176, 65536, 173056, 65536, 128000)


def test_backward_working_bytes_function():
    assert memory.backward_working_bytes([ATTN_NONE, MLP_NONE], [ATTN_FULL, 0]) == WORK_FULL
    assert memory.backward_working_bytes([ATTN_NONE, MLP_NONE], [ATTN_NONE, MLP_NONE]) == WORK_NONE
    assert memory.backward_working_bytes([], []) == 0.0
    # plans along a trailing axis
    got = memory.backward_working_bytes(np.array([[ATTN_NONE] * 2, [MLP_NONE] * 2]),
                                        np.array([[ATTN_FULL, ATTN_NONE], [0, MLP_NONE]]))
    assert got.tolist() == [WORK_FULL, WORK_NONE]


def test_layer_terms():
    head = next(layer for layer in MODEL.layers if layer.kind == "head")
    assert head.logits_transient_bytes(2, 32, tp=1) == LOGITS_TRANSIENT
    assert head.logits_transient_bytes(2, 32, tp=2, cp=2) == LOGITS_TRANSIENT / 4
    assert head.logits_transient_bytes(2, 32, dtype_bytes=4) == 0  # fp32: .float() is the same tensor
    mlp = next(layer for layer in MODEL.layers if layer.kind == "mlp")
    assert mlp.logits_transient_bytes(2, 32) == 0
    # the head is not recomputed: its final-norm input and fp32 logits stay under full recompute
    assert head.activation_bytes(2, 32, recompute="full") == head.activation_bytes(2, 32) == T * H * E + T * V * 4


def _run(plan, dtype="bf16"):
    return estimate(MODEL, load_cluster("dgx-h100", 1), Workload(global_batch=16, seq_len=32, dtype=dtype), plan)


@pytest.mark.parametrize("recompute, work", [("full", WORK_FULL), ("none", WORK_NONE), ("selective", WORK_NONE)])
def test_estimate_terms_pp1(recompute, work):
    e = _run(ParallelPlan(dp=8, mbs=2, recompute=recompute))
    assert e.memory["backward_working_bytes"] == work  # once, whatever the micro-batches in flight
    assert e.memory["logits_transient_bytes"] == LOGITS_TRANSIENT
    assert e.memory["activations_bytes"] == pytest.approx(
        {"full": 2 * ATTN_FULL, "none": 2 * (ATTN_NONE + MLP_NONE), "selective": 2 * (ATTN_NONE + MLP_NONE)}
        [recompute] + T * H * E + T * V * 4)


def test_estimate_terms_per_stage_and_offload():
    plan = ParallelPlan(dp=4, pp=2, mbs=2, recompute="full", offload=OffloadPolicy(activations=0.5))
    e = _run(plan)
    # one block per stage: each holds its own working set; the LM head (last stage) its logits copy. Offload
    # moves saved activations, not the tensors the running backward works on.
    assert [s["backward_working_bytes"] for s in e.stages] == [WORK_FULL, WORK_FULL]
    assert [s["logits_transient_bytes"] for s in e.stages] == [0.0, LOGITS_TRANSIENT]
    # gpipe keeps every micro-batch's checkpoints, the working set stays one block's
    g = _run(plan.model_copy(update={"schedule": "gpipe", "offload": OffloadPolicy()}))
    assert [s["backward_working_bytes"] for s in g.stages] == [WORK_FULL, WORK_FULL]
    assert _run(ParallelPlan(dp=8, mbs=2), dtype="fp32").memory["logits_transient_bytes"] == 0.0


def test_partial_recompute_takes_the_largest_block():
    # recompute 1 block of 2: the recomputed block's working set is the stage's
    e = _run(ParallelPlan(dp=8, mbs=2, recompute="full", recompute_num_layers=1))
    assert e.memory["backward_working_bytes"] == WORK_FULL


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_batch_and_partition_agree(recompute):
    cluster, w = load_cluster("dgx-h100", 1), Workload(global_batch=16, seq_len=32)
    plans = [ParallelPlan(dp=8, mbs=2, recompute=recompute), ParallelPlan(dp=4, pp=2, mbs=2, recompute=recompute),
             ParallelPlan(dp=4, tp=2, mbs=1, sp=True, recompute=recompute)]
    got = estimate_batch(MODEL, cluster, w, plans)["peak_memory_bytes"]
    want = [estimate(MODEL, cluster, w, p).peak_memory_bytes for p in plans]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    plan = plans[1]
    part = partition_dp(block_costs(MODEL, cluster, w, plan), 2, inflight=[2, 1])
    est = estimate(MODEL, cluster, w, plan)
    assert list(part.chunk_memory_bytes) == pytest.approx([s["total_bytes"] for s in est.stages], rel=1e-12)
