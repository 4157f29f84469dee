"""The search (planner/search): its space follows the rules, its bounds stay below estimate(), and its best
plan equals brute force -- scalar estimate() over every plan of the same space -- on random small models and
clusters. And it never does worse than a published configuration (a few cheap rows of the runs table)."""
from __future__ import annotations

import itertools
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.catalog import load_cluster
from planner.core.builders import MoEConfig, TransformerConfig, build_transformer
from planner.core.errors import BadInput
from planner.core.plan import Workload
from planner.cost.batch_plans import POLICIES, SCHEDULES
from planner.cost.estimate import estimate
from planner.eval.published import search_row
from planner.importers import load_model
from planner.search.search import NoPlanFits, search, step_lower_bound
from planner.search.space import Constraints, enumerate_space, memory_lower_bound

REL = 1e-9
# the test copy of reference calibration_runs_clean.csv (identical; CI's clean clone has no reference folder)
RUNS = Path(__file__).resolve().parent / "data" / "calibration_runs_clean.csv"


@lru_cache(maxsize=None)
def cluster(devices: int, memory_gb: float):
    """dgx-h100 with `devices` devices (part of a node, or whole nodes), each with memory_gb of memory so
    that the memory bound and infeasibility come into play on tiny models."""
    c = load_cluster("dgx-h100", nodes=max(1, devices // 8), devices=devices if devices < 8 else None)
    dev = c.devices[0].device.model_copy(update={"memory_gb": memory_gb})
    return c.model_copy(update={"devices": [d.model_copy(update={"device": dev}) for d in c.devices]})


@st.composite
def cases(draw):
    heads = draw(st.sampled_from([2, 4, 8]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4, 8) if heads % k == 0]))
    moe = None
    if draw(st.integers(0, 3)) == 0:
        moe = MoEConfig(experts=draw(st.sampled_from([2, 4])), topk=1, ffn_hidden=64)
    cfg = TransformerConfig(name="rand", layers=draw(st.integers(1, 5)), hidden=heads * 16, heads=heads, kv_heads=kv,
                            ffn_hidden=draw(st.sampled_from([64, 128])), vocab=draw(st.sampled_from([500, 4000])),
                            moe=moe)
    devices = draw(st.sampled_from([1, 2, 4, 8, 16]))
    memory_gb = draw(st.sampled_from([0.8, 1.0, 1.5, 80.0]))
    workload = Workload(global_batch=draw(st.sampled_from([8, 16, 32])), seq_len=draw(st.sampled_from([256, 2048])),
                        dtype=draw(st.sampled_from(["bf16", "bf16", "fp8"])))
    # random constraints keep the brute force small (and exercise them)
    cons = Constraints(zero=draw(st.sampled_from([None, 0, 1, 3])),
                       recompute=draw(st.sampled_from(["none", "full", "selective", None])),
                       sp=draw(st.sampled_from([None, True, False])), max_vpp=2, max_mbs=4,
                       schedule=draw(st.sampled_from([None, "1f1b", "interleaved-1f1b"])),
                       max_pp=draw(st.sampled_from([None, 2])),
                       flash_attention=draw(st.booleans()), overlap_grad_reduce=draw(st.booleans()))
    return build_transformer(cfg), devices, memory_gb, workload, cons


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_search_equals_brute_force(case):
    model, devices, memory_gb, workload, cons = case
    c = cluster(devices, memory_gb)
    try:
        space = enumerate_space(model, c, workload, cons)
    except BadInput:
        return  # the constraints leave no plan; the space test checks the message
    pa = space.plans
    plans = [pa.plan(i) for i in range(len(pa))]
    ests = [estimate(model, c, workload, p) for p in plans]
    # both bounds stay below what estimate() computes
    mem_lb = memory_lower_bound(model, workload, pa)
    t_lb = step_lower_bound(model, c, workload, pa)
    for i, e in enumerate(ests):
        assert mem_lb[i] <= e.peak_memory_bytes * (1 + REL), (plans[i], mem_lb[i], e.peak_memory_bytes)
        assert t_lb[i] <= e.step_time_s * (1 + REL), (plans[i], t_lb[i], e.step_time_s)
    fitting = [e.step_time_s for e in ests if e.fits]
    if not fitting:
        with pytest.raises(NoPlanFits) as info:
            search(model, c, workload, cons, refine_partition=False)
        assert info.value.closest
        least = min(e.peak_memory_bytes for e in ests)
        assert info.value.closest[0].estimate.peak_memory_bytes >= least * (1 - REL)
        return
    res = search(model, c, workload, cons, top_k=3, refine_partition=False)
    want = sorted(fitting)[:3]
    got = [rp.estimate.step_time_s for rp in res.plans]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert math.isclose(g, w, rel_tol=REL), (got, want)
    assert all(rp.estimate.fits for rp in res.plans)
    assert res.evaluated + res.pruned_memory + res.pruned_bound == res.enumerated == len(pa)


