"""Hardware description: devices, links, node types and clusters (docs/ARCHITECTURE.md#concepts).

Profiles are written by people in the units of datasheets (TFLOP/s, GB, GB/s, microseconds); the
properties ending in SI units (`peak_flops`, `memory_bytes`, `bytes_per_s`, `latency_s`) are what the
cost model reads. GB means 10^9 bytes, as in every datasheet we cite.
"""
from __future__ import annotations

from functools import cached_property
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

DeviceKind = Literal["gpu", "npu", "tpu", "cpu", "mobile-cpu", "mobile-gpu"]
LinkKind = Literal[
    "nvlink", "pcie", "xgmi", "hccs", "ib", "roce", "ethernet", "slingshot", "efa", "ici",
    "wifi", "cellular", "usb", "memory",
]
Dtype = Literal["fp32", "tf32", "bf16", "fp16", "fp8"]
Provenance = Literal["datasheet", "derived", "measured", "assumed"]

GB = 1e9
TERA = 1e12
MICRO = 1e-6

# Physical ceilings a profile's numbers must stay below: far above every device and link made (so no real
# profile is refused) and low enough that a typo (1e30, an extra six zeros) is caught with one line.
MAX_TFLOPS = 1e5  # 100 PFLOP/s per device: 20x a B200's 4.5 PFLOP/s dense FP8 (NVIDIA B200 datasheet)
MAX_MEMORY_GB = 1e5  # 100 TB per device: 500x an H200's 141 GB
MAX_BANDWIDTH_GB_S = 1e5  # 100 TB/s: 20x an H200's 4.8 TB/s HBM3e, 100x NVLink 5's 900 GB/s per direction
MAX_LATENCY_US = 1e7  # 10 s per message: a satellite link is 0.6 s
MAX_POWER_W = 1e5  # 100 kW per device: 100x a B200's 1 kW
MAX_OVERHEAD_US = 1e6  # 1 s of fixed cost per kernel or layer
MAX_PER_BYTE_NS = 1e6  # 1 ms per byte (or per parameter): a 1 kB/s host
MAX_DEVICES_PER_NODE = 4096
MAX_NODES = 1_000_000  # the cost model's device cap (issue 16): a million nodes is past any cluster built
# Every profile model refuses NaN and infinity (allow_inf_nan) and, read from a file, takes numbers
# strictly (catalog.parse_as): true is not 1 and "8" is not 8.
_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

# Used when a profile gives no achievable efficiency: the median of the measured dense-GEMM fractions in
# docs/formulas.md#efficiency-measured (A100 87%/81%, H100 80%, B200 78%) and of HBM STREAM triad (83-89%).
DEFAULT_MATMUL_EFFICIENCY = 0.80
DEFAULT_MEMORY_EFFICIENCY = 0.85
# Achievable fraction of a link's line rate when a profile does not say (NCCL ring on NVLink ~80%).
DEFAULT_LINK_FRACTION = 0.80


_DTYPE_FALLBACK = {
    "fp8": ("fp8", "bf16", "fp16"),
    "bf16": ("bf16", "fp16"),
    "fp16": ("fp16", "bf16"),
    "tf32": ("tf32", "fp32"),
    "fp32": ("fp32", "tf32"),
}


class _Profile(BaseModel):
    """What every catalog entry shares: a name, where its numbers come from, and no unknown fields."""

    model_config = _STRICT

    name: str = Field(min_length=1)
    source: str = Field(min_length=3, description="datasheet, paper or measurement each number comes from")
    provenance: Provenance = "datasheet"
    notes: str = ""


