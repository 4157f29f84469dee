"""The DP stage partition (planner/search/partition.py).

The DP is held to a brute force over every composition on small random instances (its objective,
feasibility and reported per-chunk terms), to hand-solved cases, to the cost model itself (its per-chunk
time and memory equal estimate()'s per-stage figures), and to estimate() on real models: Llama 3.1 405B
on 2,048 H100 with pp = 16 must come out faster than the even split, with lighter first and last stages.
"""
from __future__ import annotations

import itertools
import math
import time
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.catalog import load_cluster
from planner.core.builders import TransformerConfig, build_transformer
from planner.core.errors import BadInput, Infeasible
from planner.core.plan import ParallelPlan, Workload
from planner.cost.estimate import estimate
from planner.importers import load_model
from planner.search.partition import (
    OBJECTIVES,
    BlockCosts,
    best_partition,
    block_costs,
    chunk_inflight,
    partition_dp,
    with_partition,
)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def costs_of(time_s, **kw) -> BlockCosts:
    """BlockCosts with zeros for every array not given."""
    n = len(time_s)
    t = np.asarray(time_s, dtype=float)
    zero = np.zeros(n)
    arrays = {"act_bytes": zero, "params": zero, "state_bytes": zero}
    arrays.update({k: np.asarray(v, dtype=float) for k, v in kw.items() if k in arrays or k.startswith("early")})
    scalars = {k: v for k, v in kw.items() if k not in arrays and not k.startswith("early")}
    return BlockCosts(time_s=t, early_time_s=arrays.get("early_time_s", t),
                      early_act_bytes=arrays.get("early_act_bytes", arrays["act_bytes"]),
                      act_bytes=arrays["act_bytes"], params=arrays["params"], state_bytes=arrays["state_bytes"],
                      **scalars)


def no_overhead(x):
    return 0.0 * x


# ----------------------------------------------------------------------------------------------
# brute force: every composition, each chunk summed block by block


def chunk_terms(c: BlockCosts, lo: int, hi: int, infl: float, overhead) -> tuple[float, float, float]:
    n = c.n
    t = a = 0.0
    for pos, blk in enumerate(range(lo, hi)):
        early = pos < c.recompute_cut
        t += c.early_time_s[blk] if early else c.time_s[blk]
        a += c.early_act_bytes[blk] if early else c.act_bytes[blk]
    p = float(sum(c.params[lo:hi]))
    s = float(sum(c.state_bytes[lo:hi]))
    if lo == 0:
        t, a, p, s = t + c.head_time_s, a + c.head_act_bytes, p + c.head_params, s + c.head_state_bytes
    if hi == n:
        t, a, p, s = t + c.tail_time_s, a + c.tail_act_bytes, p + c.tail_params, s + c.tail_state_bytes
    held = s + a * infl
    return t, p, held + overhead(held)


def brute_force(c: BlockCosts, k: int, inflight, capacity: float, overhead, order=OBJECTIVES):
    """(optimum per objective in order, lexicographically) or None when nothing fits."""
    rows = []
    for cuts in itertools.combinations(range(1, c.n), k - 1):
        edges = (0, *cuts, c.n)
        terms = [chunk_terms(c, edges[j], edges[j + 1], inflight[j], overhead) for j in range(k)]
        if all(m <= capacity for _, _, m in terms):
            rows.append({"time": max(t for t, _, _ in terms), "params": max(p for _, p, _ in terms),
                         "memory": max(m for _, _, m in terms)})
    if not rows:
        return None
    best = {}
    for name in order:
        best[name] = min(r[name] for r in rows)
        rows = [r for r in rows if r[name] <= best[name]]
    return best


ints = st.integers(0, 20)


@st.composite
def instances(draw, integral: bool = True):
    n = draw(st.integers(1, 10))
    k = draw(st.integers(1, min(4, n)))
    num = ints if integral else st.floats(0, 20, allow_nan=False, allow_infinity=False)
    arr = st.lists(num, min_size=n, max_size=n)
    cut = draw(st.integers(0, 3))
    costs = costs_of(draw(arr), early_time_s=draw(arr), act_bytes=draw(arr), early_act_bytes=draw(arr),
                     params=draw(arr), state_bytes=draw(arr), recompute_cut=cut,
                     head_time_s=draw(num), tail_time_s=draw(num), head_params=draw(num), tail_params=draw(num),
                     head_state_bytes=draw(num), tail_state_bytes=draw(num), head_act_bytes=draw(num),
                     tail_act_bytes=draw(num))
    inflight = draw(st.lists(st.integers(1, 4), min_size=k, max_size=k))
    capacity = draw(st.one_of(st.just(math.inf), st.integers(0, 300).map(float)))
    order = draw(st.permutations(OBJECTIVES))
    return costs, k, inflight, capacity, order


