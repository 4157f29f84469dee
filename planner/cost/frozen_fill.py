"""Frozen work in pipeline bubbles: DiffusionPipe's bubble filling (Tian et al., MLSys 2024, "DiffusionPipe:
Training Large Diffusion Models with Efficient Pipelines").

A diffusion model's frozen parts (text encoders, the VAE encoder) run forward only, and their outputs do
not depend on the trainable weights, so the conditioning of the *next* step's samples can be computed
whenever a device is idle. Without filling (the plain plan) they sit on the first chunk and add to stage 0's
forward of every work item (chunks.split_chunks). With ParallelPlan.fill_frozen:

  1. the backbone's pipeline is timed without the frozen forward (chunk 0's forward minus it);
  2. the idle slots of every stage in that timeline (warm-up, cool-down and any gap between ops; one slot of
     step - busy per stage for a schedule that never flushes) take the frozen forward of the step's samples,
     greedily in time order, whole samples only (DiffusionPipe's partial batches: a micro-batch's frozen
     work may split over several slots, a sample may not);
  3. what does not fit is exposed: it runs before the pipeline, split over the pp stages (each stage holds
     the frozen weights to fill with), and adds ceil(left / pp) samples' forward to the step.

Every stage then holds a copy of the frozen weights (memory: estimate._stage_memory). Not charged: sending
the frozen outputs to stage 0 (a text embedding is ~1 MB per sample, off the compute stream as every p2p
send in pipeline.py) and buffering one step's outputs. Pure functions over the pipeline's timeline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from planner.core.dims import RECOMPUTE_POLICIES
from planner.core.errors import BadInput
from planner.core.plan import ParallelPlan
from planner.cost import pipeline
from planner.cost.chunks import chunks_of, policies, shape_index
from planner.cost.schedules import get_schedule


@dataclass(frozen=True)
class FrozenFill:
    """What filling placed: seconds of frozen forward run in the bubbles (summed over stages) and left
    exposed on the step, the samples of each, and the backbone pipeline's own timing."""

    filled_s: float
    exposed_s: float
    filled_samples: int
    exposed_samples: int
    backbone: pipeline.PipelineResult | None  # the pipeline without frozen work (its step excludes exposed_s)
    backbone_fwd_s: tuple = ()  # per chunk, one item's forward without the frozen layers


def frozen_counts(model, plan: ParallelPlan) -> np.ndarray:
    """Counts of the frozen layers by (shape, recompute policy), flattened as chunks.layer_counts' K rows
    (shapes x 3): every frozen layer sits on the first chunk. Cached per model."""
    rc = RECOMPUTE_POLICIES.index(plan.recompute)
    rnl = -1 if plan.recompute_num_layers is None else plan.recompute_num_layers
    part = None if plan.partition is None else tuple(tuple(a.layers) for a in plan.partition)
    key = ("frozen_counts", plan.pp, plan.vpp, rc, rnl, part)
    cache = model._cost_cache
    hit = cache.get(key)
    if hit is None:
        shape_of, shapes = shape_index(model)
        out = np.zeros((len(shapes), 3))
        first = list(chunks_of(model, plan.pp, plan.vpp, part)[0])
        pol = policies(first, plan)
        for layer in first:
            if not layer.trainable:
                out[shape_of[layer.shape_key], RECOMPUTE_POLICIES.index(pol[layer.name])] += 1
        hit = cache[key] = out.ravel()
    return hit


def frozen_item_s(counts: np.ndarray, lv_fwd: np.ndarray, col: int) -> float:
    """One work item's frozen forward seconds on a stage: the counts against that stage's per-layer forward
    values (batch_context's lv["fwd"], shapes x policies x columns) at the plan's column."""
    S = lv_fwd.shape[0]
    return float(counts @ lv_fwd.reshape(S * 3, -1)[:, col])


def idle_slots(pipe: pipeline.PipelineResult) -> list[tuple[float, int, float]]:
    """(start s, stage, length s) of every idle interval of each stage in one step, in time order: before
    its first op, between ops, after its last. A schedule that never flushes has no per-op timeline of its
    steady step: each stage's step - busy is one slot."""
    if get_schedule(pipe.schedule).steady_state:
        return sorted((0.0, d, idle) for d, idle in enumerate(pipe.idle_s) if idle > 0)
    slots, last = [], [0.0] * pipe.p
    for ev in sorted(pipe.events, key=lambda e: (e.device, e.start_s)):
        if ev.start_s > last[ev.device]:
            slots.append((last[ev.device], ev.device, ev.start_s - last[ev.device]))
        last[ev.device] = max(last[ev.device], ev.end_s)
    slots += [(t, d, pipe.step_time_s - t) for d, t in enumerate(last) if pipe.step_time_s > t]
    return sorted(slots)