def test_space_matches_an_independent_enumeration():
    """Every rule of the module docstring, written out with itertools, gives the same set of plans."""
    model = build_transformer(TransformerConfig(
        name="t", layers=4, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=1000,
        moe=MoEConfig(experts=4, topk=2, ffn_hidden=64)))
    c = cluster(8, 80.0)
    wl = Workload(global_batch=16, seq_len=512)
    cons = Constraints(max_vpp=3, max_mbs=4, zero=1, recompute="full")
    got = enumerate_space(model, c, wl, cons).plans
    got_set = {tuple(int(getattr(got, f)[i]) for f in ("tp", "pp", "dp", "cp", "ep", "etp", "vpp", "mbs", "schedule",
                                                       "zero", "sp", "recompute", "cp_a2a", "moe_tp_slice"))
               for i in range(len(got))}
    assert len(got_set) == len(got)
    want = set()
    for tp, pp, cp, ep, etp, mbs, sched, vpp, sp, a2a, ts in itertools.product(
            [1, 2, 4, 8], [1, 2, 4, 8], [1, 2, 4, 8], [1, 2, 4], [0, 1], [1, 2, 4], range(4), [1, 2, 3], [0, 1],
            [0, 1], [0, 1]):
        if 8 % (tp * pp * cp):
            continue
        dp = 8 // (tp * pp * cp)
        etp_eff = etp or tp
        ok = (4 % tp == 0 and 2 % tp == 0 and pp <= 4 and (cp == 1 or 512 % (2 * cp) == 0) and 16 % (mbs * dp) == 0
              and (dp * cp * tp) % (ep * etp_eff) == 0 and not (etp == 1 and tp == 1)
              and (not a2a or (cp > 1 and 4 % (tp * cp) == 0))
              and (not ts or (tp > 1 and ep == tp and etp_eff == 1))
              and (not sp or tp > 1) and pp * vpp <= 4)
        m = 16 // (mbs * dp)
        if sched == SCHEDULES.index("interleaved-1f1b"):
            ok = ok and vpp >= 2 and m % pp == 0
        else:
            ok = ok and vpp == 1
        ok = ok and (pp > 1 or sched == SCHEDULES.index("1f1b"))
        if ok:
            want.add((tp, pp, dp, cp, ep, 0 if etp_eff == tp else etp_eff, vpp, mbs, sched, 1, sp,
                      POLICIES.index("full"), a2a, ts))
    assert got_set == want


def test_constraints_fix_and_bound_dimensions():
    model = load_model("tiny-llama-20m")
    c = cluster(8, 80.0)
    wl = Workload(global_batch=32, seq_len=1024)
    res = search(model, c, wl, Constraints(tp=2, zero=3, recompute="selective", max_pp=2), top_k=5)
    for rp in res.plans:
        assert (rp.plan.tp, rp.plan.zero, rp.plan.recompute) == (2, 3, "selective") and rp.plan.pp <= 2
    wide_model = build_transformer(TransformerConfig(name="w", layers=2, hidden=256, heads=16, ffn_hidden=512,
                                                     vocab=1000))
    space = enumerate_space(wide_model, cluster(16, 80.0), wl, Constraints())
    assert space.plans.tp.max() == 8  # tp within a node by default
    wide = enumerate_space(wide_model, cluster(16, 80.0), wl, Constraints(allow_cross_node_tp=True))
    assert wide.plans.tp.max() == 16
    with pytest.raises(BadInput, match="tp"):
        enumerate_space(model, c, wl, Constraints(tp=3))


def test_partition_refinement_keeps_the_estimate():
    """Plans the DP partition refined carry their partition, and their estimate is estimate() of them."""
    model = load_model("tiny-llama-20m")
    c = cluster(8, 80.0)
    wl = Workload(global_batch=64, seq_len=1024)
    res = search(model, c, wl, Constraints(pp=4), top_k=3)
    for rp in res.plans:
        e = estimate(model, c, wl, rp.plan)
        assert math.isclose(e.step_time_s, rp.estimate.step_time_s, rel_tol=REL)
    assert [rp.estimate.step_time_s for rp in res.plans] == sorted(rp.estimate.step_time_s for rp in res.plans)


@pytest.mark.parametrize("row_id", ["47", "78", "169", "24"])
def test_never_worse_than_published(row_id):
    import pandas as pd

    df = pd.read_csv(RUNS)
    row = df[df["id"].astype(str) == row_id].to_dict(orient="records")[0]
    out = search_row(row)
    assert out["status"] == "ok", out
    assert out["best_tokens_per_s"] >= out["published_tokens_per_s"] * (1 - REL), out


def test_step_bound_prunes_and_search_is_deterministic():
    model = load_model("tiny-llama-20m")
    c = cluster(8, 80.0)
    wl = Workload(global_batch=64, seq_len=1024)
    a = search(model, c, wl, top_k=2, refine_partition=False)
    b = search(model, c, wl, top_k=2, refine_partition=False, use_time_bound=False)
    assert a.pruned_bound > 0 and b.pruned_bound == 0
    assert [rp.plan for rp in a.plans] == [rp.plan for rp in b.plans]
    assert np.isclose(a.plans[0].estimate.step_time_s, b.plans[0].estimate.step_time_s, rtol=REL)