def affine_overhead(x):
    return 0.25 * x + 2.0  # exact in binary floating point for integer x


@PROPS
@given(instances())
def test_dp_equals_brute_force(case):
    costs, k, inflight, capacity, order = case
    want = brute_force(costs, k, inflight, capacity, affine_overhead, order)
    if want is None:
        with pytest.raises(Infeasible):
            partition_dp(costs, k, inflight, capacity, overhead=affine_overhead, order=order)
        return
    got = partition_dp(costs, k, inflight, capacity, overhead=affine_overhead, order=order)
    assert {"time": got.max_time_s, "params": got.max_params, "memory": got.max_memory_bytes} == want
    # the split is a real one and the DP reports its terms right
    assert got.ranges[0][0] == 0 and got.ranges[-1][1] == costs.n
    assert all(lo < hi for lo, hi in got.ranges)
    assert all(a[1] == b[0] for a, b in zip(got.ranges, got.ranges[1:]))
    terms = [chunk_terms(costs, lo, hi, inflight[j], affine_overhead) for j, (lo, hi) in enumerate(got.ranges)]
    assert [t for t, _, _ in terms] == list(got.chunk_time_s)
    assert [m for _, _, m in terms] == list(got.chunk_memory_bytes)
    assert all(m <= capacity for m in got.chunk_memory_bytes)


@PROPS
@given(instances(integral=False))
def test_dp_equals_brute_force_on_real_numbers(case):
    costs, k, inflight, capacity, _ = case
    want = brute_force(costs, k, inflight, math.inf, no_overhead)
    got = partition_dp(costs, k, inflight, overhead=no_overhead)
    assert math.isclose(got.max_time_s, want["time"], rel_tol=1e-9, abs_tol=1e-12)


# ----------------------------------------------------------------------------------------------
# hand-solved


def test_hand_solved_split_after_the_fourth_block():
    part = partition_dp(costs_of([1, 1, 1, 1, 4]), 2)
    assert part.ranges == ((0, 4), (4, 5))
    assert part.max_time_s == 4


def test_hand_solved_memory_moves_the_split():
    # unconstrained: [4] | [1 1 1 1], max 4; each block holds 1 byte and a chunk may hold 3, so the
    # second chunk can take at most 3 blocks: [4 1] | [1 1 1], max 5
    costs = costs_of([4, 1, 1, 1, 1], state_bytes=[1, 1, 1, 1, 1])
    assert partition_dp(costs, 2, overhead=no_overhead).ranges == ((0, 1), (1, 5))
    part = partition_dp(costs, 2, capacity_bytes=3, overhead=no_overhead)
    assert part.ranges == ((0, 2), (2, 5)) and part.max_time_s == 5
    with pytest.raises(Infeasible, match="no split of 5 blocks into 2"):
        partition_dp(costs, 2, capacity_bytes=2, overhead=no_overhead)


def test_hand_solved_inflight_and_extras():
    # 1F1B on 2 stages: stage 0 holds 2 micro-batches, stage 1 one. Activations 1 byte per block per
    # micro-batch, capacity 5: stage 0 fits 2 blocks, stage 1 up to 5. The head (time 2) rides on chunk 0.
    costs = costs_of([1] * 6, act_bytes=[1] * 6, head_time_s=2.0)
    part = partition_dp(costs, 2, inflight=[2, 1], capacity_bytes=5, overhead=no_overhead)
    assert part.ranges == ((0, 2), (2, 6)) and part.chunk_time_s == (4.0, 4.0)
    assert part.chunk_memory_bytes == (4.0, 4.0)


def test_recompute_cut_uses_early_costs_at_the_start_of_each_chunk():
    # the first block of every chunk costs 3 instead of 1 (recomputed): [3 1 1] | [3 1 1]
    costs = costs_of([1] * 6, early_time_s=[3] * 6, recompute_cut=1)
    part = partition_dp(costs, 2)
    assert part.ranges == ((0, 3), (3, 6)) and part.chunk_time_s == (5.0, 5.0)


def test_ties_are_broken_deterministically():
    # [1] | [1 1] and [1 1] | [1] tie on every objective: the later chunks start as early as they can
    costs = costs_of([1, 1, 1])
    assert partition_dp(costs, 2).ranges == ((0, 1), (1, 3))
    assert all(partition_dp(costs, 2).ranges == ((0, 1), (1, 3)) for _ in range(3))
    # parameters break a time tie: the split that balances them wins
    costs = costs_of([1, 1, 1], params=[3, 3, 0])
    assert partition_dp(costs, 2).ranges == ((0, 1), (1, 3))
    costs = costs_of([1, 1, 1], params=[0, 3, 3])
    assert partition_dp(costs, 2).ranges == ((0, 2), (2, 3))


