"""Pipeline schedules, one module each, registered by name (registry.py). To add a schedule: declare its
plan-level rules in planner/core/dims.py, write its module here (a PipelineScheduleSpec subclass under
@register) and import it below."""
from __future__ import annotations

from planner.core.dims import SCHEDULES
from planner.cost.schedules import async_1f1b, gpipe, interleaved, one_f_one_b, zb_h1  # noqa: F401  (registers)
from planner.cost.schedules.base import PipelineScheduleSpec, backward_items
from planner.cost.schedules.interleaved import interleaved_warmup
from planner.cost.schedules.registry import REGISTRY, get_schedule

if set(REGISTRY) != set(SCHEDULES):  # every declared schedule needs its module, and no module goes unnamed
    raise RuntimeError(f"schedules declared in planner/core/dims.py {SCHEDULES} but registered {tuple(REGISTRY)}")

__all__ = ["PipelineScheduleSpec", "SCHEDULES", "backward_items", "get_schedule", "interleaved_warmup"]