class Efficiency(BaseModel):
    """Achievable fractions of peak, the knobs calibration fits (issue 4) and `calibrate` measures."""

    model_config = _STRICT

    matmul: float = Field(DEFAULT_MATMUL_EFFICIENCY, gt=0, le=1)
    memory: float = Field(DEFAULT_MEMORY_EFFICIENCY, gt=0, le=1)
    # FlashAttention core vs dense peak: FA2 forward at hd 128 reaches 328 TFLOP/s on H100 = 33%,
    # 180 TFLOP/s on A100 (hd 64) = 58% (Azure AI-benchmarking-guide, docs/formulas.md#efficiency-measured).
    attention: float = Field(0.45, gt=0, le=1)
    # FP8 GEMMs reach a lower fraction of their (doubled) peak: H100 MAMF 70.9% FP8 vs 80.3% BF16
    # (docs/formulas.md#efficiency-measured). None: same as matmul.
    matmul_fp8: float | None = Field(None, gt=0, le=1)
    # GEMM efficiency falls with the smallest GEMM dimension d as d / (d + gemm_half_dim): fewer tiles
    # than the device has SMs, and tail waves, leave units idle (the shape effect of reference
    # docs/formulas.md#compute-gemm). 0: no shape effect beyond the roofline.
    gemm_half_dim: float = Field(0.0, ge=0, le=1e6)
    # Fixed cost per kernel launch (CUDA launch + framework dispatch), and per layer per pass for
    # framework work that does not scale with size (Python, hooks, allocator): what dominates small
    # models (vTrain single-node rows, reference README). Fitted by calibration.
    kernel_overhead_us: float = Field(4.0, ge=0, le=MAX_OVERHEAD_US)
    layer_overhead_us: float = Field(0.0, ge=0, le=MAX_OVERHEAD_US)
    # Host time to dispatch one kernel (Python, framework, launch). It overlaps with device work, so a
    # layer takes max(device time, kernels x this): invisible for big layers, the floor for small ones.
    # Eager PyTorch dispatch costs on the order of 10 us per op; calibration fits it per stack.
    host_dispatch_us: float = Field(10.0, ge=0, le=MAX_OVERHEAD_US)
    # Host cost of one tensor-parallel sublayer (attention or MLP) per forward pass that a framework adds
    # beyond its GEMMs and the collective's link time: DTensor's sharding propagation, redistribution and
    # autograd wrappers around every sharded op (torch.distributed.tensor.parallel). Charged like
    # layer_overhead_us (once forward, twice backward) on layers split tp > 1 ways. 0 for plain-tensor TP
    # (Megatron); `calibrate --backend torch` measures it on a DTensor MLP between local processes.
    tp_dispatch_us: float = Field(0.0, ge=0, le=MAX_OVERHEAD_US)
    # The same under sequence parallelism (norms sequence-sharded as DTensors, an all-gather and a
    # reduce-scatter in place of the all-reduce); None: tp_dispatch_us.
    sp_dispatch_us: float | None = Field(None, ge=0, le=MAX_OVERHEAD_US)
    # The part of that host cost that grows with the sublayer's activation (tokens x hidden x bytes):
    # DTensor's redistribution copies and the functional collectives' fresh outputs. Per byte, per split
    # sublayer and pass, charged beside tp_dispatch_us; measured by `calibrate --backend torch` on a
    # small model's MLP (0 for plain-tensor TP and every catalog device).
    tp_dispatch_ns_per_byte: float = Field(0.0, ge=0, le=MAX_PER_BYTE_NS)
    # Fraction of the modelled NCCL bandwidth that the software stack's data-parallel / ZeRO collectives
    # reach. 1 for bucketed NCCL collectives (Megatron, FSDP); below 1 for stacks that gather parameter by
    # parameter without bucketing (DeepSpeed ZeRO-3 of 2021): fitted per stack, never per device.
    dp_collective: float = Field(1.0, gt=0, le=1)
    # Fraction of a pass's compute under which communication issued beside it can hide. 1 on GPUs (NCCL
    # runs on its own SMs and copy engines while GEMMs run); a CPU rank with one core has no spare unit:
    # gloo's transfers and reductions take the core the compute needs. `calibrate --backend torch`
    # measures it as (T_compute + T_comm - T_both) / min(T_compute, T_comm) with an async all-reduce.
    comm_overlap: float = Field(1.0, ge=0, le=1)
    # Host seconds per byte that a sharded-data-parallel framework spends copying parameters into and out
    # of its collective buffers, per byte gathered or reduce-scattered (FSDP2's copy-in / copy-out around
    # every all-gather and reduce-scatter; Megatron's distributed optimizer gathers into the parameters'
    # own buffer: 0). Not overlapped. Charged for ZeRO 2 and 3; `calibrate --backend torch` measures it
    # on an FSDP2-wrapped stack of linear layers; 0 for catalog devices (on a GPU these copies run at HBM
    # speed on the collective's stream).
    shard_copy_ns_per_byte: float = Field(0.0, ge=0, le=MAX_PER_BYTE_NS)
    # Time per parameter, per micro-batch, to add that micro-batch's weight gradients into the accumulated
    # ones: eager autograd's AccumulateGrad (`grad += new`: read both, write the sum). 0 where accumulation
    # is fused into the weight-gradient GEMM (Megatron --gradient-accumulation-fusion) and for every catalog
    # device; `calibrate --backend torch` measures it (`add_` over 8M fp32 parameters).
    grad_accum_ns_per_param: float = Field(0.0, ge=0, le=MAX_PER_BYTE_NS)
    source: str = "default: median of measured fractions in docs/formulas.md#efficiency-measured"


