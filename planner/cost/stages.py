"""Which devices serve each pipeline stage, and which device profile times it (heterogeneous clusters).

estimate() on a cluster of one device type times every layer with the first device's profile, the groups
in Megatron's rank order (tp fastest, then cp, then dp, then pp). On a cluster of several device types, or
for a plan whose stages name their devices (`StageAssignment.devices`) or device type
(`StageAssignment.device_type`), each stage has its own devices, and:

  - a stage is timed on its slowest device: synchronous data and tensor parallelism wait for the slowest
    rank at every collective (the straggler effect of heterogeneous synchronous SGD: HetPipe, Park et al.,
    USENIX ATC'20, section 2; Metis, Um et al., USENIX ATC'24, section 3);
  - its memory must fit its smallest device;
  - its tp / cp / dp / ep groups are taken from its own device list in rank order, so their links are the
    links those devices really have (NVLink3 on an A100 node, NVLink4 on an H100 node).

`stage_layout` returns None for the plain case (one device type and no placement in the plan) so that
estimate() keeps its fast path and its floats unchanged there.
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.core.errors import BadInput
from planner.core.hardware import Cluster, Device
from planner.core.plan import ParallelPlan


@dataclass(frozen=True)
class StageLayout:
    """Per pipeline stage (pp entries): its device indices in rank order, the profile that times it (its
    slowest device) and its memory capacity (its smallest device), in bytes."""

    groups: tuple[tuple[int, ...], ...]
    devices: tuple[Device, ...]
    capacity_bytes: tuple[float, ...]

    def tp_group(self, st: int, tp: int) -> tuple[int, ...]:
        return self.groups[st][:tp]

    def strided(self, st: int, stride: int, size: int) -> tuple[int, ...]:
        """Ranks stride apart from the stage's first rank (estimate._group(0, stride, size) of the stage)."""
        return self.groups[st][0:stride * size:stride]


def device_speed_key(dev: Device, dtype: str) -> tuple[float, float]:
    """Sort key of a device's speed: achievable matmul FLOP/s, then achievable memory bandwidth."""
    return (dev.peak_flops(dtype) * dev.efficiency.matmul,
            dev.memory_bandwidth_bytes_per_s * dev.efficiency.memory)


def _homogeneous(cluster: Cluster) -> bool:
    """One device profile in the whole cluster (cached on the cluster: 16k-device clusters are common)."""
    cache = cluster._collective_cache  # per-cluster dict (frozen model); a key of our own in it
    key = ("hetero.homogeneous",)
    hit = cache.get(key)
    if hit is None:
        first = cluster.devices[0].device
        hit = cache[key] = all(d.device is first or d.device == first for d in cluster.devices)
    return hit


def has_placement(plan: ParallelPlan) -> bool:
    return plan.partition is not None and any(
        a.devices is not None or a.device_type is not None for a in plan.partition)


def stage_layout(cluster: Cluster, plan: ParallelPlan, dtype: str) -> StageLayout | None:
    """The stage layout of `plan` on `cluster`, or None when estimate()'s homogeneous path applies."""
    if not has_placement(plan) and _homogeneous(cluster):
        return None
    pp = plan.pp
    size = plan.tp * plan.cp * plan.dp
    groups: list[tuple[int, ...]] = []
    if not has_placement(plan):
        groups = [tuple(range(st * size, (st + 1) * size)) for st in range(pp)]
    else:
        taken: set[int] = set()
        for st in range(pp):
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
                g = tuple(i for i in range(st * size, (st + 1) * size))
            if taken & set(g):
                raise BadInput(f"partition stage {st} reuses devices of another stage")
            taken |= set(g)
            groups.append(g)
    devs, caps = [], []
    for g in groups:
        refs = [cluster.devices[i].device for i in g]
        devs.append(min(refs, key=lambda d: device_speed_key(d, dtype)))
        caps.append(min(d.memory_bytes for d in refs))
    return StageLayout(groups=tuple(groups), devices=tuple(devs), capacity_bytes=tuple(caps))


