"""Backtest conventions a new runs table exposes (issue 18, item 2): the row's own device, TFLOP/s of an fp8
run, unprinted vpp and interleaved notes, interleaving with a micro-batch count not a multiple of pp, and an
empty ffn_hidden on a GPT row."""
from __future__ import annotations

import csv
from pathlib import Path

import batch_checks
import pytest

from planner.catalog import load_cluster
from planner.core.plan import ParallelPlan, Workload
from planner.cost.estimate import estimate
from planner.cost.pipeline import simulate
from planner.cost.schedule_order import order_arrays, schedule_order
from planner.cost.schedules.interleaved import microbatch_group_size
from planner.eval import backtest
from planner.importers import load_model

TABLES = Path(__file__).resolve().parent / "golden"  # the checked-in copies of the reference tables


def _rows(name: str) -> dict[str, dict]:
    with open(TABLES / name, newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


ROWS = _rows("calibration_runs_clean.csv")
GPT_355M = _rows("vtrain_single_node.csv")["VT-S-0001"]  # GPT 355M on 2 A100s, ffn_hidden 4096 = 4h
LLAMA_8B_FP8 = ROWS["47"]  # NeMo Llama 3 8B on one DGX H100 node, fp8, tokens/s target
GPT_175B = ROWS["22"]      # NAR21 GPT 175B-class, pp 35, interleaved, vpp not printed


def _ok(row: dict) -> backtest.RowResult:
    res = backtest.backtest_row(row, return_plan=True)
    assert res.status == "ok", res.reason
    return res


# --- 1. the row's device, not its preset's -------------------------------------------------------------

def test_a_row_runs_on_its_own_device_in_the_preset_nodes():
    # dgx-h100 and hgx-h200 are the same chassis (NVLink4, 8 NDR NICs) with different GPUs
    h200 = {**LLAMA_8B_FP8, "device": "h200-sxm-141gb", "stack": ""}
    in_h100_preset = _ok(h200)
    in_h200_preset = _ok({**h200, "cluster": "hgx-h200"})
    on_h100 = _ok({**LLAMA_8B_FP8, "stack": ""})
    assert in_h100_preset.predicted == pytest.approx(in_h200_preset.predicted, rel=1e-12)
    assert abs(in_h100_preset.predicted / on_h100.predicted - 1) > 0.01  # H200's HBM3e is faster


def test_on_device_keeps_the_links_and_replaces_every_device():
    c = load_cluster("dgx-h100", nodes=2)
    moved = backtest.on_device(c, "h200-sxm-141gb")
    assert moved.device_types == ["h200-sxm-141gb"] and moved.device_count == c.device_count
    assert moved.nodes == c.nodes and moved.fabric == c.fabric
    assert backtest.on_device(c, "h100-sxm-80gb") is c


# --- 2. TFLOP/s of an fp8 run: model FLOPs per second per device ---------------------------------------

def _flops_per_token(row: dict) -> float:
    parsed = backtest.parse_row(row)
    model, s = backtest.row_model(parsed), int(parsed["seq_len"])
    return 3 * sum(float(layer.flops_fwd(1, s)) for layer in model.layers) / s


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_tflops_target_is_model_flops_per_second_whatever_the_precision(precision):
    row = {**LLAMA_8B_FP8, "precision": precision}
    tokens = _ok(row).predicted  # tokens/s per device
    tflops = _ok({**row, "target": "tflops"}).predicted
    # the same run's FLOPs per token, not halved because fp8's peak is twice bf16's
    assert tflops * 1e12 / tokens == pytest.approx(_flops_per_token(row), rel=1e-9)


# --- 3. unprinted vpp, interleaved notes ----------------------------------------------------------------

def test_interleaved_notes_mean_vpp_above_one():
    res = _ok(GPT_175B)  # 105 layers over pp 35: 3 per stage, so vpp 3
    assert res.plan.vpp == 3 and res.plan.schedule == "interleaved-1f1b" and res.assumed["vpp"] == 3
    opts = backtest.vpp_options(backtest.parse_row(GPT_175B))
    assert [v for v, _ in opts] == [3]


def test_unprinted_vpp_is_searched_and_a_printed_one_kept():
    plain = backtest.parse_row({**GPT_175B, "notes": "PP schedule 1F1B (no interleaving)"})
    assert [v for v, _ in backtest.vpp_options(plain)] == [1, 3]
    # 126 layers over pp 8: 16 per stage (the last shorter), so 1, 2, 4, 8 and 16 chunks
    uneven = backtest.parse_row({**GPT_175B, "layers": "126", "pp": "8", "tp": "8", "device_count": "128",
                                 "dp": "", "global_batch": "256", "notes": ""})
    assert [v for v, _ in backtest.vpp_options(uneven)] == [1, 2, 4, 8, 16]
    printed = backtest.parse_row({**GPT_175B, "vpp": "1"})  # printed wins over the notes
    assert backtest.vpp_options(printed) == [(1, {})]
    assert _ok({**GPT_175B, "vpp": "1"}).plan.schedule == "1f1b"


def test_interleaved_notes_with_one_layer_per_stage_skip_with_a_reason():
    row = {**GPT_175B, "layers": "35"}  # one layer per stage: nothing to interleave
    res = backtest.backtest_row(row)
    assert res.status == "skipped" and "interleaved" in res.reason and "vpp" in res.reason


# --- interleaving with m % pp != 0 (Megatron-Core's microbatch_group_size_per_vp_stage) ------------------

def test_group_size_follows_megatron_core():
    assert microbatch_group_size(4, 8) == 4   # the default, pp
    assert microbatch_group_size(4, 6) == 6   # 6 % 5 = 1 < 4, 6 % 6 = 0
    assert microbatch_group_size(4, 10) == 5  # 10 % 5 = 0
    assert microbatch_group_size(4, 11) == 6  # 11 % 6 = 5 >= pp: the last group is not short
    for p in range(1, 9):
        for m in range(p, 5 * p):
            n = microbatch_group_size(p, m)
            assert p <= n <= m and (m % n == 0 or m % n >= p), (p, m, n)


@pytest.mark.parametrize("p, m, v", [(2, 3, 2), (4, 6, 2), (4, 11, 3), (3, 7, 4), (8, 12, 2)])
def test_interleaved_order_with_m_not_a_multiple_of_pp(p, m, v):
    ops = schedule_order("interleaved-1f1b", p, m, v)
    kind, item, chunk, per_dev = order_arrays("interleaved-1f1b", p, m, v, 1)
    flat = [("FBW"[k], i, c) for k, i, c in zip(kind.tolist(), item.tolist(), chunk.tolist())]
    assert flat == [op for dev in ops for op in dev]
    for dev in ops:  # every micro-batch through every chunk, once forward and once backward
        assert sorted(op for op in dev if op[0] == "F") == [("F", j, c) for j in range(m) for c in range(v)]
        assert sorted(op for op in dev if op[0] == "B") == [("B", j, c) for j in range(m) for c in range(v)]
    # equal stages: the bubble of the paper, (p-1)(t_f+t_b)/v per device, as with m a multiple of p
    r = simulate("interleaved-1f1b", [1.0] * (p * v), [2.0] * (p * v), m, v=v)
    assert r.step_time_s == pytest.approx(m * v * 3 + (p - 1) * 3)


def test_interleaved_refuses_fewer_microbatches_than_stages():
    with pytest.raises(ValueError, match=r"at least as many micro-batches \(3\) as pipeline stages \(4\)"):
        simulate("interleaved-1f1b", [1.0] * 8, [2.0] * 8, 3, v=2)


def test_an_interleaved_plan_with_m_not_a_multiple_of_pp_estimates():
    model, cluster = load_model("llama3-8b"), load_cluster("dgx-h100", nodes=1)

    def plan_at(m):
        return ParallelPlan(dp=1, tp=2, pp=4, vpp=2, mbs=1, schedule="interleaved-1f1b", num_microbatches=m)

    def step(m):
        return estimate(model, cluster, Workload(global_batch=m, seq_len=4096), plan_at(m)).step_time_s

    w = Workload(global_batch=6, seq_len=4096)
    batch_checks.assert_batch_equals_scalar(model, cluster, w, [plan_at(6)])
    assert step(4) < step(6) < step(8)


# --- 4. an empty ffn_hidden on a GPT row is 4h; elsewhere it must be printed ---------------------------

def test_an_empty_ffn_hidden_on_a_gpt_row_is_4h():
    assert int(GPT_355M["ffn_hidden"]) == 4 * int(GPT_355M["hidden"])
    printed, empty = _ok(GPT_355M), _ok({**GPT_355M, "ffn_hidden": ""})
    assert empty.predicted == printed.predicted
    assert _ok({**GPT_355M, "ffn_hidden": "2048"}).predicted != printed.predicted  # the column is read


def test_an_empty_ffn_hidden_elsewhere_is_skipped_naming_the_column():
    res = backtest.backtest_row({**LLAMA_8B_FP8, "ffn_hidden": ""})
    assert res.status == "skipped" and "'ffn_hidden' is empty" in res.reason and "llama" in res.reason
