"""planner/cost/step_terms.py: one function per step term for the scalar estimate (Python numbers) and
estimate_batch (columns that mix ZeRO stages and overlap settings); a column gives each plan what that plan
alone would get, and the ZeRO branches count the collectives the ZeRO paper counts."""
from __future__ import annotations

import numpy as np
import pytest

from planner.catalog import load_cluster
from planner.cost import comm
from planner.cost.layer_terms import EXPOSED_TAIL_FRACTION
from planner.cost.step_terms import (
    exposed_sync_s,
    layer_sync_sums_s,
    optimizer_step_s,
    pp_comm_s,
    state_shards,
    zero_sync_s,
)

CLUSTER = load_cluster("dgx-h100", 2)
DEV = CLUSTER.devices[0].device
LINK = CLUSTER.collective(list(range(0, 16, 2)))
LAYER_PARAMS = np.array([3e7, 5e7, 5e7, 1e6])


def test_zero_stages_count_their_collectives():
    ar, rs, ag = layer_sync_sums_s(LAYER_PARAMS, 4, 2, LINK)
    eff = DEV.efficiency.dp_collective
    assert float(zero_sync_s(ar, rs, ag, 0, 6, DEV)) == pytest.approx(ar / eff, rel=1e-12)
    assert float(zero_sync_s(ar, rs, ag, 2, 6, DEV)) == pytest.approx((rs + ag) / eff, rel=1e-12)
    # ZeRO-3 gathers the weights twice per work item (ZeRO section 7.2.2)
    assert float(zero_sync_s(ar, rs, ag, 3, 6, DEV)) == pytest.approx((rs + 12 * ag) / eff, rel=1e-12)
    assert ar == pytest.approx(np.sum(comm.all_reduce_time_s(LAYER_PARAMS * 4, LINK)), rel=1e-12)


def test_one_zero_stage_times_only_its_collectives():
    assert layer_sync_sums_s(LAYER_PARAMS, 4, 2, LINK, zero=0)[1:] == (0.0, 0.0)
    assert layer_sync_sums_s(LAYER_PARAMS, 4, 2, LINK, zero=1)[0] == 0.0


def test_counts_per_shape_equal_one_entry_per_layer():
    shapes = np.array([[3e7, 1e6], [5e7, 2e6]])  # (shapes, columns)
    counts = np.array([[1.0, 2.0], [2.0, 1.0]])
    by_shape = layer_sync_sums_s(shapes, 4, 2, LINK, layer_counts=counts)
    for col, layers in enumerate(([3e7, 5e7, 5e7], [1e6, 1e6, 2e6])):
        by_layer = layer_sync_sums_s(np.array(layers), 4, 2, LINK)
        for got, want in zip(by_shape, by_layer):
            assert got[col] == pytest.approx(want, rel=1e-12)


def test_a_column_gives_each_plan_its_own_branch():
    zero = np.array([0, 1, 2, 3, 3, 0])
    overlap = np.array([False, True, False, False, True, True])
    items = np.array([4, 4, 8, 8, 2, 1])
    replicas = np.array([8, 8, 1, 16, 16, 2])
    sync, busy, last_bwd = np.array([1.0, 2.0, 3.0, 4.0, 0.5, 0.1]), np.full(6, 2.5), np.full(6, 0.3)
    params = np.full(6, 1e9)
    col = exposed_sync_s(sync, zero, overlap, busy, last_bwd, DEV, params_dev=params, weight_bytes=2,
                         grad_bytes=4, items=items, replicas=replicas)
    opt = optimizer_step_s(params, state_shards(zero, replicas), 0.0, DEV)
    for i in range(6):
        one = exposed_sync_s(float(sync[i]), int(zero[i]), bool(overlap[i]), 2.5, 0.3, DEV, params_dev=1e9,
                             weight_bytes=2, grad_bytes=4, items=int(items[i]), replicas=int(replicas[i]))
        assert col[i] == float(one)
        assert opt[i] == float(optimizer_step_s(1e9, int(state_shards(int(zero[i]), int(replicas[i]))), 0.0, DEV))
    # ZeRO-3 hides behind the stage's busy time down to the exposed tail; no overlap hides nothing
    assert col[3] == pytest.approx(max(4.0 - DEV.efficiency.comm_overlap * 2.5, EXPOSED_TAIL_FRACTION * 4.0))
    assert col[0] == 1.0
    assert opt[0] == pytest.approx(8 * opt[1])  # ZeRO-1 shards the states over dp x cp


def test_pp_comm_is_zero_without_a_pipeline():
    got = pp_comm_s(np.array([1, 4]), np.array([1, 2]), np.array([8, 8]), np.array([1e-3, 1e-3]))
    assert got[0] == 0.0 and got[1] == pytest.approx(2 * 8 * 2 * 1e-3)
