"""The fast paths of the cost model equal the reference paths they replace, bit for bit.

pipeline.simulate_times (compiled op order, no events) against pipeline.simulate, on random uneven stage
times and p2p, every schedule; estimate()'s cached structures against a fresh evaluation on a copy of the
model and cluster (new objects, so nothing is served from a cache built for the originals); estimate_batch's
per-(model, cluster, workload) memo (layer columns, count groups, makespans) against fresh calls; the parts of
memory.model_state_bytes that estimate_batch takes from model_state_parts.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from planner.catalog import load_cluster
from planner.core.plan import Workload
from planner.cost import batch, batch_context, memory, pipeline
from planner.cost.pipeline import SCHEDULES, simulate, simulate_times
from planner.importers import load_model


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
        simulate_times("interleaved-1f1b", [1.0] * 4, [1.0] * 4, 1, v=2)  # fewer micro-batches than stages
    with pytest.raises(ValueError):
        simulate_times("1f1b", [1.0, -1.0], [1.0, 1.0], 2)
    with pytest.raises(ValueError):
        simulate_times("nope", [1.0], [1.0], 1)
    assert pipeline._compiled.cache_info().maxsize > 0


def _plan_arrays(model, n: int, gbs: int, count: int, seed: int) -> batch.PlanArrays:
    """Random valid plans (every schedule, ZeRO stage, recompute policy; ep for MoE; activation offload)."""
    rng = np.random.default_rng(seed)
    experts = [layer.experts for layer in model.layers if layer.kind == "moe"]
    rows = []
    while len(rows) < count:
        tp, cp = int(rng.choice([1, 2, 4, 8])), int(rng.choice([1, 2]))
        if n % (tp * cp):
            continue
        rest = n // (tp * cp)
        pp = int(rng.choice([d for d in range(1, rest + 1) if rest % d == 0 and d <= model.num_blocks]))
        dp = rest // pp
        ep, etp, ts = 1, 0, False
        if experts:
            ep = int(rng.choice([d for d in range(1, dp * cp + 1) if (dp * cp) % d == 0 and experts[0] % d == 0]))
            etp = int(rng.choice([0, 1]))
            if tp > 1 and experts[0] % tp == 0 and rng.random() < .25:
                ep, etp, ts = tp, 1, True  # moe_dispatch tp_slice (Pipeline MoE)
            if (dp * cp * tp) % (ep * (etp or tp)):
                continue
        sch, mbs = int(rng.integers(0, 4)), int(rng.choice([1, 2, 4]))
        if gbs % (mbs * dp):
            continue
        vpp, nmb = 1, 0
        if batch.SCHEDULES[sch] == "interleaved-1f1b":
            vpp = int(rng.choice([1, 2]))
            if pp * vpp > model.num_blocks:
                continue
            nmb = pp * int(rng.integers(1, 4))
        rc = int(rng.integers(0, 3))
        rows.append(dict(dp=dp, tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, sp=tp > 1 and rng.random() < .5,
                         zero=int(rng.integers(0, 4)), mbs=mbs, num_microbatches=nmb, recompute=rc,
                         recompute_num_layers=int(rng.choice([-1, 1, 2])) if rc == 2 else -1, schedule=sch,
                         flash_attention=rng.random() < .7, overlap_grad_reduce=rng.random() < .5,
                         overlap_tp_comm=rng.random() < .5, offload_optimizer=0.0,
                         offload_activations=float(rng.choice([0.0, 0.0, 0.0, 0.5])), moe_tp_slice=ts))
    return batch.PlanArrays(**{k: np.array([r[k] for r in rows]) for k in rows[0]})


@pytest.mark.parametrize("name,nodes", [("llama3-8b", 2), ("mixtral-8x7b", 1)])
def test_batch_memo_equals_fresh_calls(name, nodes):
    """Calls that reuse estimate_batch's memo (a second batch bringing new layer tuples and groups, then the
    first again) give what a call on an empty memo gives: the same floats up to the last bits of a matmul
    over more columns, `fits` exactly."""
    model, cluster = load_model(name), load_cluster("dgx-h100", nodes=nodes)
    workload = Workload(global_batch=64, seq_len=1024)
    a, b = (_plan_arrays(model, cluster.device_count, 64, 150, seed) for seed in (1, 2))
    batch_context.forget(cluster)
    fresh = []
    for pa in (a, b):
        batch_context.forget(cluster)
        fresh.append(batch.estimate_batch(model, cluster, workload, pa))
    batch_context.forget(cluster)
    got = [batch.estimate_batch(model, cluster, workload, pa) for pa in (a.take(np.arange(40)), b, a)]
    for want, have in ((fresh[1], got[1]), (fresh[0], got[2])):
        for k in batch.OUTPUTS:
            if k == "fits":
                np.testing.assert_array_equal(have[k], want[k])
            else:
                np.testing.assert_allclose(have[k], want[k], rtol=1e-12, atol=0, err_msg=k)


def test_model_state_parts_are_model_state_bytes():
    params = np.array([[1.5e9, 3.0e8], [7.0e7, 2.0]])
    dp = np.array([8, 3])
    for zero in range(4):
        for p, d in ((params, dp), (123456789, 7), (2.5e8, 16.0)):
            # the formulas as model_state_bytes wrote them before model_state_parts (always dividing)
            want = (p * 2 / (d if zero >= 3 else 1), p * 4 / (d if zero >= 2 else 1), p * 12 / (d if zero >= 1 else 1))
            full = memory.model_state_bytes(p, d, zero, weight_dtype_bytes=2, grad_dtype_bytes=4)
            got = memory.model_state_parts(p, d, zero, weight_dtype_bytes=2, grad_dtype_bytes=4)
            for k, x, w in zip(("weights", "gradients", "optimizer"), got, want):
                np.testing.assert_array_equal(x, w)
                np.testing.assert_array_equal(full[k], w)
                assert type(x) is type(w) and type(full[k]) is type(w)
