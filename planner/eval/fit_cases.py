"""The rows a fit learns from: each usable row of a runs table with its plan chosen once, predicted fast.

A row's unprinted settings (micro-batch, recompute, ZeRO stage...) are searched by the backtest; the fit
fixes them once, at the device profiles' own efficiencies (the prior), so that its objective is a smooth
function of the efficiencies and costs one `estimate` per row. Held-out rows are predicted by the backtest
itself (`backtest_at`), which searches the settings again at the values being judged.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from planner.core.dtypes import train_dtype_or
from planner.core.errors import BadInput
from planner.core.hardware import Cluster
from planner.core.plan import ParallelPlan, Workload
from planner.cost.estimate import estimate
from planner.eval import backtest
from planner.eval.backtest import TARGETS, backtest_row, predicted_value, read_runs, row_model, stack_key

# Stack families the accuracy is reported by (issue 18); a stack not named here is its own family.
FAMILIES = {"megatron-core": "megatron", "megatron-lm-legacy": "megatron", "megatron-deepspeed": "megatron",
            "deepspeed": "deepspeed", "torchtitan": "pytorch", "torch-eager": "pytorch", "maxtext": "xla"}


def family(stack: str) -> str:
    return FAMILIES.get(stack, stack)


def with_efficiency(cluster: Cluster, fields: dict) -> Cluster:
    """Cluster.with_efficiency, sharing one updated Device per distinct device: a 8,192-device cluster takes
    0.1 s instead of 0.3 (the fit calls this once per row and trial value). The copy shares the cluster's
    link cache (topology only) and prices afresh (its cost contexts are its own, planner.cost.batch_context)."""
    new: dict[int, object] = {}
    refs = []
    for ref in cluster.devices:
        dev = new.get(id(ref.device))
        if dev is None:
            eff = ref.device.efficiency.model_copy(update=fields)
            dev = new[id(ref.device)] = ref.device.model_copy(update={"efficiency": eff})
        refs.append(ref.model_copy(update={"device": dev}))
    return cluster.model_copy(update={"devices": refs})


@contextmanager
def stack_values(values: dict[tuple[str, str], dict]) -> Iterator[None]:
    """For the duration, the backtest takes the efficiencies of a (stack, device) from `values` (nothing for a
    pair not in it: the device profile's own), not from the shipped fit. The backtest reads them through the
    name `stack_efficiency` in its module, which this replaces; a fit judges a fold's values with the very
    search the backtest runs, without writing a file first."""
    if not callable(getattr(backtest, "stack_efficiency", None)):  # pragma: no cover - a refactor moved it
        raise RuntimeError("planner.eval.backtest no longer looks efficiencies up via stack_efficiency; "
                           "update planner.eval.fit_cases.stack_values")
    original = backtest.stack_efficiency
    backtest.stack_efficiency = lambda stack, device: dict(values.get((stack, device), {}))
    try:
        yield
    finally:
        backtest.stack_efficiency = original


class Case:
    """One usable row with its plan fixed and its cluster, model and workload built once."""

    def __init__(self, row: dict, plan: ParallelPlan, table: str):
        self.row = row
        self.plan = plan
        self.table = table
        self.id = str(row["id"])
        self.key = f"{table}:{self.id}"  # ids are unique within a table, not across tables
        self.source = str(row["source_code"])
        self.stack = stack_key(row)
        self.family = family(self.stack)
        self.device = str(row["device"])
        self.target = str(row["target"])
        self.model = row_model(row)
        self.n = int(row["device_count"])
        # as the backtest builds it; load_cases checks that the two predict alike
        self.cluster = backtest.with_row_stack(backtest.row_cluster(row), row)
        self.workload = Workload(global_batch=int(row["global_batch"]), seq_len=int(row["seq_len"]),
                                 dtype=train_dtype_or(str(row.get("precision") or "bf16"), "bf16"),
                                 moe_capacity_factor=1.0 if backtest.token_drop(row) else None)
        self.measured = float(row[TARGETS[self.target]])
        self.fp8 = self.workload.dtype == "fp8"

    @property
    def cell(self) -> tuple[str, str]:
        return self.stack, self.device

    def predict(self, eff: dict) -> float:
        est = estimate(self.model, with_efficiency(self.cluster, eff), self.workload, self.plan)
        return predicted_value(self.target, est, self.row, self.n)

    def step_log_ratio(self, predicted: float) -> float:
        """log(measured / predicted) of the step time: a rate target (tokens/s, TFLOP/s, MFU) is inverse to it."""
        r = math.log(self.measured / predicted)
        return r if self.target == "step_time" else -r


def load_cases(path: str | Path, check: bool = True) -> list[Case]:
    """The rows the backtest predicts, each with its parsed cells (planner.eval.backtest.parse_row) and its plan
    searched once at the device profiles' values; a row the backtest skips (a bad cell, a plan the cost model
    refuses) is left out. With `check`, a row the fit would predict differently from the backtest (the two
    build its cluster separately) is an error naming it."""
    from tqdm import tqdm

    records = read_runs(path)
    cases, skipped = [], []
    with stack_values({}):
        results = [backtest_row(r, return_plan=True)
                   for r in tqdm(records, desc="plans per row", unit="row", disable=None, leave=False)]
    for res in results:
        if res.status == "ok" and res.plan is not None and res.row is not None:
            case = Case(res.row, res.plan, Path(path).name)
            if check and not math.isclose(case.predict({}), res.predicted, rel_tol=1e-9):
                raise BadInput(f"{path}: row {case.id}: the fit predicts {case.predict({}):.6g} and the backtest "
                               f"{res.predicted:.6g} for the same plan; planner.eval.fit_cases.Case builds the "
                               "row's cluster otherwise than planner.eval.backtest: make them agree")
            cases.append(case)
        elif not res.reason.startswith("unusable"):
            skipped.append(res)
    if not cases:
        first = f"; first: id {skipped[0].id!r}: {skipped[0].reason}" if skipped else ""
        raise BadInput(f"{path}: no row could be predicted, so there is nothing to fit{first}")
    return cases


def backtest_at(cases: list[Case], values: dict[tuple[str, str], dict]) -> dict[str, float]:
    """Each case's prediction by the backtest itself (its settings searched again) at `values` per (stack,
    device); case key -> predicted target. A row the backtest now refuses keeps its fixed-plan prediction."""
    out = {}
    with stack_values(values):
        for c in cases:
            res = backtest_row(c.row)
            out[c.key] = res.predicted if res.status == "ok" and res.predicted else c.predict(values.get(c.cell, {}))
    return out
