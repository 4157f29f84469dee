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

The groups themselves are planner/core/layout.py's RankLayout; their links cost/links.py's.
`stage_layout` returns None for the plain case (one device type and no placement in the plan) so that
estimate() keeps its fast path and its floats unchanged there.
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.core.hardware import Cluster, Device
from planner.core.layout import RankLayout, has_placement, one_device_type, rank_layout
from planner.core.plan import ParallelPlan
from planner.cost import comm


@dataclass(frozen=True)
class StageLayout:
    """Per pipeline stage (pp entries): its device indices in rank order (`ranks`, a RankLayout with its
    stages listed), the profile that times it (its slowest device) and its memory capacity (its smallest
    device), in bytes."""

    ranks: RankLayout
    devices: tuple[Device, ...]
    capacity_bytes: tuple[float, ...]

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        return self.ranks.stages


def device_speed_key(dev: Device, dtype: str) -> tuple[float, float]:
    """Sort key of a device's speed: achievable matmul FLOP/s, then achievable memory bandwidth."""
    return (dev.peak_flops(dtype) * dev.efficiency.matmul,
            dev.memory_bandwidth_bytes_per_s * dev.efficiency.memory)


def stage_layout(cluster: Cluster, plan: ParallelPlan, dtype: str) -> StageLayout | None:
    """The stage layout of `plan` on `cluster`, or None when estimate()'s homogeneous path applies."""
    if not has_placement(plan) and one_device_type(cluster):
        return None
    ranks = rank_layout(cluster, plan, listed=True)
    devs, caps = [], []
    for g in ranks.stages:
        refs = [cluster.devices[i].device for i in g]
        devs.append(min(refs, key=lambda d: device_speed_key(d, dtype)))
        caps.append(min(d.memory_bytes for d in refs))
    return StageLayout(ranks=ranks, devices=tuple(devs), capacity_bytes=tuple(caps))


def boundary_p2p_s(cluster: Cluster, layout: StageLayout, k: int, nbytes: float, p2p=None) -> float:
    """Time of one activation transfer across the boundary from stage k to stage k + 1 (wrapping, as
    links.pipeline_p2p_s does), when every rank j of stage k sends to rank j of the next stage at once
    (Megatron's point-to-point pattern, Narayanan et al. SC'21 section 4.1).

    Each pair gets its point-to-point bandwidth (Cluster.p2p), shared with the pairs that leave through the
    same NIC, the same island gateway (island link x ports per node x sending nodes of that island,
    as hardware.collective_link counts it) or the same shared medium (Wi-Fi: one channel for all, halved
    when half-duplex). The alpha-beta time of the slowest pair is the boundary's (docs/formulas.md#comm-alpha-beta).
    """
    p2p = p2p or cluster.p2p
    src, dst = layout.groups[k], layout.groups[(k + 1) % len(layout.groups)]
    memo = cluster._collective_cache  # per-cluster dict; remembered per (pair lists, bytes)
    key = ("hetero.boundary", src, dst, float(nbytes))
    if key not in memo:
        memo[key] = _boundary_p2p_s(cluster, src, dst, nbytes, p2p)
    return memo[key]


def _boundary_p2p_s(cluster: Cluster, src, dst, nbytes: float, p2p) -> float:
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
