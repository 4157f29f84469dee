"""The schedule vocabulary (planner/core/dims.py) and the schedule registry (planner/cost/schedules/): one
declaration, the same verdict for one plan and for plan columns, and ParallelPlan refusing what dims refuses."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from pydantic import ValidationError

from planner.core import dims
from planner.core.plan import ParallelPlan
from planner.cost import schedules
from planner.cost.schedules.base import PipelineScheduleSpec
from planner.cost.schedules.registry import register


def test_every_declared_schedule_is_registered_under_its_name():
    for name in dims.SCHEDULES:
        assert schedules.get_schedule(name).name == name
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        schedules.get_schedule("zb-v")


def test_a_schedule_missing_from_dims_cannot_register():
    class Undeclared(PipelineScheduleSpec):
        name = "zb-v"

    with pytest.raises(RuntimeError, match="not declared"):
        register(Undeclared)


def test_predicates_give_columns_the_verdict_of_single_plans():
    grid = list(itertools.product(range(len(dims.SCHEDULES)), (1, 2, 3), (1, 2, 4), (1, 4, 6), (1, 2, 4)))
    s, vpp, n, m, pp = (np.array(col) for col in zip(*grid))
    for rule, args in ((dims.vpp_fits_schedule, (vpp,)), (dims.seq_chunks_fit_schedule, (n,)),
                       (dims.microbatches_fit_schedule, (m, pp))):
        cols = rule(s, *args)
        one_by_one = [bool(rule(int(s[i]), *(int(a[i]) for a in args))) for i in range(len(grid))]
        assert cols.dtype == bool and cols.tolist() == one_by_one


def test_parallel_plan_refuses_what_dims_refuses():
    for name in dims.SCHEDULES:
        ix = dims.SCHEDULE_INDEX[name]
        for vpp, n in ((1, 1), (2, 1), (1, 2)):
            ok = bool(dims.vpp_fits_schedule(ix, vpp) and dims.seq_chunks_fit_schedule(ix, n))
            fields = dict(dp=1, tp=1, pp=2, schedule=name, vpp=vpp, seq_chunks=n, flash_attention=True)
            if ok:
                ParallelPlan(**fields)
            else:
                with pytest.raises(ValidationError, match="needs schedule"):
                    ParallelPlan(**fields)
    assert dims.schedules_with("virtual_stages") == ("interleaved-1f1b",)
    assert dims.schedule_problem("interleaved-1f1b", 4, 3, 2) is not None  # 3 micro-batches over pp 4
    assert dims.schedule_problem("interleaved-1f1b", 4, 6, 2) is None  # Megatron-Core groups of 6
    assert dims.schedule_problem("interleaved-1f1b", 4, 8, 2) is None
