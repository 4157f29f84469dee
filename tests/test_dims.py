"""planner/core/dims.py declares every dimension of a plan once: the table covers ParallelPlan's fields and
their choices, PlanArrays is built from it (a plan survives the round trip through the columns), the rank
order is Megatron's, and each cross-dimension rule gives the same answer on one plan and on plan columns, and
the same as ParallelPlan's refusals and the search's enumeration."""
from __future__ import annotations

import itertools
from typing import get_args

import numpy as np
import pytest
from pydantic import ValidationError

from planner.catalog import load_cluster
from planner.core import dims
from planner.core.builders import MoEConfig, TransformerConfig, build_transformer
from planner.core.plan import OffloadPolicy, ParallelPlan, Workload
from planner.cost.batch_plans import PlanArrays
from planner.search.space import Constraints, enumerate_space


def test_the_table_covers_every_plan_field_but_the_partition():
    covered = {c.field.partition(".")[0] for c in dims.COLUMNS}
    assert covered == set(ParallelPlan.model_fields) - {"partition"}
    inner = {c.field.partition(".")[2] for c in dims.COLUMNS if c.field.startswith("offload.")}
    assert inner == set(OffloadPolicy.model_fields)
    assert len(dims.COLUMN) == len(dims.COLUMNS)  # column names unique


@pytest.mark.parametrize("field, choices", [("recompute", dims.RECOMPUTE_POLICIES), ("schedule", dims.SCHEDULES),
                                            ("zero", dims.ZERO_STAGES), ("cp_comm", dims.CP_COMMS),
                                            ("moe_dispatch", dims.MOE_DISPATCHES)])
def test_plan_choices_are_the_tables(field, choices):
    assert get_args(ParallelPlan.model_fields[field].annotation) == choices
    marks = [c.marks for c in dims.COLUMNS if c.field == field and c.encoding == "marks"]
    if marks:  # one bool column per choice but the default
        assert [choices[0], *marks] == list(choices)
        assert ParallelPlan.model_fields[field].default == choices[0]


def test_fills_are_the_plan_defaults():
    default = ParallelPlan()
    for col in dims.COLUMNS:
        if col.fill is not None:
            value = getattr(default, col.field) if "." not in col.field else None
            assert col.encode(value) == col.fill, col.name


def test_rank_order_is_megatrons():
    assert dims.RANK_ORDER == ("tp", "cp", "dp", "pp")
    deg = {"tp": 2, "cp": 3, "dp": 4, "pp": 5}
    # rank = tp_i + tp (cp_i + cp (dp_i + dp pp_i)): one step along a group moves the rank by its stride
    rank = {idx: idx[0] + 2 * (idx[1] + 3 * (idx[2] + 4 * idx[3]))
            for idx in itertools.product(range(2), range(3), range(4), range(5))}
    for k, name in enumerate(dims.RANK_ORDER):
        step = tuple(1 if j == k else 0 for j in range(4))
        assert rank[step] - rank[(0, 0, 0, 0)] == dims.rank_stride(name, deg)
    assert dims.rank_stride("edp", {"etp": 2, "ep": 4}, dims.EXPERT_RANK_ORDER) == 8


PLANS = [
    ParallelPlan(),
    ParallelPlan(dp=2, tp=4, pp=4, vpp=3, cp=2, sp=True, zero=3, mbs=2, schedule="interleaved-1f1b",
                 recompute="full", recompute_num_layers=2, offload=OffloadPolicy(optimizer=0.5, activations=0.25),
                 flash_attention=True, overlap_grad_reduce=True, overlap_tp_comm=True, cp_comm="a2a"),
    ParallelPlan(dp=4, tp=2, ep=2, etp=1, moe_dispatch="tp_slice", num_microbatches=7, recompute="selective"),
    ParallelPlan(dp=8, ep=8, etp=1, moe_dispatch="deepep", pp=2, schedule="gpipe", seq_chunks=4, zero=1),
    ParallelPlan(pp=2, schedule="zb-h1", attention_pool=True, flash_attention=False, recompute_num_layers=0,
                 recompute="full"),
]


