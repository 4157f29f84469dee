"""Edge devices: fine-tuning a model on a few phones, each a CPU and a GPU sharing one LPDDR memory.

Two levels, both costed with the cost model's own functions (compute.layer_time, comm.p2p_time_s,
memory.model_state_bytes, Layer.activation_bytes, pipeline.simulate_times):

  inside a phone   each transformer block's attention heads and MLP columns (and the LM head's vocabulary
                   columns) are split between the CPU and the GPU by an ILP that balances their finish
                   times (Confidant's backend scheduler, Chen et al. 2023, arXiv:2312.14302, section 4;
                   the formulation here is ours). Per sublayer j with U_j units (heads, or 1/K of the
                   columns), x_j units on the GPU and U_j - x_j on the CPU:
                       T_j >= x_j * a_gpu_j,   T_j >= (U_j - x_j) * a_cpu_j,   T_j >= bytes_j / BW_shared
                   a_d_j = that sublayer's forward + backward time on device d (compute.layer_time) / U_j
                   (time linear in the share of heads or columns: the GEMMs' m and k stay, n shrinks),
                   the last line because both processors stream from the same LPDDR; when both are used
                   (binary y_j) the partial outputs are combined through the shared memory, forward and
                   backward: + 2 x comm.p2p_time_s(b s h e, the node's shared-memory link). Minimise
                   sum_j count_j (T_j + sync_j y_j). Solved with PuLP/CBC.
  across phones    contiguous sub-models, one per phone, each fitting its memory (model states of its
                   blocks + the activations 1F1B keeps in flight on it), balanced by the heterogeneous
                   stage DP (planner/search/hetero.hetero_partition), pipelined over Wi-Fi (the shared,
                   half-duplex channel: each boundary's transfer gets the air divided among the boundaries
                   that send at once, as hardware.collective_link divides a shared medium).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from planner.core.dtypes import activation_bytes
from planner.core.errors import BadInput, Infeasible
from planner.core.hardware import Cluster, Device
from planner.core.model import Layer, ModelGraph
from planner.core.plan import Workload
from planner.cost import comm, memory, pipeline
from planner.cost.compute import layer_time

MLP_COLUMN_CHUNKS = 16  # MLP and LM-head columns are split in sixteenths
# AdamW mixed precision: 2-byte weights and gradients plus fp32 master weights and two moments
# (memory.model_state_bytes with dp 1, ZeRO 0: 16 bytes per parameter).
EDGE_WEIGHT_BYTES = 2
EDGE_GRAD_BYTES = 2


@dataclass(frozen=True)
class Phone:
    """One node of a shared-memory edge cluster: its CPU and GPU profiles, memory pool and links."""

    node: int
    cpu: Device
    gpu: Device
    memory_bytes: float
    shared_link_bytes_per_s: float
    shared_link_latency_s: float


def phones_of(cluster: Cluster) -> list[Phone]:
    out = []
    for node in cluster.nodes:
        devs = [cluster.devices[i].device for i in node.devices]
        cpus = [d for d in devs if d.kind in ("cpu", "mobile-cpu")]
        gpus = [d for d in devs if d.kind not in ("cpu", "mobile-cpu")]
        if not cpus or not gpus:
            raise BadInput(f"node {node.index} of {cluster.name} is not a CPU + GPU device (edge planning needs both)")
        # shared_memory: the device entries list the same pool, not the sum (hardware_profiles nodes/edge.yaml)
        pool = max(d.memory_bytes for d in devs) if node.node_type.shared_memory else sum(d.memory_bytes for d in devs)
        link = node.intra_link
        out.append(Phone(node.index, cpus[0], gpus[0], pool, link.bytes_per_s, link.latency_s))
    return out


# ---------------------------------------------------------------------------------------------------------
# the CPU / GPU split inside one phone


@dataclass
class Sublayer:
    name: str
    units: int  # heads or column chunks
    count: int  # how many such sublayers the phone runs (blocks)
    cpu_s: float  # fwd + bwd of the whole sublayer on the CPU, per micro-batch
    gpu_s: float
    bytes_floor_s: float  # fwd + bwd memory traffic of the whole sublayer at the shared bandwidth
    sync_s: float  # combining the two partial results, fwd + bwd, when both devices work


@dataclass
class Split:
    """Units of each sublayer on the GPU (the rest on the CPU) and the time per micro-batch."""

    gpu_units: dict
    units: dict
    time_s: float
    per_sublayer_s: dict = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{k}: {self.gpu_units[k]}/{self.units[k]} on GPU" for k in self.units)


def _sub_time(sub: Sublayer, x: int) -> float:
    t = max(x / sub.units * sub.gpu_s, (sub.units - x) / sub.units * sub.cpu_s, sub.bytes_floor_s)
    if 0 < x < sub.units:
        t += sub.sync_s
    return t


def split_time_s(subs: list[Sublayer], gpu_units: dict) -> float:
    return sum(s.count * _sub_time(s, gpu_units[s.name]) for s in subs)


def solve_split(subs: list[Sublayer], mode: str = "both") -> Split:
    """The ILP above. mode 'gpu' / 'cpu' pins every unit to one device (the baselines)."""
    import pulp

    if mode == "gpu":
        g = {s.name: s.units for s in subs}
    elif mode == "cpu":
        g = {s.name: 0 for s in subs}
    else:
        lp = pulp.LpProblem("cpu_gpu_split", pulp.LpMinimize)
        terms = []
        g_vars = {}
        for s in subs:
            x = pulp.LpVariable(f"x_{s.name}", 0, s.units, cat="Integer")
            on_g = pulp.LpVariable(f"g_{s.name}", cat="Binary")
            on_c = pulp.LpVariable(f"c_{s.name}", cat="Binary")
            y = pulp.LpVariable(f"y_{s.name}", cat="Binary")
            t = pulp.LpVariable(f"T_{s.name}", 0)
            lp += x <= s.units * on_g
            lp += s.units - x <= s.units * on_c
            lp += y >= on_g + on_c - 1
            lp += t >= s.gpu_s / s.units * x
            lp += t >= s.cpu_s / s.units * (s.units - x)
            lp += t >= s.bytes_floor_s
            terms.append(s.count * (t + s.sync_s * y))
            g_vars[s.name] = x
        lp += pulp.lpSum(terms)
        status = lp.solve(pulp.PULP_CBC_CMD(msg=False))
        if pulp.LpStatus[status] != "Optimal":
            raise Infeasible(f"CPU/GPU split ILP: {pulp.LpStatus[status]}")
        g = {k: int(round(v.value())) for k, v in g_vars.items()}
    return Split(g, {s.name: s.units for s in subs}, split_time_s(subs, g),
                 {s.name: _sub_time(s, g[s.name]) for s in subs})


def sublayers(model: ModelGraph, phone: Phone, b: int, s: int, dtype: str, blocks: int,
              with_head: bool) -> list[Sublayer]:
    """The attention, MLP (and LM head) sublayers of `blocks` blocks on this phone, timed on each device."""
    by_kind: dict[str, Layer] = {}
    for layer in model.layers:
        if layer.kind in ("attention", "mlp", "head") and layer.kind not in by_kind:
            by_kind[layer.kind] = layer
    e = activation_bytes(dtype)
    bw = min(phone.cpu.memory_bandwidth_bytes_per_s * phone.cpu.efficiency.memory,
             phone.gpu.memory_bandwidth_bytes_per_s * phone.gpu.efficiency.memory)
    out = []
    for kind, count in (("attention", blocks), ("mlp", blocks), ("head", 1 if with_head else 0)):
        layer = by_kind.get(kind)
        if layer is None or count == 0:
            continue
        units = layer.heads if kind == "attention" else MLP_COLUMN_CHUNKS
        c = layer_time(layer, b, s, phone.cpu, dtype)
        g = layer_time(layer, b, s, phone.gpu, dtype)
        # LPDDR traffic of the sublayer: weights read in forward and twice in backward (dX and dW), the
        # gradient written once (Layer.params, 2-byte weights)
        traffic = layer.params() * e * 4
        out_bytes = b * s * layer.hidden * e
        sync = 2 * float(comm.p2p_time_s(out_bytes, phone.shared_link_bytes_per_s, phone.shared_link_latency_s))
        out.append(Sublayer(kind, units, count, float(c.fwd_s + c.bwd_s), float(g.fwd_s + g.bwd_s),
                            traffic / bw, sync))
    return out


# ---------------------------------------------------------------------------------------------------------
# sub-models over phones


@dataclass
class EdgePlan:
    ranges: list[tuple[int, int]]  # blocks per phone
    memory_bytes: list[float]  # per phone, peak
    capacity_bytes: list[float]
    split: Split  # the CPU/GPU split of a block (same on every phone)
    step_time_s: float
    tokens_per_s: float
    stage_time_s: list[float]  # fwd + bwd per micro-batch per phone
    p2p_s: float
    one_phone: dict  # per micro-batch time of one block on one phone: 'both', 'gpu', 'cpu'
    fits: bool
    breakdown: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"ranges": self.ranges, "memory_bytes": self.memory_bytes, "capacity_bytes": self.capacity_bytes,
                "split": {"gpu_units": self.split.gpu_units, "units": self.split.units},
                "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "stage_time_s": self.stage_time_s, "p2p_s": self.p2p_s, "one_phone": self.one_phone,
                "fits": self.fits, "breakdown": self.breakdown}


def plan_edge(model: ModelGraph, cluster: Cluster, workload: Workload, mbs: int = 1,
              phones: int | None = None) -> EdgePlan:
    """Sub-models over `phones` phones (None: the phone count, from 1 to all of them, that gives the fastest
    step that fits; fewer phones mean fewer Wi-Fi hops), pipelined with 1F1B over the cluster's fabric,
    each block split between CPU and GPU by the ILP."""
    if phones is None:
        blocks = len({layer.block for layer in model.layers if layer.block is not None})
        tried = [plan_edge(model, cluster, workload, mbs, k)
                 for k in range(1, min(len(cluster.nodes), blocks) + 1)]
        fitting = [p for p in tried if p.fits]
        if not fitting:
            return min(tried, key=lambda p: max(m / c for m, c in zip(p.memory_bytes, p.capacity_bytes)))
        return min(fitting, key=lambda p: p.step_time_s)
    from planner.planners.hetero import hetero_partition
    from planner.search.partition import BlockCosts

    ph = phones_of(cluster)[:phones] if phones else phones_of(cluster)
    k = len(ph)
    blocks = sorted({layer.block for layer in model.layers if layer.block is not None})
    n = len(blocks)
    if k > n:
        raise BadInput(f"{k} phones but the model has only {n} blocks")
    if workload.global_batch % mbs:
        raise BadInput(f"global batch {workload.global_batch} is not divisible by mbs {mbs}")
    m = workload.global_batch // mbs
    dtype = workload.dtype if workload.dtype in ("fp16", "fp32") else "fp16"
    s = workload.seq_len
    p0 = ph[0]
    # one block's split (identical phones: the same on all); the head's split on the last phone
    sub_block = sublayers(model, p0, mbs, s, dtype, 1, with_head=False)
    split = solve_split(sub_block)
    one = {mode: solve_split(sub_block, mode).time_s for mode in ("both", "gpu", "cpu")}
    one["both"] = split.time_s
    head_subs = [x for x in sublayers(model, p0, mbs, s, dtype, 0, with_head=True) if x.name == "head"]
    head_split = solve_split(head_subs) if head_subs else None
    head_s = head_split.time_s if head_split else 0.0
    # per-block memory: model states (dp 1, ZeRO 0) and saved activations of one micro-batch
    params = np.zeros(n)
    acts = np.zeros(n)
    pos = {blk: i for i, blk in enumerate(blocks)}
    e_act = activation_bytes(dtype)
    extra_pre = extra_post = 0.0
    act_pre = act_post = 0.0
    seen_block = False
    for layer in model.topological():
        if layer.block is not None:
            seen_block = True
            i = pos[layer.block]
            params[i] += layer.params() if layer.trainable else 0
            acts[i] += float(layer.activation_bytes(mbs, s, 1, 1, False, "none", e_act))
        elif not seen_block:
            extra_pre += layer.params()
            act_pre += float(layer.activation_bytes(mbs, s, 1, 1, False, "none", e_act))
        else:
            extra_post += layer.params()
            act_post += float(layer.activation_bytes(mbs, s, 1, 1, False, "none", e_act))

    def states(p):
        return memory.model_state_bytes(np.asarray(p, dtype=float), 1, 0, weight_dtype_bytes=EDGE_WEIGHT_BYTES,
                                        grad_dtype_bytes=EDGE_GRAD_BYTES, optimizer=workload.optimizer)["total"]

    t_block = np.full(n, split.time_s)
    costs = BlockCosts(time_s=t_block, act_bytes=acts, early_time_s=t_block, early_act_bytes=acts, params=params,
                       state_bytes=states(params), head_time_s=0.0, head_act_bytes=act_pre,
                       head_params=float(extra_pre), head_state_bytes=float(states(extra_pre)),
                       tail_time_s=head_s, tail_act_bytes=act_post, tail_params=float(extra_post),
                       tail_state_bytes=float(states(extra_post)))
    # 1F1B: phone i keeps min(k - i, m) micro-batches in flight (Narayanan et al. SC'21 section 2.2)
    inflight = np.array([min(k - i, m) for i in range(k)], dtype=float)
    caps = [p.memory_bytes for p in ph]
    try:
        part = hetero_partition([costs] * k, caps, inflight)
        fits = True
    except Infeasible:
        # report the least-memory split and say it does not fit
        part = hetero_partition([costs] * k, [math.inf] * k, inflight)
        fits = False
    # Wi-Fi: each boundary's activations (b s h e), all boundaries sending at once share the air
    fabric = cluster.fabric or cluster.nodes[0].nic_link
    nbytes = mbs * s * model.layers[0].hidden * e_act
    senders = max(1, k - 1)
    bw = fabric.bytes_per_s / (senders if fabric.shared_medium else 1) / (2 if fabric.half_duplex else 1)
    p2p = float(comm.p2p_time_s(nbytes, bw, fabric.latency_s)) if k > 1 else 0.0
    stage_t = list(part.stage_time_s)
    # forward : backward = 1 : 2 (the backward's two GEMMs per forward GEMM, compute.layer_time)
    fwd = [t / 3 for t in stage_t]
    bwd = [2 * t / 3 for t in stage_t]
    pipe = pipeline.simulate_times("1f1b", fwd, bwd, m, v=1, p2p_s=p2p) if k > 1 else None
    pipe_s = pipe.step_time_s if pipe else m * stage_t[0]
    # optimizer: AdamW streams 32 bytes per parameter through memory (estimate.py's optimizer step)
    stage_params = [float(params[lo:hi].sum()) + (extra_pre if i == 0 else 0) + (extra_post if i == k - 1 else 0)
                    for i, (lo, hi) in enumerate(part.ranges)]
    opt_s = max(p * 32 / (ph[i].gpu.memory_bandwidth_bytes_per_s * ph[i].gpu.efficiency.memory)
                for i, p in enumerate(stage_params))
    step = pipe_s + opt_s
    return EdgePlan(ranges=list(part.ranges), memory_bytes=list(part.stage_memory_bytes), capacity_bytes=caps,
                    split=split, step_time_s=step, tokens_per_s=workload.global_batch * s / step,
                    stage_time_s=stage_t, p2p_s=p2p, one_phone=one, fits=fits,
                    breakdown={"pipeline_s": pipe_s, "optimizer_s": opt_s,
                               "bubble_s": float(pipe.bubble_s) if pipe else 0.0,
                               "head_split": head_split.gpu_units if head_split else {}})