def fill(schedule: str, fwd_s: list, bwd_s: list, m: int, v: int, p2p_s: float, frozen_s: list, samples: int,
         seq_chunks: int = 1) -> FrozenFill:
    """Fill the frozen forward of `samples` samples into the bubbles of the backbone pipeline.

    fwd_s, bwd_s: per chunk, one work item's seconds with the frozen forward still on chunk 0 (as the plain
    plan times them); frozen_s: per stage, one item's frozen forward seconds; samples: the step's samples per
    pipeline (micro-batches x mbs), each costing frozen_s[stage] * m / samples on that stage."""
    if seq_chunks > 1:
        raise BadInput("fill_frozen with seq_chunks > 1 is not modelled (frozen encoders run once per sample, not "
                       "per sequence chunk); use seq_chunks 1 or drop --fill-frozen")
    backbone_fwd = list(fwd_s)
    backbone_fwd[0] = max(0.0, backbone_fwd[0] - frozen_s[0])
    pipe = pipeline.simulate(schedule, backbone_fwd, bwd_s, m, v=v, p2p_s=p2p_s)
    per_sample = [f * m / samples for f in frozen_s]  # one sample's frozen forward on each stage
    left, filled_s = samples, 0.0
    if min(per_sample) > 0:
        for _, stage, length in idle_slots(pipe):
            if left == 0:
                break
            k = min(left, int(length / per_sample[stage] * (1 + 1e-12)))  # whole samples; float-safe
            left -= k
            filled_s += k * per_sample[stage]
    else:  # no frozen work
        left = 0
    exposed_s = math.ceil(left / pipe.p) * max(per_sample) if left else 0.0
    return FrozenFill(filled_s=filled_s, exposed_s=exposed_s, filled_samples=samples - left, exposed_samples=left,
                      backbone=pipe, backbone_fwd_s=tuple(backbone_fwd))


def filled_pipeline(f: FrozenFill) -> pipeline.PipelineResult:
    """The backbone's timing with the exposed frozen work added to the step (before the pipeline starts):
    what estimate() reads as the pipeline phase of a filled plan."""
    pipe = f.backbone
    step = pipe.step_time_s + f.exposed_s
    bubble = step - max(pipe.busy_s)
    return replace(pipe, step_time_s=step, idle_s=tuple(step - b for b in pipe.busy_s), bubble_s=bubble,
                   bubble_fraction=bubble / step if step > 0 else 0.0, events=())


def replicated_frozen_bytes(froz_st: np.ndarray) -> np.ndarray:
    """Per stage frozen weight bytes when every stage holds a copy to fill with: each stage the most any
    stage holds (the first, where the frozen layers sit). froz_st: (rows, stages)."""
    return np.broadcast_to(froz_st.max(axis=-1, keepdims=True), froz_st.shape).copy()


def fill_plan(one, fwd_s: list, bwd_s: list, p2p_s: float) -> FrozenFill | None:
    """estimate()'s fill of one plan (estimate._OnePlan `one`, its chunk times and p2p): None where the plan
    leaves fill_frozen off or the model has no frozen layers; with pp = 1 there are no bubbles, so the frozen
    forward stays where the plain plan has it and counts as exposed."""
    plan = one.plan
    if not plan.fill_frozen:
        return None
    counts = frozen_counts(one.model, plan)
    if not counts.any():
        return None
    frozen_s = [frozen_item_s(counts, st.ctx.lv["fwd"], st.col) for st in one.stages]
    samples = one.microbatches * plan.mbs
    if plan.pp == 1:
        return FrozenFill(filled_s=0.0, exposed_s=one.items * frozen_s[0], filled_samples=0, exposed_samples=samples,
                          backbone=None)
    return fill(plan.schedule, fwd_s, bwd_s, one.microbatches, plan.vpp, p2p_s, frozen_s, samples, plan.seq_chunks)


def breakdown(f: FrozenFill) -> dict:
    """The breakdown lines of a filled plan: frozen forward seconds in the bubbles (summed over stages) and
    on the step."""
    return {"frozen_filled_s": f.filled_s, "frozen_exposed_s": f.exposed_s}


def why(f: FrozenFill) -> str:
    """One clause for the explanation."""
    return (f"; frozen encoders' forward in the pipeline bubbles (DiffusionPipe): {f.filled_samples} sample(s), "
            f"{f.filled_s:.3g} s filled over the stages, {f.exposed_samples} left exposed ({f.exposed_s:.3g} s on "
            "the step)")