def test_bad_arguments():
    with pytest.raises(BadInput, match="cannot split 3 blocks into 4"):
        partition_dp(costs_of([1, 1, 1]), 4)
    with pytest.raises(ValueError, match="one entry per chunk"):
        partition_dp(costs_of([1, 1, 1]), 2, inflight=[1])
    with pytest.raises(ValueError, match="permutation"):
        partition_dp(costs_of([1, 1, 1]), 2, order=("time",))


def test_dp_is_fast_for_126_blocks_on_64_chunks():
    rng = np.random.default_rng(0)
    n, k = 126, 64
    costs = costs_of(rng.random(n), early_time_s=rng.random(n), act_bytes=rng.random(n) * 1e9,
                     params=rng.random(n) * 1e8, state_bytes=rng.random(n) * 1e9, recompute_cut=2,
                     head_time_s=0.5, tail_time_s=0.7)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        partition_dp(costs, k, inflight=np.arange(k, 0, -1.0), capacity_bytes=80e9)
        best = min(best, time.perf_counter() - start)
    assert best < 0.1


# ----------------------------------------------------------------------------------------------
# against the cost model


@lru_cache(maxsize=None)
def cluster(nodes: int):
    return load_cluster("dgx-h100", nodes=nodes)


@lru_cache(maxsize=None)
def model(name: str):
    return load_model(name)


@lru_cache(maxsize=None)
def big_vocab():
    """A small decoder whose 256k-token head costs several blocks: the last stage must stay light."""
    return build_transformer(TransformerConfig(name="big-vocab", layers=12, hidden=1024, heads=16,
                                               ffn_hidden=2816, vocab=256_000))


CONSISTENCY = [
    ("tiny-llama-20m", 1, Workload(global_batch=16, seq_len=512),
     ParallelPlan(tp=2, pp=2, dp=2, recompute="full", recompute_num_layers=1)),
    ("tiny-llama-20m", 3, Workload(global_batch=16, seq_len=512), ParallelPlan(tp=2, pp=3, dp=4, zero=1)),
    ("tiny-llama-20m", 1, Workload(global_batch=16, seq_len=512),
     ParallelPlan(pp=4, dp=2, schedule="gpipe", offload={"activations": 0.5, "optimizer": 0.5})),
    ("pixart-alpha-512", 1, Workload(global_batch=64, seq_len=1024), ParallelPlan(pp=4, dp=2, mbs=2)),
    ("moe-tiny", 1, Workload(global_batch=64, seq_len=1024),
     ParallelPlan(tp=2, pp=2, dp=2, ep=2, mbs=2, recompute="selective", sp=True)),
    ("big-vocab", 1, Workload(global_batch=64, seq_len=2048), ParallelPlan(tp=2, pp=4, zero=1)),
]


def _model(name):
    return big_vocab() if name == "big-vocab" else model(name)


@pytest.mark.parametrize("name,nodes,workload,plan", CONSISTENCY, ids=[c[0] for c in CONSISTENCY])
def test_dp_chunk_terms_equal_estimate_stages(name, nodes, workload, plan):
    """With vpp = 1 the DP's per-chunk time and memory are estimate()'s per-stage figures."""
    m, c = _model(name), cluster(nodes)
    costs = block_costs(m, c, workload, plan)
    part = partition_dp(costs, plan.pp, chunk_inflight(workload, plan))
    est = estimate(m, c, workload, with_partition(plan, part.ranges))
    assert [s["fwd_s"] + s["bwd_s"] for s in est.stages] == pytest.approx(part.chunk_time_s, rel=1e-12)
    assert [s["total_bytes"] for s in est.stages] == pytest.approx(part.chunk_memory_bytes, rel=1e-12)
    assert est.step_time_s <= estimate(m, c, workload, plan).step_time_s


def test_big_vocab_dp_beats_even_split():
    m, c, w = big_vocab(), cluster(1), Workload(global_batch=64, seq_len=2048)
    plan = ParallelPlan(tp=2, pp=4, zero=1)
    even = estimate(m, c, w, plan)
    best_plan, best = best_partition(m, c, w, plan)
    sizes = [hi - lo for lo, hi in (a.layers for a in best_plan.partition)]
    assert best.step_time_s < even.step_time_s
    assert sizes[-1] < 12 // 4  # the 256k-vocabulary head makes the last stage carry fewer blocks
    assert best == estimate(m, c, w, best_plan)


