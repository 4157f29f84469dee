"""planner/core/dtypes.py declares the bytes per dtype once: the names match the plan's types, fp8 training
keeps 16-bit activations and weights, and the cost model's memory follows the declared sizes."""
from typing import get_args

import pytest

from planner.core import dtypes
from planner.core.hardware import Dtype
from planner.core.plan import TrainDtype, Workload


def test_names_match_the_plan_types():
    assert set(dtypes.TRAIN_DTYPES) == set(get_args(TrainDtype))
    assert set(dtypes.GRAD_DTYPES) == set(get_args(Workload.model_fields["grad_dtype"].annotation))
    assert set(dtypes.BYTES_PER_ELEMENT) == set(get_args(Dtype))


@pytest.mark.parametrize("dtype, act, weight", [("bf16", 2, 2), ("fp16", 2, 2), ("fp8", 2, 2), ("fp32", 4, 4)])
def test_bytes_a_training_dtype_implies(dtype, act, weight):
    assert dtypes.activation_bytes(dtype) == act
    assert dtypes.weight_bytes(dtype) == weight


def test_fp8_gemm_operands_are_one_byte_and_gradients_follow_grad_dtype():
    assert dtypes.element_bytes("fp8") == 1
    assert [dtypes.gradient_bytes(g) for g in ("fp32", "bf16", "fp16")] == [4, 2, 2]


def test_published_precisions_outside_training_dtypes_fall_back():
    assert dtypes.train_dtype_or("fp8") == "fp8"
    assert dtypes.train_dtype_or("unknown") == "bf16"
    assert dtypes.train_dtype_or("tf32", "fp32") == "fp32"


def test_fp8_training_keeps_bf16_activations_in_memory():
    from planner.catalog import load_cluster
    from planner.core.plan import ParallelPlan
    from planner.cost.estimate import estimate
    from planner.importers import load_model

    model, cluster = load_model("llama3-8b"), load_cluster("dgx-h100", nodes=1)
    plan = ParallelPlan(tp=8, pp=1, dp=1, mbs=1, recompute="none")
    mem = {d: estimate(model, cluster, Workload(global_batch=8, seq_len=2048, dtype=d), plan).memory
           for d in ("bf16", "fp8", "fp32")}
    assert mem["fp8"]["activations_bytes"] == mem["bf16"]["activations_bytes"]
    assert mem["fp8"]["weights_bytes"] == mem["bf16"]["weights_bytes"]
    assert mem["fp32"]["activations_bytes"] > 1.9 * mem["bf16"]["activations_bytes"]


def test_fp32_attention_runs_at_the_fp32_peak_so_mfu_stays_below_one():
    """FlashAttention has no fp32 kernel: an fp32 run's attention core runs at the fp32 peak. Timing it at
    the bf16 peak gave MFU 1.17 on this attention-heavy case (found by tests/test_plan_files_hostile.py)."""
    from planner.catalog import load_cluster
    from planner.core.plan import ParallelPlan, Workload
    from planner.cost.estimate import estimate
    from planner.importers import load_model

    m, c = load_model("tiny-llama-20m"), load_cluster("dgx-a100-80gb", 2)
    plan = ParallelPlan(dp=8, tp=2, mbs=1)
    fp32 = estimate(m, c, Workload(global_batch=8, seq_len=8192, dtype="fp32"), plan)
    bf16 = estimate(m, c, Workload(global_batch=8, seq_len=8192, dtype="bf16"), plan)
    assert 0 < fp32.mfu <= fp32.hfu <= 1
    assert fp32.step_time_s > bf16.step_time_s