def stage_links(cluster: Cluster, layout: StageLayout, st: int, plan: ParallelPlan):
    """(tp, cp, dp, ep) CollectiveLinks of stage st: estimate()'s groups taken from the stage's own ranks
    (tp contiguous; cp tp apart; dp x cp tp apart; ep etp apart, Megatron's expert grid)."""
    tp, cp = plan.tp, plan.cp
    tp_link = cluster.collective(layout.tp_group(st, tp))
    cp_link = cluster.collective(layout.strided(st, tp, cp))
    dp_link = cluster.collective(layout.strided(st, tp, plan.dp * cp))
    ep_link = cluster.collective(layout.strided(st, plan.etp or tp, plan.ep)) if plan.ep > 1 else None
    return tp_link, cp_link, dp_link, ep_link


def boundary_p2p_s(cluster: Cluster, layout: StageLayout, k: int, nbytes: float, p2p=None) -> float:
    """Time of one activation transfer across the boundary from stage k to stage k + 1 (wrapping, as
    estimate.pipeline_p2p_s does), when every rank j of stage k sends to rank j of the next stage at once
    (Megatron's point-to-point pattern, Narayanan et al. SC'21 section 4.1).

    Each pair gets its point-to-point bandwidth (Cluster.p2p), shared with the pairs that leave through the
    same NIC, the same island gateway (island link x ports per node x sending nodes of that island,
    as hardware.collective_link counts it) or the same shared medium (Wi-Fi: one channel for all, halved
    when half-duplex). The alpha-beta time of the slowest pair is the boundary's (docs/formulas.md#comm-alpha-beta).
    """
    from planner.cost import comm

    p2p = p2p or cluster.p2p
    src, dst = layout.groups[k], layout.groups[(k + 1) % len(layout.groups)]
    memo = cluster._collective_cache  # per-cluster dict; remembered per (pair lists, bytes)
    key = ("hetero.boundary", src, dst, float(nbytes))
    if key not in memo:
        memo[key] = _boundary_p2p_s(cluster, src, dst, nbytes, p2p)
    return memo[key]


def _boundary_p2p_s(cluster: Cluster, src, dst, nbytes: float, p2p) -> float:
    from planner.cost import comm

    pairs = [(a, b) for a, b in zip(src, dst) if a != b]
    if not pairs:
        return 0.0
    nic_users: dict = {}
    gateway_users: dict = {}
    gateway_nodes: dict = {}
    medium_users = 0
    for a, b in pairs:
        da, db = cluster.devices[a], cluster.devices[b]
        if da.node != db.node:
            nic_users[(da.node, da.nic)] = nic_users.get((da.node, da.nic), 0) + 1
            medium_users += 1
            if da.island != db.island:
                gateway_users[da.island] = gateway_users.get(da.island, 0) + 1
                gateway_nodes.setdefault(da.island, set()).add(da.node)
    worst = 0.0
    for a, b in pairs:
        bw, lat = p2p(a, b)
        da, db = cluster.devices[a], cluster.devices[b]
        if da.node != db.node:
            node = cluster.nodes[da.node]
            fabric = cluster.fabric or node.nic_link
            port = min(node.nic_link.bytes_per_s, fabric.bytes_per_s)
            bw = min(bw, port / nic_users[(da.node, da.nic)])
            if fabric.shared_medium:
                bw = min(bw, fabric.bytes_per_s / medium_users / (2 if fabric.half_duplex else 1))
            if da.island != db.island:
                gateway = (cluster.island_link.bytes_per_s * cluster.island_ports_per_node
                           * len(gateway_nodes[da.island]))
                bw = min(bw, gateway / gateway_users[da.island])
        worst = max(worst, float(comm.p2p_time_s(nbytes, bw, lat)))
    return worst