def test_a_plan_survives_the_columns():
    pa = PlanArrays.from_plans(PLANS)
    assert [pa.plan(i) for i in range(len(pa))] == PLANS
    for col in dims.COLUMNS:
        assert getattr(pa, col.name).dtype == col.dtype, col.name
    assert pa.etp.tolist() == [0, 0, 1, 1, 0]  # None as 0
    assert pa.recompute_num_layers.tolist() == [-1, 2, -1, -1, 0]  # None as -1
    assert pa.moe_tp_slice.tolist() == [False, False, True, False, False]
    assert pa.moe_deepep.tolist() == [False, False, False, True, False]
    sub = pa.take(np.array([3, 1]))
    assert [sub.plan(0), sub.plan(1)] == [PLANS[3], PLANS[1]]


def test_plan_arrays_fill_broadcast_and_refuse():
    need = {c.name: np.array([1, 2, 3]) if c.dtype == np.int64 else np.zeros(3, dtype=c.dtype)
            for c in dims.COLUMNS if c.fill is None}
    need["recompute_num_layers"] = -1  # a scalar: the same in every row
    pa = PlanArrays(**need)
    assert len(pa) == 3 and pa.seq_chunks.tolist() == [1, 1, 1] and not pa.moe_deepep.any()
    assert pa.recompute_num_layers.tolist() == [-1, -1, -1]
    with pytest.raises(TypeError, match="'dp'"):
        PlanArrays(**{k: v for k, v in need.items() if k != "dp"})
    with pytest.raises(TypeError, match="'bogus'"):
        PlanArrays(**need, bogus=np.ones(3))
    with pytest.raises(Exception, match="same length"):
        PlanArrays(**{**need, "tp": np.ones(2)})


# (predicate, the arguments' value grids, the ParallelPlan that breaks it or None where no plan field maps)
RULES = [
    (dims.sp_fits_tp, ([False, True], [1, 2])),
    (dims.ulysses_fits_cp, ([False, True], [1, 2])),
    (dims.deepep_fits_ep, ([False, True], [1, 4])),
    (dims.seq_chunks_fit_attention, ([1, 2], [False, True])),
    (dims.recompute_layers_fit_policy, ([-1, 0, 3], [0, 1, 2])),
    (dims.tp_slice_fits_degrees, ([False, True], [1, 2, 4], [1, 2, 4], [0, 1, 2])),
    (dims.experts_fold_into_ranks, ([1, 2, 4, 8], [0, 1, 2], [1, 2, 3], [1, 2], [1, 2, 4])),
    (dims.experts_nest_in_dp, ([1, 2, 4, 8], [1, 2, 3], [1, 2])),
    (dims.vpp_fits_schedule, (range(len(dims.SCHEDULES)), [1, 2])),
    (dims.microbatches_fit_schedule, (range(len(dims.SCHEDULES)), [3, 4, 8], [1, 2, 4])),
]


@pytest.mark.parametrize("rule, grids", RULES, ids=[r[0].__name__ for r in RULES])
def test_a_rule_says_the_same_of_one_plan_and_of_columns(rule, grids):
    rows = list(itertools.product(*grids))
    one = [bool(rule(*row)) for row in rows]
    cols = rule(*(np.array(c) for c in zip(*rows)))
    assert cols.dtype == bool and cols.tolist() == one
    assert any(one) and not all(one)  # the grid has both outcomes


def _refused(**kw) -> bool:
    try:
        ParallelPlan(**kw)
    except ValidationError:
        return True
    return False


