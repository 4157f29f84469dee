"""Frozen encoders' forward filled into the backbone's pipeline bubbles (planner/cost/frozen_fill.py,
DiffusionPipe): the greedy fill against a timeline worked by hand, the pp=4 diffusion plan against its plain
twin, estimate_batch against estimate, memory, and the CLI flags."""
from __future__ import annotations

import json

import numpy as np
import pytest

from planner import catalog
from planner.core.errors import BadInput
from planner.core.plan import ParallelPlan, Workload
from planner.cost import frozen_fill, pipeline
from planner.cost.batch import estimate_batch
from planner.cost.batch_plans import PlanArrays
from planner.cost.estimate import estimate
from planner.importers import load_model


# 1F1B, p = 2, m = 2, backbone F = 1 s and B = 2 s on both stages, no p2p. By hand:
#   stage 0: F0 [0,1] F1 [1,2] (idle 2-4) B0 [4,6] (idle 6-7) B1 [7,9]
#   stage 1: (idle 0-1) F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7] (idle 7-9)
# step 9 s; idle slots (start, stage, length): (0,1,1) (2,0,2) (6,0,1) (7,1,2).
def test_idle_slots_of_a_hand_timeline():
    pipe = pipeline.simulate("1f1b", [1.0, 1.0], [2.0, 2.0], 2)
    assert pipe.step_time_s == 9.0
    assert frozen_fill.idle_slots(pipe) == [(0.0, 1, 1.0), (2.0, 0, 2.0), (6.0, 0, 1.0), (7.0, 1, 2.0)]


def test_fill_everything_that_fits():
    # 0.5 s of frozen forward per item (one sample each) on chunk 0: both samples fit the first slot
    f = frozen_fill.fill("1f1b", [1.5, 1.0], [2.0, 2.0], 2, 1, 0.0, [0.5, 0.5], 2)
    assert (f.filled_samples, f.exposed_samples, f.filled_s, f.exposed_s) == (2, 0, 1.0, 0.0)
    assert f.backbone.step_time_s == 9.0  # the frozen forward left chunk 0
    assert pipeline.simulate("1f1b", [1.5, 1.0], [2.0, 2.0], 2).step_time_s == 9.5  # the plain plan


def test_partial_batches_split_over_slots():
    # 2 samples per item, 0.5 s each: slot (0,1,1) takes 2 samples, slot (2,0,2) the other 2
    f = frozen_fill.fill("1f1b", [2.0, 1.0], [2.0, 2.0], 2, 1, 0.0, [1.0, 1.0], 4)
    assert (f.filled_samples, f.filled_s, f.exposed_s) == (4, 2.0, 0.0)


def test_a_sample_longer_than_every_slot_stays_exposed():
    # 2.5 s per sample > the longest slot (2 s): nothing fills; 2 samples over 2 stages: one each, 2.5 s
    f = frozen_fill.fill("1f1b", [3.5, 1.0], [2.0, 2.0], 2, 1, 0.0, [2.5, 2.5], 2)
    assert (f.filled_samples, f.exposed_samples, f.filled_s, f.exposed_s) == (0, 2, 0.0, 2.5)
    assert frozen_fill.filled_pipeline(f).step_time_s == 9.0 + 2.5


@pytest.fixture(scope="module")
def diffusion():
    return (load_model("pixart-alpha-512"), catalog.load_cluster("dgx-h100", 1),
            Workload(global_batch=256, seq_len=1024))