class Device(_Profile):
    kind: DeviceKind
    vendor: str = ""
    peak_tflops: dict[Dtype, Annotated[float, Field(gt=0, le=MAX_TFLOPS)]] = Field(
        description="dense peak per dtype, TFLOP/s")
    memory_gb: float = Field(gt=0, le=MAX_MEMORY_GB)
    memory_bandwidth_gb_s: float = Field(gt=0, le=MAX_BANDWIDTH_GB_S)
    tdp_w: float | None = Field(None, gt=0, le=MAX_POWER_W)
    efficiency: Efficiency = Efficiency()

    @model_validator(mode="after")
    def _has_a_peak(self) -> Device:
        if not self.peak_tflops:
            raise ValueError("peak_tflops needs at least one dtype")
        return self

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype`. A dtype the device lacks runs at the nearest one it has
        (fp8 on A100 runs as bf16; V100 has fp16 only; TPUs list bf16 only)."""
        for d in _DTYPE_FALLBACK.get(dtype, (dtype,)):
            if d in self.peak_tflops:
                return self.peak_tflops[d] * TERA
        return min(self.peak_tflops.values()) * TERA

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * GB

    @property
    def memory_bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gb_s * GB


class Link(_Profile):
    kind: LinkKind
    bandwidth_gb_s: float = Field(gt=0, le=MAX_BANDWIDTH_GB_S, description="per direction, per device or per port")
    latency_us: float = Field(ge=0, le=MAX_LATENCY_US)
    achievable_fraction: float = Field(DEFAULT_LINK_FRACTION, gt=0, le=1)
    shared_medium: bool = Field(False, description="one channel shared by every endpoint (Wi-Fi)")
    half_duplex: bool = False

    @property
    def bytes_per_s(self) -> float:
        """Achievable bytes/s per direction."""
        return self.bandwidth_gb_s * GB * self.achievable_fraction

    @property
    def latency_s(self) -> float:
        return self.latency_us * MICRO


class DeviceSlot(BaseModel):
    model_config = _STRICT
    device: str
    count: PositiveInt = Field(1, le=MAX_DEVICES_PER_NODE)


class NicSpec(BaseModel):
    """Scale-out ports of a node: `count` ports of `link`, each shared by `devices_per_nic` devices."""

    model_config = _STRICT
    link: str
    count: PositiveInt = Field(1, le=MAX_DEVICES_PER_NODE)
    devices_per_nic: PositiveInt = Field(1, le=MAX_DEVICES_PER_NODE)


class NodeType(_Profile):
    """One machine: its devices, the link between them, and its NICs."""

    devices: list[DeviceSlot] = Field(min_length=1)
    intra_link: str | None = Field(None, description="device-to-device link inside the node")
    nics: NicSpec | None = None
    shared_memory: bool = Field(False, description="all devices share one memory pool (phones, Jetson)")
    host_link: str | None = Field(None, description="device-to-host link for offload (PCIe)")
    host_memory_gb: float | None = Field(None, gt=0, le=MAX_MEMORY_GB)


class NodeGroup(BaseModel):
    """`count` nodes of one type in one island. count None: the CLI's --nodes decides."""

    model_config = _STRICT
    node: str
    count: PositiveInt | None = Field(None, le=MAX_NODES)
    island: str = "main"


class IslandLink(BaseModel):
    """How islands reach each other: `ports_per_node` ports of `link` on every node."""

    model_config = _STRICT
    link: str
    ports_per_node: PositiveInt = Field(1, le=MAX_DEVICES_PER_NODE)


class ClusterSpec(_Profile):
    """A cluster file: node groups, islands, and the fabrics between nodes and between islands.

    A preset that is a single node type (dgx-h100) has one group with no count: `--nodes` fills it in.
    """

    groups: list[NodeGroup] = Field(min_length=1)
    fabric: str | None = Field(None, description="link between nodes of one island; default: the NICs' link")
    between_islands: IslandLink | None = None

    @model_validator(mode="after")
    def _islands_are_joined(self) -> ClusterSpec:
        if len({g.island for g in self.groups}) > 1 and self.between_islands is None:
            raise ValueError("groups sit on several islands but between_islands is not given")
        return self

    @property
    def needs_node_count(self) -> bool:
        return any(g.count is None for g in self.groups)


# ----------------------------------------------------------------------------------------------------
# Resolved cluster: every name looked up, every device numbered, the topology as a networkx graph.


class DeviceRef(BaseModel):
    """One device of a resolved cluster."""

    model_config = ConfigDict(frozen=True)
    index: int
    node: int
    local: int
    device: Device
    island: str
    nic: int | None = Field(None, description="index of the NIC (within its node) this device uses")


class NodeInstance(BaseModel):
    model_config = ConfigDict(frozen=True)
    index: int
    node_type: NodeType
    island: str
    devices: list[int]
    intra_link: Link | None
    nic_link: Link | None
    nic_count: int
    devices_per_nic: int
    host_link: Link | None


class CollectiveLink(BaseModel):
    """Bandwidth and latency that a collective over a device set sees.

    `bus_bytes_per_s` is per-rank bus bandwidth in the sense of nccl-tests (doc/PERFORMANCE.md): a ring
    all-reduce of S bytes over n ranks takes 2(n-1)/n * S / bus_bytes_per_s plus latency. `level` names the
    slowest level the set spans.
    """

    model_config = ConfigDict(frozen=True)
    bus_bytes_per_s: float
    latency_s: float
    level: Literal["self", "intra-node", "inter-node", "inter-island"]
    ranks: int
    nodes: int
    # What one rank can push off its node through its own NIC share: what bounds all-to-all, where
    # every rank's off-node traffic leaves through its own NIC rather than through a ring of all of them.
    rank_inter_bytes_per_s: float = float("inf")
    # Per-hop latency of the hops inside a node when the set spans nodes (NVLink-class), so a ring's
    # intra-node steps are not charged the NIC's latency. None: same as latency_s.
    intra_latency_s: float | None = None


class Cluster(BaseModel):
    """A cluster with every name resolved and every device numbered."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    spec: ClusterSpec
    nodes: list[NodeInstance]
    devices: list[DeviceRef]
    fabric: Link | None
    island_link: Link | None
    island_ports_per_node: int = 1
    # The software stack the cluster runs (a planner.core.stack.Stack, set by with_stack; typed loosely because
    # that module imports this one), None for none named: the devices keep their own efficiencies, and the
    # estimate's error band is planner.core.stack.DEFAULT_BAND.
    stack: object | None = None

    @property
    def device_count(self) -> int:
        return len(self.devices)

    @property
    def device_types(self) -> list[str]:
        return sorted({d.device.name for d in self.devices})

    @property
    def is_homogeneous(self) -> bool:
        return len(self.device_types) == 1 and len({n.node_type.name for n in self.nodes}) == 1

    @property
    def devices_per_node(self) -> int:
        """Devices per node; for mixed clusters, the smallest node."""
        return min(len(n.devices) for n in self.nodes)

    @cached_property
    def graph(self):
        """Topology as a networkx graph.

        Vertices: ("dev", i), ("node", n) for the node's internal switch or memory, ("nic", n, k),
        ("island", name) for an island's switch fabric, and ("core",) joining islands. Edge attribute
        `link` is the Link, `bytes_per_s` its achievable per-direction bandwidth times parallel ports.
        """
        import networkx as nx

        g = nx.Graph()
        islands = sorted({n.island for n in self.nodes})
        for isl in islands:
            g.add_node(("island", isl), kind="island")
        if len(islands) > 1:
            g.add_node(("core",), kind="core")
        for node in self.nodes:
            g.add_node(("node", node.index), kind="node")
            for i in node.devices:
                d = self.devices[i]
                g.add_node(("dev", i), kind="device", device=d.device.name)
                if node.intra_link is not None:
                    g.add_edge(("dev", i), ("node", node.index), link=node.intra_link,
                               bytes_per_s=node.intra_link.bytes_per_s)
                if node.nic_link is not None and d.nic is not None:
                    g.add_edge(("dev", i), ("nic", node.index, d.nic), link=node.nic_link,
                               bytes_per_s=node.nic_link.bytes_per_s)
            if node.nic_link is not None:
                fabric = self.fabric or node.nic_link
                for k in range(node.nic_count):
                    bw = min(node.nic_link.bytes_per_s, fabric.bytes_per_s)
                    g.add_edge(("nic", node.index, k), ("island", node.island), link=fabric, bytes_per_s=bw)
            if len(islands) > 1 and self.island_link is not None:
                g.add_edge(("node", node.index), ("core",), link=self.island_link,
                           bytes_per_s=self.island_link.bytes_per_s * self.island_ports_per_node)
        return g

    def with_efficiency(self, **fields) -> Cluster:
        """The same cluster with the given Efficiency fields replaced on every device."""
        if not fields:
            return self
        devices = []
        for ref in self.devices:
            eff = ref.device.efficiency.model_copy(update=fields)
            devices.append(ref.model_copy(update={"device": ref.device.model_copy(update={"efficiency": eff})}))
        return self.model_copy(update={"devices": devices})

    def with_stack(self, stack) -> Cluster:
        """The same cluster running `stack`: each device's efficiency (its profile and the device fit) with
        the stack's fields for that device laid over it (planner.catalog.load_stack has put the stack's
        fitted values over its priors), and `stack` set so the estimate can say what it changed."""
        by_name: dict[str, Device] = {}
        for ref in self.devices:
            dev = ref.device
            if dev.name not in by_name:
                fields = stack.efficiency_for(dev.name)
                src = f"{dev.efficiency.source}; stack {stack.name}: {stack.efficiency[dev.name]['source']}" \
                    if fields else None
                by_name[dev.name] = dev if not fields else dev.model_copy(update={
                    "efficiency": dev.efficiency.model_copy(update={**fields, "source": src})})
        devices = [ref if ref.device is by_name[ref.device.name] else
                   ref.model_copy(update={"device": by_name[ref.device.name]}) for ref in self.devices]
        return self.model_copy(update={"devices": devices, "stack": stack})

    def p2p(self, src: int, dst: int) -> tuple[float, float]:
        """(bytes/s, latency s) of a point-to-point transfer between two devices.

        Read off the node structure (what the widest path through `graph` gives, without searching a
        16k-device graph): inside a node the intra-node link; across nodes the slower of the two NICs
        and the fabric, with one network crossing's latency; across islands also the island link.
        """
        if src == dst:
            return float("inf"), 0.0
        a, b = self.devices[src], self.devices[dst]
        na, nb = self.nodes[a.node], self.nodes[b.node]
        if a.node == b.node:
            if na.intra_link is None:
                raise ValueError(f"node type {na.node_type.name} has several devices but no intra_link")
            return na.intra_link.bytes_per_s, na.intra_link.latency_s
        if na.nic_link is None or nb.nic_link is None:
            raise ValueError("a transfer between nodes needs NICs on both")
        fabric = self.fabric or na.nic_link
        bw = min(na.nic_link.bytes_per_s, nb.nic_link.bytes_per_s, fabric.bytes_per_s)
        latency = max(na.nic_link.latency_s, nb.nic_link.latency_s, fabric.latency_s)
        if na.island != nb.island:
            assert self.island_link is not None
            bw = min(bw, self.island_link.bytes_per_s * self.island_ports_per_node)
            latency += self.island_link.latency_s
        return bw, latency

    def p2p_by_graph(self, src: int, dst: int) -> tuple[float, float]:
        """p2p by widest-path search over `graph` (bottleneck bandwidth; latency summed per edge)."""
        if src == dst:
            return float("inf"), 0.0
        return _widest_path(self.graph, ("dev", src), ("dev", dst))

    def collective(self, device_ids: list[int] | tuple[int, ...]) -> CollectiveLink:
        """collective_link over these devices, remembered per device set (the cluster is immutable)."""
        key = tuple(device_ids)
        cache = self._collective_cache
        if key not in cache:
            cache[key] = collective_link(self, key)
        return cache[key]

    @cached_property
    def _collective_cache(self) -> dict:
        return {}


def _widest_path(g, a, b) -> tuple[float, float]:
    """Maximum-bottleneck path between a and b (modified Dijkstra), and the summed latency along it."""
    import heapq

    best = {a: float("inf")}
    lat = {a: 0.0}
    heap = [(-float("inf"), 0.0, a)]
    seen = set()
    while heap:
        neg_bw, l, u = heapq.heappop(heap)
        if u in seen:
            continue
        seen.add(u)
        if u == b:
            return -neg_bw, l
        for v, data in g[u].items():
            bw = min(-neg_bw, data["bytes_per_s"])
            if bw > best.get(v, 0.0):
                best[v] = bw
                lat[v] = l + data["link"].latency_s
                heapq.heappush(heap, (-bw, lat[v], v))
    raise ValueError(f"no path between {a} and {b}")


def collective_link(cluster: Cluster, device_ids) -> CollectiveLink:
    """Per-rank bus bandwidth and per-step latency of a ring-style collective over `device_ids`.

    Each level the set spans bounds the bus bandwidth (nccl-tests PERFORMANCE.md; the hierarchical
    ring argument of the NCCL 2.4 blog): a ring moves the same bytes across every edge it uses, so
      - inside a node: the intra-node link per device;
      - across nodes: the node's NIC bandwidth used by the set's devices in that node (NCCL runs one ring
        per NIC, so a node's rings together get the sum of its NICs), the slowest node deciding;
      - across islands: the island's gateway ports (ports per node x nodes of the set in that island);
      - a shared medium (Wi-Fi) is one channel for all nodes: its bandwidth divided by the nodes on it,
        halved again when half-duplex.
    Latency is the largest per-hop latency crossed (NCCL tuning.cc per-hop constants).
    """
    ids = sorted(set(int(i) for i in device_ids))
    if not ids:
        raise ValueError("empty device set")
    for i in ids:
        if not 0 <= i < cluster.device_count:
            raise ValueError(f"device {i} is not in cluster {cluster.name} ({cluster.device_count} devices)")
    if len(ids) == 1:
        return CollectiveLink(bus_bytes_per_s=float("inf"), latency_s=0.0, level="self", ranks=1, nodes=1)

    by_node: dict[int, list[int]] = {}
    for i in ids:
        by_node.setdefault(cluster.devices[i].node, []).append(i)
    bw = float("inf")
    rank_bw = float("inf")
    latency = 0.0
    intra_latency = None
    level = "intra-node"
    for n, members in by_node.items():
        node = cluster.nodes[n]
        if len(members) > 1:
            if node.intra_link is None:
                raise ValueError(f"node type {node.node_type.name} has several devices but no intra_link")
            bw = min(bw, node.intra_link.bytes_per_s)
            latency = max(latency, node.intra_link.latency_s)
            intra_latency = max(intra_latency or 0.0, node.intra_link.latency_s)
    if len(by_node) > 1:
        level = "inter-node"
        islands: dict[str, list[int]] = {}
        for n, members in by_node.items():
            node = cluster.nodes[n]
            islands.setdefault(node.island, []).append(n)
            if node.nic_link is None:
                raise ValueError(f"node type {node.node_type.name} has no NICs but the set spans nodes")
            fabric = cluster.fabric or node.nic_link
            port_bw = min(node.nic_link.bytes_per_s, fabric.bytes_per_s)
            nics_used = len({cluster.devices[i].nic for i in members})
            node_bw = port_bw * nics_used
            rank_bw = min(rank_bw, node_bw / len(members))
            if fabric.shared_medium:
                node_bw = fabric.bytes_per_s / len(by_node)
                if fabric.half_duplex:
                    node_bw /= 2
                rank_bw = min(rank_bw, node_bw / len(members))
            bw = min(bw, node_bw)
            latency = max(latency, node.nic_link.latency_s, fabric.latency_s)
        if len(islands) > 1:
            level = "inter-island"
            link = cluster.island_link
            assert link is not None
            for nodes_in_island in islands.values():
                gateway = link.bytes_per_s * cluster.island_ports_per_node * len(nodes_in_island)
                bw = min(bw, gateway)
                members = sum(len(by_node[n]) for n in nodes_in_island)
                rank_bw = min(rank_bw, gateway / members)
            latency = max(latency, link.latency_s)
    return CollectiveLink(bus_bytes_per_s=bw, latency_s=latency, level=level, ranks=len(ids),
                          nodes=len(by_node), rank_inter_bytes_per_s=rank_bw,
                          intra_latency_s=intra_latency if len(by_node) > 1 else None)
