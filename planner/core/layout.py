"""Which devices form each parallel group of a plan: one RankLayout for every stage's groups.

A plan splits its devices into pp stages of tp * cp * dp ranks. Inside a stage the ranks follow Megatron's
order (parallel_state.RankGenerator, order "tp-cp-ep-dp-pp"; core/dims.py RANK_ORDER): tp varies fastest,
then cp, then dp; stage st holds global ranks st * S .. (st + 1) * S - 1. The MoE layers refold the same S
ranks as etp fastest, then ep, then the expert data-parallel group edp (core/dims.py EXPERT_RANK_ORDER; MoE
Parallel Folding, Liu et al. 2025). Rank r runs on device r unless the plan places its stages on devices of
its own (StageAssignment.devices / device_type), or the cluster mixes device types: then `stages` lists each
stage's devices in rank order and a group is read off its stage's list. Data only: no timing here (the links
of these groups are cost/links.py's).
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.core.dims import EXPERT_RANK_ORDER, RANK_ORDER, rank_stride
from planner.core.errors import BadInput
from planner.core.hardware import Cluster
from planner.core.plan import ParallelPlan

# Each group a stage holds: the rank order it is laid out in and the dimensions it spans (several: the ranks
# of those dimensions together, Megatron's data-parallel group "with context parallel" over cp x dp, which
# reduces the gradients and shards ZeRO's states).
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tp": (RANK_ORDER, ("tp",)),
    "cp": (RANK_ORDER, ("cp",)),
    "dp": (RANK_ORDER, ("dp",)),
    "dp_cp": (RANK_ORDER, ("cp", "dp")),
    "etp": (EXPERT_RANK_ORDER, ("etp",)),
    "ep": (EXPERT_RANK_ORDER, ("ep",)),
    "edp": (EXPERT_RANK_ORDER, ("edp",)),
}


@dataclass(frozen=True)
class RankLayout:
    """The degrees of a plan and, where its stages have devices of their own, each stage's device indices in
    rank order (None: rank r is device r)."""

    tp: int
    cp: int
    dp: int
    pp: int
    ep: int = 1
    etp: int | None = None  # None: the experts split like attention (etp = tp)
    stages: tuple[tuple[int, ...], ...] | None = None

    @property
    def stage_size(self) -> int:
        return self.tp * self.cp * self.dp

    def degrees(self) -> dict[str, int]:
        """Every dimension's degree, the expert ones included (edp: what ep x etp leave of a stage)."""
        etp = self.etp or self.tp
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp, "etp": etp, "ep": self.ep,
                "edp": self.stage_size // (self.ep * etp)}

    def strided(self, name: str) -> tuple[int, int]:
        """(stride, size) of group `name` inside a stage: its ranks sit stride apart in the stage's order."""
        order, dims = GROUPS[name]
        degrees = self.degrees()
        if order is EXPERT_RANK_ORDER and self.stage_size % (degrees["ep"] * degrees["etp"]):
            raise BadInput(f"ep*etp = {self.ep}*{degrees['etp']} must divide dp*cp*tp = {self.stage_size}")
        size = 1
        for dim in dims:
            size *= degrees[dim]
        return rank_stride(dims[0], degrees, order), size

    def stage_devices(self, stage: int) -> tuple[int, ...] | range:
        """The stage's devices in rank order."""
        if self.stages is not None:
            return self.stages[stage]
        size = self.stage_size
        return range(stage * size, (stage + 1) * size)

    def group(self, name: str, rank: int) -> tuple[int, ...]:
        """The devices of the group `name` ("tp", "cp", "dp", "dp_cp", "pp", "etp", "ep", "edp") that holds
        global rank `rank`, in rank order."""
        stage, local = divmod(rank, self.stage_size)
        if name == "pp":  # the same local rank in every stage
            return tuple(self.stage_devices(s)[local] for s in range(self.pp))
        stride, size = self.strided(name)
        # the group's first rank: step back over this rank's position along the group
        first = local - (local // stride % size) * stride
        devices = self.stage_devices(stage)
        return tuple(devices[first + i * stride] for i in range(size))

    def stage_group(self, name: str, stage: int) -> tuple[int, ...]:
        """The group `name` of the stage's first rank: the one estimate() times for the stage."""
        return self.group(name, stage * self.stage_size)


def has_placement(plan: ParallelPlan) -> bool:
    """Whether the plan names devices or a device type for any of its stages."""
    return plan.partition is not None and any(
        a.devices is not None or a.device_type is not None for a in plan.partition)


def one_device_type(cluster: Cluster) -> bool:
    """One device profile in the whole cluster (remembered on the cluster: 16k-device clusters are common)."""
    cache = cluster._collective_cache  # the cluster's own dict (it is immutable); a key of ours in it
    key = ("hetero.homogeneous",)
    hit = cache.get(key)
    if hit is None:
        first = cluster.devices[0].device
        hit = cache[key] = all(d.device is first or d.device == first for d in cluster.devices)
    return hit


def rank_layout(cluster: Cluster, plan: ParallelPlan, listed: bool = False) -> RankLayout:
    """The plan's RankLayout on `cluster`: stage devices resolved from its placement; `listed` lists them
    also without one (rank r on device r)."""
    stages = None
    if has_placement(plan):
        stages = _placed_stages(cluster, plan)
    elif listed:
        size = plan.tp * plan.cp * plan.dp
        stages = tuple(tuple(range(st * size, (st + 1) * size)) for st in range(plan.pp))
    return RankLayout(tp=plan.tp, cp=plan.cp, dp=plan.dp, pp=plan.pp, ep=plan.ep, etp=plan.etp, stages=stages)


def _placed_stages(cluster: Cluster, plan: ParallelPlan) -> tuple[tuple[int, ...], ...]:
    """Each stage's devices: those it lists, else the first free ones of the type it names, else its ranks."""
    size = plan.tp * plan.cp * plan.dp
    taken: set[int] = set()
    groups: list[tuple[int, ...]] = []
    for st in range(plan.pp):
        a = plan.partition[st]  # chunk st runs on stage st (chunk c on stage c % pp)
        if a.devices is not None:
            g = tuple(int(i) for i in a.devices)
            if len(g) != size:
                raise BadInput(f"partition stage {st} lists {len(g)} devices, the plan needs tp*cp*dp = {size}")
            for i in g:
                if not 0 <= i < cluster.device_count:
                    raise BadInput(f"partition stage {st}: device {i} is not in cluster {cluster.name}")
            if a.device_type is not None and any(cluster.devices[i].device.name != a.device_type for i in g):
                raise BadInput(f"partition stage {st} names device type {a.device_type} but lists other devices")
        elif a.device_type is not None:
            free = [d.index for d in cluster.devices if d.device.name == a.device_type and d.index not in taken]
            if len(free) < size:
                have = sum(d.device.name == a.device_type for d in cluster.devices)
                raise BadInput(f"partition stage {st} needs {size} free {a.device_type} devices, cluster "
                               f"{cluster.name} has {have} of that type")
            g = tuple(free[:size])
        else:
            g = tuple(range(st * size, (st + 1) * size))
        if taken & set(g):
            raise BadInput(f"partition stage {st} reuses devices of another stage")
        taken |= set(g)
        groups.append(g)
    return tuple(groups)