def test_plan_refuses_exactly_where_a_rule_fails():
    for sp, tp in itertools.product([False, True], [1, 2]):
        assert _refused(sp=sp, tp=tp) == (not dims.sp_fits_tp(sp, tp))
    for comm, cp in itertools.product(dims.CP_COMMS, [1, 2]):
        assert _refused(cp_comm=comm, cp=cp) == (not dims.ulysses_fits_cp(comm == "a2a", cp))
    for tp, ep, etp in itertools.product([1, 2], [1, 2], [None, 1, 2]):
        ok = dims.tp_slice_fits_degrees(True, tp, ep, dims.COLUMN["etp"].encode(etp))
        assert _refused(moe_dispatch="tp_slice", tp=tp, ep=ep, etp=etp) == (not ok)
    for ep in (1, 2):
        assert _refused(moe_dispatch="deepep", ep=ep) == (not dims.deepep_fits_ep(True, ep))
    for policy, layers in itertools.product(dims.RECOMPUTE_POLICIES, [None, 2]):
        ok = dims.recompute_layers_fit_policy(-1 if layers is None else layers, dims.RECOMPUTE_POLICIES.index(policy))
        assert _refused(recompute=policy, recompute_num_layers=layers) == (not ok)
    for sched, chunks, flash in itertools.product(dims.SCHEDULES, [1, 2], [False, True]):
        ix = dims.SCHEDULE_INDEX[sched]
        ok = dims.seq_chunks_fit_schedule(ix, chunks) and dims.seq_chunks_fit_attention(chunks, flash)
        assert _refused(pp=2, schedule=sched, seq_chunks=chunks, flash_attention=flash) == (not ok)


def _moe_model(heads: int):
    return build_transformer(TransformerConfig(name="moe-test", layers=4, hidden=64 * heads // 4, heads=heads,
                                               ffn_hidden=128, vocab=1000, moe=MoEConfig(experts=4, topk=2,
                                                                                         ffn_hidden=64)))


def test_every_enumerated_plan_keeps_every_rule():
    cluster = load_cluster("dgx-h100", nodes=2)
    space = enumerate_space(_moe_model(16), cluster, Workload(global_batch=32, seq_len=4096),
                            Constraints(cp_comm=("ring", "a2a"), seq_chunks=(1, 2), partial_recompute=True))
    pa = space.plans
    assert len(pa) > 1000
    assert (dims.sp_fits_tp(pa.sp, pa.tp) & dims.ulysses_fits_cp(pa.cp_a2a, pa.cp)
            & dims.deepep_fits_ep(pa.moe_deepep, pa.ep) & dims.seq_chunks_fit_attention(pa.seq_chunks,
                                                                                         pa.flash_attention)
            & dims.tp_slice_fits_degrees(pa.moe_tp_slice, pa.tp, pa.ep, pa.etp)
            & dims.experts_fold_into_ranks(pa.ep, pa.etp, pa.dp, pa.cp, pa.tp)
            & dims.vpp_fits_schedule(pa.schedule, pa.vpp)
            & dims.recompute_layers_fit_policy(pa.recompute_num_layers, pa.recompute)).all()
    assert pa.sp.any() and pa.cp_a2a.any() and pa.moe_tp_slice.any() and (pa.seq_chunks > 1).any()
    for i in np.linspace(0, len(pa) - 1, 200).astype(int):
        pa.plan(int(i))  # ParallelPlan's validators accept it


def test_cross_node_tp_offers_deepep_only_with_expert_parallelism():
    # tp 16 over two 8-GPU nodes puts a whole expert group (ep 1, etp = tp) off the node; DeepEP needs ep > 1,
    # so that plan keeps the all-to-all (the search once offered DeepEP alone there, which estimate refuses)
    space = enumerate_space(_moe_model(16), load_cluster("dgx-h100", nodes=2), Workload(global_batch=32, seq_len=4096),
                            Constraints(allow_cross_node_tp=True, tp=16, ep=1))
    pa = space.plans
    assert len(pa) and not pa.moe_deepep.any()
    assert (pa.etp == 0).any()  # expert tp 16 > 8 devices a node: the group that used to count as spanning