def test_tiny_llama_dp_no_slower_than_even():
    m, c, w = model("tiny-llama-20m"), cluster(1), Workload(global_batch=32, seq_len=512)
    plan = ParallelPlan(pp=4, dp=2, zero=1)
    part = partition_dp(block_costs(m, c, w, plan), 4, chunk_inflight(w, plan))
    assert estimate(m, c, w, with_partition(plan, part.ranges)).step_time_s <= \
        estimate(m, c, w, plan).step_time_s


def test_interleaved_partition_is_valid_and_no_slower():
    m, c, w = big_vocab(), cluster(1), Workload(global_batch=64, seq_len=2048)
    plan = ParallelPlan(tp=2, pp=4, vpp=2, schedule="interleaved-1f1b", zero=1)
    best_plan, best = best_partition(m, c, w, plan)
    assert best.step_time_s <= estimate(m, c, w, plan).step_time_s
    if best_plan.partition is not None:
        assert len(best_plan.partition) == 8


def test_single_chunk_plan_comes_back_unchanged():
    m, c, w = model("tiny-llama-20m"), cluster(1), Workload(global_batch=16, seq_len=512)
    plan = ParallelPlan(tp=2, dp=4)
    got, est = best_partition(m, c, w, plan)
    assert got is plan and est == estimate(m, c, w, plan)


def test_refusals_are_one_line_planner_errors():
    m, c, w = model("tiny-llama-20m"), cluster(1), Workload(global_batch=16, seq_len=512)
    with pytest.raises(BadInput, match="only 6 blocks"):
        best_partition(m, c, w, ParallelPlan(pp=8))
    # interleaving needs at least pp micro-batches
    with pytest.raises(BadInput, match="at least as many micro-batches"):
        best_partition(m, c, w, ParallelPlan(pp=2, dp=4, vpp=3, schedule="interleaved-1f1b",
                                             num_microbatches=1))


# ----------------------------------------------------------------------------------------------
# Llama 3.1 405B on 2,048 H100, pp = 16 (126 blocks)

W405 = Workload(global_batch=2048, seq_len=8192)


def _405b(**kw):
    return ParallelPlan(tp=8, pp=16, dp=16, mbs=1, schedule="1f1b", sp=True, **kw)


def test_405b_pp16_dp_partition_beats_even_split():
    """FSDP-style ZeRO-3, selective recompute: both splits fit; the DP's is faster and uneven."""
    m, c, plan = model("llama3.1-405b"), cluster(256), _405b(zero=3, recompute="selective")
    even = estimate(m, c, W405, plan)
    part = partition_dp(block_costs(m, c, W405, plan), 16, chunk_inflight(W405, plan),
                        c.devices[0].device.memory_bytes)
    dp = estimate(m, c, W405, with_partition(plan, part.ranges))
    print(f"405B pp16 zero3 selective: even {even.step_time_s:.3f} s, DP {dp.step_time_s:.3f} s, "
          f"sizes {part.sizes}")
    assert even.fits and dp.fits
    assert dp.step_time_s < even.step_time_s
    assert sum(part.sizes) == 126 and max(part.sizes) == 8
    assert part.sizes[0] < 8 and part.sizes[-1] < 8  # Llama 3: one block less on the first and last
    assert best_partition(m, c, W405, plan)[1].step_time_s == dp.step_time_s


def test_405b_pp16_memory_aware_split_fits_where_even_does_not():
    """ZeRO-1, selective recompute: the even split needs 99 GB on stage 0 (16 micro-batches in flight);
    the DP moves blocks off the early stages until every stage fits in 80 GB."""
    m, c, plan = model("llama3.1-405b"), cluster(256), _405b(zero=1, recompute="selective")
    assert not estimate(m, c, W405, plan).fits
    best_plan, best = best_partition(m, c, W405, plan)
    sizes = [hi - lo for lo, hi in (a.layers for a in best_plan.partition)]
    assert best.fits and sizes[0] < sizes[-1]


def test_405b_pp16_best_partition_keeps_the_faster_split():
    """ZeRO-1, full recompute: both fit, and best_partition returns whichever of the DP and the even split
    estimate() finds faster (the even one on a tie). Here the DP's 7 + 14 x 8 + 7 trims the data-parallel
    reduction but the simulated 1F1B pays about one block's time for a light first stage."""
    m, c, plan = model("llama3.1-405b"), cluster(256), _405b(zero=1, recompute="full")
    even = estimate(m, c, W405, plan)
    part = partition_dp(block_costs(m, c, W405, plan), 16, chunk_inflight(W405, plan),
                        c.devices[0].device.memory_bytes)
    dp = estimate(m, c, W405, with_partition(plan, part.ranges))
    best_plan, best = best_partition(m, c, W405, plan)
    assert even.fits and dp.fits
    assert best.step_time_s == min(even.step_time_s, dp.step_time_s)
    assert (best_plan.partition is None) == (even.step_time_s <= dp.step_time_s)
