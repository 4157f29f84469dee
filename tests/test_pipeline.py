"""Pipeline schedule simulation (planner.cost.pipeline) against closed forms, hand-solved cases and
a brute-force longest-path check."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.cost.pipeline import (
    PipelineEvent,
    bubble_fraction_closed,
    bubble_time_closed,
    inflight_microbatches,
    schedule_order,
    simulate,
)

PM = [(1, 1), (1, 5), (2, 1), (2, 2), (2, 3), (3, 7), (4, 4), (4, 8), (4, 3), (8, 32), (5, 9)]


# ----------------------------------------------------------------------------------------------
# equal stages: closed forms

@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", PM)
def test_uniform_gpipe_1f1b_match_closed_form_exactly(schedule, p, m):
    tf, tb = 3.0, 5.0  # exact in binary: equality, not approx
    r = simulate(schedule, [tf] * p, [tb] * p, m)
    assert r.step_time_s == (m + p - 1) * (tf + tb)
    assert r.busy_s == tuple([m * (tf + tb)] * p)
    assert r.bubble_s == (p - 1) * (tf + tb) == bubble_time_closed(schedule, p, m, tf=tf, tb=tb)
    assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-15)
    assert r.bubble_fraction == pytest.approx(bubble_fraction_closed(schedule, p, m, tf=tf, tb=tb))
    assert bubble_fraction_closed(schedule, p, m, of="ideal") == pytest.approx((p - 1) / m)


def test_closed_form_fractions():
    assert bubble_fraction_closed("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction_closed("interleaved-1f1b", 4, 8, v=2) == pytest.approx(3 / 19)
    assert bubble_fraction_closed("interleaved-1f1b", 4, 8, v=2, of="ideal") == pytest.approx(3 / 16)
    # ZB-H1 with T_F = T_B = T_W: a third of 1F1B's bubble time (Qi et al.; zero-bubble README "B/3")
    assert bubble_time_closed("zb-h1", 4, 8, tf=1, tb=2, tw=1) == pytest.approx(
        bubble_time_closed("1f1b", 4, 8, tf=1, tb=2) / 3)
    assert bubble_fraction_closed("zb-h1", 4, 8, tf=1, tb=2, tw=1) == pytest.approx(3 / (3 * 8 + 3))
    with pytest.raises(ValueError):
        bubble_fraction_closed("1f1b", 4, 8, of="wall")


def test_interleaved_hand_solved_p2_v2_m4():
    """p=2, v=2, m=4; every chunk F=1, B=2, so a device's whole stage is t_f=2, t_b=4.

    Megatron's warm-up: rank 0 runs 2(p-1)+(v-1)p = 4 forwards, rank 1 runs 2. Forward k runs chunk
    (k mod 4)//2 on micro-batch (k//4)*2 + k mod 2. Virtual stages 0,1,2,3 = dev0c0, dev1c0, dev0c1,
    dev1c1. By hand (start-end):
      dev0: F0c0 0-1, F1c0 1-2, F0c1 2-3 (needs dev1 F0c0 at 2), F1c1 3-4, F2c0 4-5,
            idle 5-6, B0c1 6-8 (needs dev1 B0c1 at 6), F3c0 8-9, B1c1 9-11 (dev1 B1c1 ends 9),
            F2c1 11-12, B0c0 12-14, F3c1 14-15, B1c0 15-17, idle 17-18, B2c1 18-20 (dev1 B2c1
            ends 18), idle 20-21, B3c1 21-23, B2c0 23-25, B3c0 25-27.
      dev1: idle 0-1, F0c0 1-2, F1c0 2-3, F0c1 3-4, B0c1 4-6, F1c1 6-7, B1c1 7-9, F2c0 9-10,
            B0c0 10-12, F3c0 12-13, B1c0 13-15, F2c1 15-16, B2c1 16-18, F3c1 18-19, B3c1 19-21,
            B2c0 21-23, B3c0 23-25, idle 25-27.
    Step 27 = m(t_f+t_b) + (p-1)(t_f+t_b)/v = 24 + 3; each device idles 3. Plain 1F1B on the same
    device times: (m+p-1)(t_f+t_b) = 30, bubble 6 = v x 3.
    """
    r = simulate("interleaved-1f1b", [1, 1, 1, 1], [2, 2, 2, 2], m=4, v=2)
    assert r.step_time_s == 27.0
    assert r.busy_s == (24.0, 24.0)
    assert r.bubble_s == 3.0
    dev0 = [(e.kind, e.microbatch, e.chunk, e.start_s, e.end_s) for e in r.events if e.device == 0]
    assert dev0[:6] == [("F", 0, 0, 0, 1), ("F", 1, 0, 1, 2), ("F", 0, 1, 2, 3), ("F", 1, 1, 3, 4),
                        ("F", 2, 0, 4, 5), ("B", 0, 1, 6, 8)]
    assert dev0[-3:] == [("B", 3, 1, 21, 23), ("B", 2, 0, 23, 25), ("B", 3, 0, 25, 27)]
    plain = simulate("1f1b", [2, 2], [4, 4], m=4)
    assert plain.step_time_s == 30.0
    assert plain.bubble_s == pytest.approx(2 * r.bubble_s)
    # activations: rank 0 peaks at warm-up + 1 = 5 chunk-activations = p + (p-1)/v = 2.5 micro-batches
    assert r.peak_inflight == (5, 3)
    assert inflight_microbatches("interleaved-1f1b", 2, 4, 0, 2) == 2.5


@pytest.mark.parametrize("p,v,m", [(2, 2, 2), (2, 2, 4), (4, 2, 4), (4, 2, 8), (4, 3, 8), (4, 4, 16),
                                   (3, 2, 9), (8, 2, 16)])
def test_interleaved_bubble_is_1f1b_over_v(p, v, m):
    tf, tb = 2.0 * v, 4.0 * v  # whole-device times; chunks get 2 and 4
    r = simulate("interleaved-1f1b", [tf / v] * (p * v), [tb / v] * (p * v), m, v=v)
    plain = simulate("1f1b", [tf] * p, [tb] * p, m)
    assert r.bubble_s == pytest.approx(plain.bubble_s / v)
    assert r.step_time_s == pytest.approx(m * (tf + tb) + bubble_time_closed("interleaved-1f1b", p, m, v,
                                                                              tf=tf, tb=tb))
    assert r.bubble_fraction == pytest.approx(bubble_fraction_closed("interleaved-1f1b", p, m, v))
    assert r.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))
    for i in range(p):
        assert r.peak_inflight[i] / v == pytest.approx(inflight_microbatches("interleaved-1f1b", p, m, i, v))


def test_interleaved_first_stage_korthikanti():
    # L(1 + (p-1)/(pv)) layers on the first stage = p + (p-1)/v micro-batches of L/p layers
    for p, v in [(2, 2), (4, 2), (4, 3), (8, 4)]:
        m = 4 * p
        n = inflight_microbatches("interleaved-1f1b", p, m, 0, v)
        assert n == pytest.approx(p * (1 + (p - 1) / (p * v)))


def test_interleaved_needs_at_least_p_microbatches():
    with pytest.raises(ValueError, match="at least as many micro-batches"):
        simulate("interleaved-1f1b", [1] * 8, [2] * 8, m=3, v=2)
    with pytest.raises(ValueError, match="at least as many micro-batches"):
        inflight_microbatches("interleaved-1f1b", 4, 3, 0, 2)
    with pytest.raises(ValueError):
        simulate("1f1b", [1] * 4, [2] * 4, m=4, v=2)  # v > 1 needs interleaving
    with pytest.raises(ValueError):
        simulate("pipedream", [1], [2], m=4)


@pytest.mark.parametrize("p,m", [(2, 2), (2, 5), (4, 4), (4, 8), (3, 7), (8, 16)])
@pytest.mark.parametrize("f,b,w", [(1, 1, 1), (2, 1, 1), (3, 2, 1), (2, 3, 2), (1, 2, 0.5), (4, 4, 1)])
def test_zb_h1_matches_qi_closed_form(p, m, f, b, w):
    """ZB-H1 bubble (p-1)(T_F+T_B-T_W) (Qi et al. Table 2) for m >= p and T_W <= min(T_F, T_B)."""
    r = simulate("zb-h1", [f] * p, [b + w] * p, m, wgrad_s=[w] * p)
    assert r.step_time_s == pytest.approx(m * (f + b + w) + (p - 1) * (f + b - w))
    assert r.bubble_s == pytest.approx(bubble_time_closed("zb-h1", p, m, tf=f, tb=b + w, tw=w))
    one = simulate("1f1b", [f] * p, [b + w] * p, m)
    assert r.bubble_s < one.bubble_s
    # memory as 1F1B: p - i activations in flight, i deferred W's (Qi et al. Table 2)
    assert r.peak_inflight == one.peak_inflight
    assert r.peak_pending_w == tuple(range(p))


def test_zb_h1_smaller_bubble_than_1f1b_uneven():
    fwd, bwd = [1.0, 2.0, 1.5, 1.0], [2.0, 4.0, 3.0, 2.5]
    for m in (4, 6, 12):
        zb = simulate("zb-h1", fwd, bwd, m)
        one = simulate("1f1b", fwd, bwd, m)
        assert zb.bubble_s < one.bubble_s
        assert zb.step_time_s < one.step_time_s
        assert zb.busy_s == pytest.approx(one.busy_s)


def test_zb_h1_default_split_and_checks():
    r = simulate("zb-h1", [1, 1], [2, 2], 4)
    ws = [e for e in r.events if e.kind == "W"]
    assert len(ws) == 8 and all(e.end_s - e.start_s == 1.0 for e in ws)
    with pytest.raises(ValueError):
        simulate("zb-h1", [1, 1], [2, 2], 4, wgrad_s=[3, 1])  # W longer than the backward
    with pytest.raises(ValueError):
        simulate("1f1b", [1, 1], [2, 2], 4, wgrad_s=[1, 1])


# ----------------------------------------------------------------------------------------------
# activations in flight

@pytest.mark.parametrize("p,m", PM)
def test_peak_inflight(p, m):
    one = simulate("1f1b", [1.0] * p, [2.0] * p, m)
    gp = simulate("gpipe", [1.0] * p, [2.0] * p, m)
    if m >= p:
        assert one.peak_inflight[0] == p
    assert one.peak_inflight == tuple(min(p - i, m) for i in range(p))
    assert one.peak_inflight == tuple(inflight_microbatches("1f1b", p, m, i) for i in range(p))
    assert gp.peak_inflight == (m,) * p
    assert inflight_microbatches("gpipe", p, m, 0) == m
    assert inflight_microbatches("zb-h1", p, m, 0) == inflight_microbatches("1f1b", p, m, 0)


# ----------------------------------------------------------------------------------------------
# uneven stages

def _longest_path(schedule, fwd, bwd, m, v=1, p2p=0.0, wgrad=None):
    """Brute force: enumerate every path of the op DAG (device order + cross-stage dependencies) and
    return the longest, summing op durations and p2p on cross-device edges. Exponential; tiny cases."""
    n = len(fwd)
    p = n // v
    orders = schedule_order(schedule, p, m, v)
    if schedule == "zb-h1":
        w = wgrad or [x / 2 for x in bwd]
        dur = {"F": fwd, "B": [b - x for b, x in zip(bwd, w)], "W": w}
    else:
        dur = {"F": fwd, "B": bwd}
    node_of = {}
    for d, order in enumerate(orders):
        for i, (kind, j, c) in enumerate(order):
            node_of[(kind, c * p + d, j)] = (d, i)
    preds = {}  # node -> [(pred node, edge weight)]
    for d, order in enumerate(orders):
        for i, (kind, j, c) in enumerate(order):
            k = c * p + d
            ps = [((d, i - 1), 0.0)] if i else []
            if kind == "F" and k > 0:
                dep = ("F", k - 1, j)
            elif kind == "B" and k < n - 1:
                dep = ("B", k + 1, j)
            elif kind == "B":
                dep = ("F", k, j)
            elif kind == "W":
                dep = ("B", k, j)
            else:
                dep = None
            if dep is not None:
                ps.append((node_of[dep], p2p if dep[1] % p != d else 0.0))
            preds[(d, i)] = ps

    def weight(node):
        d, i = node
        kind, _, c = orders[d][i]
        return dur[kind][c * p + d]

    def longest_to(node):  # no memo on purpose: every path is walked
        best = 0.0
        for pred, wgt in preds[node]:
            best = max(best, longest_to(pred) + wgt)
        return best + weight(node)

    return max(longest_to((d, len(o) - 1)) for d, o in enumerate(orders))


def test_uneven_1f1b_hand_solved_and_brute_force():
    """p=2, m=3, F=[1,2], B=[2,4]. Rank 0 order F0 F1 B0 F2 B1 B2, rank 1 F0 B0 F1 B1 F2 B2.
      dev0: F0 0-1, F1 1-2, B0 7-9 (waits for dev1 B0), F2 9-10, B1 13-15, B2 19-21
      dev1: F0 1-3, B0 3-7, F1 7-9, B1 9-13, F2 13-15, B2 15-19
    Step 21: rank 1 is the bottleneck (6 per micro-batch), 21 = (m-1)*6 + (3 + 6)."""
    r = simulate("1f1b", [1, 2], [2, 4], 3)
    assert r.step_time_s == 21.0
    assert r.step_time_s == _longest_path("1f1b", [1, 2], [2, 4], 3)
    dev0 = [(e.kind, e.microbatch, e.start_s, e.end_s) for e in r.events if e.device == 0]
    assert dev0 == [("F", 0, 0, 1), ("F", 1, 1, 2), ("B", 0, 7, 9), ("F", 2, 9, 10), ("B", 1, 13, 15),
                    ("B", 2, 19, 21)]
    assert r.busy_s == (9.0, 18.0)
    assert r.bubble_s == 3.0


@pytest.mark.parametrize("schedule,fwd,bwd,m,v,p2p", [
    ("1f1b", [1.0, 2.5, 0.5], [2.0, 3.0, 1.5], 4, 1, 0.25),
    ("gpipe", [1.0, 2.5, 0.5], [2.0, 3.0, 1.5], 3, 1, 0.5),
    ("zb-h1", [1.0, 2.5, 0.5], [2.0, 3.0, 1.5], 4, 1, 0.25),
    ("interleaved-1f1b", [1.0, 0.5, 2.0, 0.75], [2.0, 1.0, 3.0, 1.5], 2, 2, 0.125),
])
def test_uneven_simulation_equals_brute_force(schedule, fwd, bwd, m, v, p2p):
    r = simulate(schedule, fwd, bwd, m, v=v, p2p_s=p2p)
    assert r.step_time_s == pytest.approx(_longest_path(schedule, fwd, bwd, m, v, p2p))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["gpipe", "1f1b", "zb-h1"]), st.integers(1, 4), st.integers(1, 6), st.data())
def test_lower_bounds_uneven(schedule, p, m, data):
    """Valid for every schedule: stage k cannot start before micro-batch 0 has crossed stages < k,
    then runs m(F_k+B_k) of work, then micro-batch m-1's gradient still has to cross stages < k.
    One micro-batch's round trip: sum of all stages + 2(p-1) hops. Under zb-h1 only the input-grad
    part B_in = B - W is on the backward chain (W may run after it), so the bounds use B_in there."""
    times = st.floats(0.1, 5.0, allow_nan=False)
    fwd = data.draw(st.lists(times, min_size=p, max_size=p))
    bwd = data.draw(st.lists(times, min_size=p, max_size=p))
    c = data.draw(st.floats(0.0, 1.0))
    r = simulate(schedule, fwd, bwd, m, p2p_s=c)
    t = [f + b for f, b in zip(fwd, bwd)]
    chain_b = [b / 2 for b in bwd] if schedule == "zb-h1" else bwd  # default W = B/2
    eps = 1e-9 * (1 + r.step_time_s)
    for k in range(p):
        assert r.step_time_s >= sum(fwd[:k]) + k * c + m * t[k] - eps
        assert r.step_time_s >= (sum(fwd[:k]) + m * (fwd[k] + chain_b[k]) + sum(chain_b[:k])
                                 + 2 * k * c - eps)
    assert r.step_time_s >= sum(fwd) + sum(chain_b) + 2 * (p - 1) * c - eps
    if schedule == "gpipe" or (schedule == "1f1b" and max(t) == t[-1]):
        # the Metis/AMP form (m-1) max t + sum t is a lower bound for GPipe, and for 1F1B when the
        # last stage is the slowest (see the counterexample below)
        assert r.step_time_s >= (m - 1) * max(t) + sum(t) - eps


def test_metis_bound_is_not_a_1f1b_lower_bound():
    """(m-1)*max + sum fails for 1F1B when an early stage is the bottleneck: F=[2,.5], B=[4,.5], m=3
    gives 19 but 1F1B finishes at 18 (rank 0 never idles after its second forward: 3*6 = 18)."""
    fwd, bwd, m = [2.0, 0.5], [4.0, 0.5], 3
    r = simulate("1f1b", fwd, bwd, m)
    assert r.step_time_s == 18.0 == _longest_path("1f1b", fwd, bwd, m)
    assert (m - 1) * 6 + 7 == 19
    assert simulate("gpipe", fwd, bwd, m).step_time_s >= 19


# ----------------------------------------------------------------------------------------------
# properties

@st.composite
def _case(draw):
    schedule = draw(st.sampled_from(["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"]))
    p = draw(st.integers(1, 4))
    if schedule == "interleaved-1f1b":
        v = draw(st.integers(1, 3))
        m = p * draw(st.integers(1, 3))
    else:
        v = 1
        m = draw(st.integers(1, 7))
    n = p * v
    times = st.floats(0.05, 4.0, allow_nan=False)
    fwd = draw(st.lists(times, min_size=n, max_size=n))
    bwd = draw(st.lists(times, min_size=n, max_size=n))
    return schedule, p, v, m, fwd, bwd


@settings(max_examples=80, deadline=None)
@given(_case(), st.data())
def test_makespan_monotone_in_stage_times(case, data):
    schedule, p, v, m, fwd, bwd = case
    c = data.draw(st.floats(0.0, 0.5))
    base = simulate(schedule, fwd, bwd, m, v=v, p2p_s=c)
    k = data.draw(st.integers(0, p * v - 1))
    extra = data.draw(st.floats(0.0, 3.0))
    which = data.draw(st.sampled_from(["fwd", "bwd"]))
    f2, b2 = list(fwd), list(bwd)
    (f2 if which == "fwd" else b2)[k] += extra
    slower = simulate(schedule, f2, b2, m, v=v, p2p_s=c)
    assert slower.step_time_s >= base.step_time_s - 1e-9 * (1 + base.step_time_s)


@settings(max_examples=80, deadline=None)
@given(_case(), st.floats(0.001, 1.0))
def test_p2p_time_adds(case, c):
    schedule, p, v, m, fwd, bwd = case
    base = simulate(schedule, fwd, bwd, m, v=v)
    with_c = simulate(schedule, fwd, bwd, m, v=v, p2p_s=c)
    more = simulate(schedule, fwd, bwd, m, v=v, p2p_s=2 * c)
    hops = (p * v - 1) if p > 1 else 0  # device boundaries one micro-batch crosses each way
    eps = 1e-9 * (1 + more.step_time_s)
    assert base.step_time_s - eps <= with_c.step_time_s <= more.step_time_s + eps
    # one micro-batch's forward and (input-grad) backward chain pays every hop
    chain_b = [b / 2 for b in bwd] if schedule == "zb-h1" else bwd
    assert with_c.step_time_s >= sum(fwd) + sum(chain_b) + 2 * hops * c - eps
    if p == 1:
        assert with_c.step_time_s == pytest.approx(base.step_time_s)
    assert with_c.busy_s == pytest.approx(base.busy_s)  # p2p is not compute


@pytest.mark.parametrize("p,m", [(2, 3), (4, 8), (4, 2)])
def test_p2p_adds_round_trip_equal_stages(p, m):
    """GPipe with equal stages: the p2p hops just shift the pipeline, (m+p-1)(t_f+t_b) + 2(p-1)c.
    1F1B pays at least that; its steady state has no slack, so it can pay more."""
    r = simulate("gpipe", [1.0] * p, [2.0] * p, m, p2p_s=0.25)
    assert r.step_time_s == (m + p - 1) * 3.0 + 2 * (p - 1) * 0.25
    one = simulate("1f1b", [1.0] * p, [2.0] * p, m, p2p_s=0.25)
    assert one.step_time_s >= (m + p - 1) * 3.0 + 2 * (p - 1) * 0.25


@settings(max_examples=60, deadline=None)
@given(_case())
def test_events_are_consistent(case):
    schedule, p, v, m, fwd, bwd = case
    r = simulate(schedule, fwd, bwd, m, v=v)
    kinds = "FBW" if schedule == "zb-h1" else "FB"
    assert len(r.events) == len(kinds) * m * p * v
    assert all(isinstance(e, PipelineEvent) and len(e) == 6 for e in r.events)
    for d in range(p):
        evs = [e for e in r.events if e.device == d]
        for a, b in zip(evs, evs[1:]):
            assert b.start_s >= a.end_s - 1e-12  # one op at a time per device
        assert sum(e.end_s - e.start_s for e in evs) == pytest.approx(r.busy_s[d])
    ends = {(e.kind, e.chunk * p + e.device, e.microbatch): e.end_s for e in r.events}
    for e in r.events:
        k = e.chunk * p + e.device
        if e.kind == "F" and k > 0:
            assert e.start_s >= ends[("F", k - 1, e.microbatch)] - 1e-12
        if e.kind == "B":
            dep = ("B", k + 1, e.microbatch) if k < p * v - 1 else ("F", k, e.microbatch)
            assert e.start_s >= ends[dep] - 1e-12
    assert max(e.end_s for e in r.events) == r.step_time_s
    assert r.bubble_s == pytest.approx(r.step_time_s - max(r.busy_s))
    assert 0.0 <= r.bubble_fraction < 1.0
    assert r.idle_s == pytest.approx(tuple(r.step_time_s - b for b in r.busy_s))


def test_input_validation():
    with pytest.raises(ValueError):
        simulate("1f1b", [1, 2], [1], 4)
    with pytest.raises(ValueError):
        simulate("1f1b", [1, -2], [1, 1], 4)
    with pytest.raises(ValueError):
        simulate("1f1b", [1, 2], [1, 1], 0)
    with pytest.raises(ValueError):
        simulate("interleaved-1f1b", [1, 2, 3], [1, 1, 1], 4, v=2)
    with pytest.raises(ValueError):
        inflight_microbatches("1f1b", 4, 8, stage=4)
