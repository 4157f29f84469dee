"""The schedule registry: plan name -> PipelineScheduleSpec instance (torch.distributed.pipelining's
get_schedule_class, for this cost model)."""
from __future__ import annotations

from planner.core.dims import SCHEDULES

REGISTRY: dict = {}


def register(cls: type) -> type:
    """Class decorator: register one instance of a schedule under its name, which planner/core/dims.py
    must declare (that is where ParallelPlan reads which schedules exist and what they allow)."""
    if cls.name not in SCHEDULES:
        raise RuntimeError(f"schedule {cls.name!r} is not declared in planner/core/dims.py SCHEDULE_RULES")
    REGISTRY[cls.name] = cls()
    return cls


def get_schedule(name: str):
    """The registered schedule called `name` (ValueError for an unknown one)."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {SCHEDULES}")
    return spec
