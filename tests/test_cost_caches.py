"""The cost model's caches live on the objects they describe (the model, the cluster): a copy of a cluster
with other efficiencies must not reuse its original's cached values, and the caches go when the objects go."""
from __future__ import annotations

import gc
import weakref

from planner.catalog import load_cluster
from planner.core.plan import ParallelPlan, Workload
from planner.cost import batch_context
from planner.cost.batch import estimate_batch
from planner.cost.estimate import estimate
from planner.importers import load_model

W = Workload(global_batch=32, seq_len=4096)
PLAN = ParallelPlan(dp=8, mbs=1, zero=1)


def test_a_copy_with_other_efficiencies_is_priced_afresh():
    m = load_model("llama3-8b")
    c = load_cluster("dgx-h100", 1)
    before = estimate(m, c, W, PLAN).step_time_s  # fills c's cache
    slow = c.with_efficiency(matmul=0.3)
    fresh = load_cluster("dgx-h100", 1).with_efficiency(matmul=0.3)
    assert estimate(m, slow, W, PLAN).step_time_s == estimate(m, fresh, W, PLAN).step_time_s > 1.5 * before
    assert estimate_batch(m, slow, W, [PLAN])["step_time_s"][0] == estimate(m, fresh, W, PLAN).step_time_s
    assert estimate(m, c, W, PLAN).step_time_s == before  # the original keeps its own


def test_a_model_copy_does_not_share_its_originals_chunk_split():
    m = load_model("tiny-llama-20m")
    c = load_cluster("dgx-h100", 1)
    plan = ParallelPlan(dp=4, pp=2, mbs=1)
    full = estimate(m, c, Workload(global_batch=16, seq_len=512), plan)
    fewer = m.model_copy(update={"layers": [x for x in m.layers if x.block != max(
        y.block for y in m.layers if y.block is not None)]})
    fewer = fewer.model_copy(update={"edges": [(a, b) for a, b in _chain(fewer)]})
    small = estimate(fewer, c, Workload(global_batch=16, seq_len=512), plan)
    assert small.step_time_s < full.step_time_s


def _chain(model):
    names = [x.name for x in model.layers]
    return list(zip(names, names[1:]))


def test_contexts_are_freed_with_their_cluster():
    m = load_model("tiny-llama-20m")
    c = load_cluster("dgx-h100", 1)
    estimate(m, c, Workload(global_batch=16, seq_len=512), ParallelPlan(dp=8, mbs=1))
    store = batch_context._store(c)
    ctx = next(v for k, v in store.items() if k != "owner")
    ref = weakref.ref(ctx)
    del c, store, ctx
    gc.collect()
    assert ref() is None