def test_pp4_fill_beats_its_plain_twin(diffusion):
    model, cluster, w = diffusion
    plain = estimate(model, cluster, w, ParallelPlan(pp=4, dp=2, mbs=8))
    filled = estimate(model, cluster, w, ParallelPlan(pp=4, dp=2, mbs=8, fill_frozen=True))
    assert "frozen_filled_s" not in plain.breakdown  # the plain plan's output is as before
    assert filled.breakdown["frozen_filled_s"] > 0
    assert filled.step_time_s < plain.step_time_s
    # the filled seconds fit in the backbone's idle time, and the step is the backbone's plus what is exposed
    counts = frozen_fill.frozen_counts(model, ParallelPlan(pp=4, dp=2, mbs=8))
    assert counts.sum() == sum(not layer.trainable for layer in model.layers)
    assert filled.stages[0]["fwd_s"] < plain.stages[0]["fwd_s"]
    assert filled.stages[1]["fwd_s"] == pytest.approx(plain.stages[1]["fwd_s"], rel=1e-12)


def test_no_frozen_layers_or_no_pipeline(diffusion):
    model, cluster, w = diffusion
    llm = load_model("tiny-llama-20m")
    a = estimate(llm, cluster, w, ParallelPlan(pp=4, dp=2, mbs=8))
    b = estimate(llm, cluster, w, ParallelPlan(pp=4, dp=2, mbs=8, fill_frozen=True))
    assert a.step_time_s == b.step_time_s and "frozen_filled_s" not in b.breakdown
    one = estimate(model, cluster, w, ParallelPlan(dp=8, mbs=8, fill_frozen=True))  # pp 1: no bubbles
    assert one.step_time_s == estimate(model, cluster, w, ParallelPlan(dp=8, mbs=8)).step_time_s
    assert one.breakdown["frozen_filled_s"] == 0 and one.breakdown["frozen_exposed_s"] > 0


def test_every_stage_holds_the_frozen_weights(diffusion):
    model, cluster, w = diffusion
    plain = estimate(model, cluster, w, ParallelPlan(pp=4, dp=2, mbs=8))
    filled = estimate(model, cluster, w, ParallelPlan(pp=4, dp=2, mbs=8, fill_frozen=True))
    t5 = sum(layer.params() for layer in model.layers if not layer.trainable and layer.kind != "vae")
    grown = filled.stages[3]["weights_bytes"] - plain.stages[3]["weights_bytes"]
    assert grown > 2 * t5 * 0.99  # bf16 copy of the frozen T5 encoder at least
    assert filled.stages[0]["weights_bytes"] == plain.stages[0]["weights_bytes"]


def test_batch_agrees_with_estimate(diffusion):
    model, cluster, w = diffusion
    plans = [ParallelPlan(pp=4, dp=2, mbs=m, fill_frozen=f) for m in (4, 8) for f in (False, True)]
    for given in (plans, PlanArrays.from_plans(plans)):
        out = estimate_batch(model, cluster, w, given)
        ref = [estimate(model, cluster, w, p) for p in plans]
        assert np.allclose(out["step_time_s"], [e.step_time_s for e in ref], rtol=1e-9)
        assert np.allclose(out["peak_memory_bytes"], [e.peak_memory_bytes for e in ref], rtol=1e-9)
    assert out["step_time_s"][1] < out["step_time_s"][0]


def test_seq_chunks_refused(diffusion):
    model, cluster, w = diffusion
    with pytest.raises(BadInput, match="seq_chunks"):
        estimate(model, cluster, w, ParallelPlan(pp=4, dp=2, mbs=8, seq_chunks=2,
                                                 fill_frozen=True))


def test_cli_flags(capsys):
    from planner.app.cli import main

    argv = ["estimate", "--model", "pixart-alpha-512", "--cluster", "dgx-h100", "--pp", "4", "--mbs", "8", "--gbs",
            "256", "--seq", "1024", "--json"]
    steps = {}
    for flag in ("--no-fill-frozen", "--fill-frozen"):
        assert main(argv + [flag]) in (0, None)
        out = json.loads(capsys.readouterr().out)
        assert out["plan"]["fill_frozen"] == (flag == "--fill-frozen")
        steps[flag] = out["step_time_s"]
    assert out["breakdown"]["frozen_filled_s"] > 0
    assert steps["--fill-frozen"] < steps["--no-fill-frozen"]
