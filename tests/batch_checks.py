"""Shared check: estimate_batch on a list of plans equals estimate() on each plan (the contract of
planner/cost/batch.py), and equals itself on the same plans given as PlanArrays."""
from __future__ import annotations

import math

import numpy as np

from planner.cost.batch import OUTPUTS, PlanArrays, estimate_batch
from planner.cost.estimate import estimate

REL = 1e-9
# the breakdown terms estimate_batch returns beside the step time
BREAKDOWN = ("pp_comm_s", "dp_comm_exposed_s", "optimizer_s", "offload_s")


def assert_equal_to_scalar(model, cluster, workload, plans, got) -> None:
    for i, plan in enumerate(plans):
        want = estimate(model, cluster, workload, plan)
        for k in ("step_time_s", "tokens_per_s", "mfu", "hfu", "peak_memory_bytes"):
            assert math.isclose(got[k][i], getattr(want, k), rel_tol=REL, abs_tol=1e-300), (i, k, plan, got[k][i],
                                                                                           getattr(want, k))
        for k in BREAKDOWN:
            assert math.isclose(got[k][i], want.breakdown[k], rel_tol=REL, abs_tol=1e-300), (
                i, k, plan, got[k][i], want.breakdown[k])
        assert bool(got["fits"][i]) == want.fits, (i, plan)


def assert_batch_equals_scalar(model, cluster, workload, plans) -> None:
    got = estimate_batch(model, cluster, workload, plans)
    also = estimate_batch(model, cluster, workload, PlanArrays.from_plans(plans))
    for k in OUTPUTS:
        np.testing.assert_array_equal(got[k], also[k], err_msg=k)
    assert_equal_to_scalar(model, cluster, workload, plans, got)
