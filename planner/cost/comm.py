"""Communication cost: collective and point-to-point times, and traffic per parallelism.

Every function is pure and numpy-vectorizable: sizes may be Python numbers or numpy arrays (they broadcast), the
result is a float for scalar inputs and an ndarray otherwise. Units are in the names: `_s` seconds, `_bytes` bytes,
`bytes_per_s` bytes per second.

**Collective times** follow the alpha-beta model (docs/formulas.md#comm-alpha-beta) with the bandwidth term written in
nccl-tests bus bandwidth (docs/formulas.md#comm-nccl, `NVIDIA/nccl-tests doc/PERFORMANCE.md`), which is what
`CollectiveLink.bus_bytes_per_s` holds, and the latency term of NCCL's own tuner (`NVIDIA/nccl src/graph/tuning.cc`):

    time = base + (nsteps - nInter) * intraLat + nInter * interLat  +  factor * S / busbw

with `factor` 2(n-1)/n for all-reduce, (n-1)/n for reduce-scatter, all-gather and all-to-all, 1 for broadcast, and S
the full buffer (for RS/AG: count per rank x n; for all-to-all: what one rank sends to all ranks). A collective over
one rank, or of zero bytes, takes no time (NCCL's tuner also sets the one-rank cost to 0, src/enqueue.cc).

`CollectiveLink.latency_s` is the slowest per-hop latency the set crosses (NCCL's hwLat for NVLink, PCI or NET), so
it is used as interLat; intraLat defaults to the same value and can be given (`intra_latency_s`) when a set spans
nodes and the faster intra-node hop is known (hardware.py does not carry it separately).

**Traffic helpers** return BYTES each device puts on the wire (docs/formulas.md#comm-traffic), not time. For a ring collective the
bandwidth time is exactly `wire_bytes / link.bus_bytes_per_s` (that is how busbw is defined); the latency term is one
`latency` per collective the helper's docstring counts. Per micro-batch helpers count forward + backward.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np

from planner.core.hardware import CollectiveLink

# --- NCCL tuner constants (NVIDIA/nccl src/graph/tuning.cc @5067397, quoted in docs/formulas.md#comm-nccl) --------
# Base latency per collective launch, LL protocol. The catalog's per-hop link latencies are NCCL's LL values
# (NVLink 0.6 us, NET 2.7 us), so the LL base goes with them; NCCL itself picks LL for small messages, where the
# latency term matters. Callers wanting the Simple protocol pass base_latency_s=NCCL_SIMPLE_BASE_LATENCY_S.
NCCL_RING_BASE_LATENCY_S = 6.6e-6  # tuning.cc baseLat[Ring][LL]
NCCL_TREE_BASE_LATENCY_S = 6.8e-6  # tuning.cc baseLat[Tree][LL]
NCCL_SIMPLE_BASE_LATENCY_S = 8.4e-6  # tuning.cc baseLat[Ring][Simple] (Tree/Simple is also 8.4 us in docs/formulas.md#comm-nccl)
# Tree all-reduce algorithm bandwidth is 0.5 x busBw in the tuner ("ratio *= .5"); NCCL's further x0.92 tree
# refinement is left out (not in docs/formulas.md).
NCCL_TREE_ALGBW_FRACTION = 0.5

AllReduceAlgorithm = Literal["ring", "tree", "auto"]
Protocol = Literal["LL", "LL128", "Simple", "auto"]

# NCCL's three protocols (tuning.cc @5067397, docs/formulas.md#comm-nccl): base latency per algorithm, per-hop latency
# by link class (NVLink 0.6/1.9/3.4 us, NET 2.7/4.0/14 us for LL/LL128/Simple), and the share of each
# packet that is data (LL sends 4 bytes of flag with every 4 of data; LL128 120 of 128 bytes; Simple all).
# The catalog's link latencies are the LL figures; the other protocols scale them by NCCL's ratios. NCCL
# picks the fastest protocol per size, as `protocol="auto"` does: LL for small messages, Simple for large
# ones, whose per-hop latency is what a ring over thousands of ranks pays.
PROTOCOLS = ("LL", "LL128", "Simple")
RING_BASE_LATENCY_S = {"LL": 6.6e-6, "LL128": 14e-6, "Simple": 8.4e-6}
TREE_BASE_LATENCY_S = {"LL": 6.8e-6, "LL128": 14e-6, "Simple": 8.4e-6}
HOP_LATENCY_SCALE = {"intra": {"LL": 1.0, "LL128": 1.9 / 0.6, "Simple": 3.4 / 0.6},
                     "inter": {"LL": 1.0, "LL128": 4.0 / 2.7, "Simple": 14.0 / 2.7}}
DATA_FRACTION = {"LL": 0.5, "LL128": 120 / 128, "Simple": 1.0}


def _protocols(protocol: str) -> tuple[str, ...]:
    if protocol == "auto":
        return PROTOCOLS
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be LL, LL128, Simple or auto, got {protocol!r}")
    return (protocol,)


# --- helpers ----------------------------------------------------------------------------------------------------

def _bytes(nbytes) -> np.ndarray:
    a = np.asarray(nbytes, dtype=float)
    if np.any(a < 0):
        raise ValueError("byte counts must be non-negative")
    return a


def _out(x, *inputs):
    """float when every input is a scalar, else an ndarray."""
    x = np.asarray(x, dtype=float)
    if x.ndim == 0 and all(np.ndim(i) == 0 for i in inputs):
        return float(x)
    return x


def _hop_latencies_s(link: CollectiveLink, intra_latency_s: float | None,
                     protocol: str = "LL") -> tuple[float, float]:
    """(intraLat, interLat) per hop for a protocol: interLat is the link's (slowest) latency, intraLat the
    given value, else the link's intra-node hop latency, else the same as interLat."""
    inter = float(link.latency_s)
    if intra_latency_s is not None:
        intra = float(intra_latency_s)
    elif link.intra_latency_s is not None:
        intra = float(link.intra_latency_s)
    else:
        intra = inter
    inter_class = "inter" if link.nodes > 1 else "intra"
    return intra * HOP_LATENCY_SCALE["intra"][protocol], inter * HOP_LATENCY_SCALE[inter_class][protocol]


def _ring_latency_s(link: CollectiveLink, nsteps: int, n_inter: int, base_latency_s: float | None,
                    intra_latency_s: float | None, protocol: str = "LL") -> float:
    """NCCL tuning.cc ring: lat = base + (nsteps - nInter) * intraLat + nInter * interLat."""
    base = RING_BASE_LATENCY_S[protocol] if base_latency_s is None else base_latency_s
    intra, inter = _hop_latencies_s(link, intra_latency_s, protocol)
    n_inter = n_inter if link.nodes > 1 else 0
    return base + (nsteps - n_inter) * intra + n_inter * inter


def _finish(t, s: np.ndarray, link: CollectiveLink, nbytes):
    """Zero for one rank or zero bytes; scalar in, float out."""
    if link.ranks <= 1:
        return _out(np.zeros_like(s), nbytes)
    return _out(np.where(s > 0, t, 0.0), nbytes)


# --- collectives ------------------------------------------------------------------------------------------------

def all_reduce_time_s(nbytes, link: CollectiveLink, *, algorithm: AllReduceAlgorithm = "auto",
                      base_latency_s: float | None = None, intra_latency_s: float | None = None,
                      protocol: Protocol = "auto"):
    """All-reduce of an `nbytes` buffer over `link.ranks` ranks.

    ring: base + (2(n-1) - 2(N-1)) * intraLat + 2(N-1) * interLat + 2(n-1)/n * S / busbw  (N = link.nodes; the
          2(n-1)/n * S / busbw term is nccl-tests PERFORMANCE.md, the latency NCCL tuning.cc).
    tree: base + 2 * ((n/N - 1) * intraLat + log2(N) * interLat) + S / (0.5 * busbw)  (NCCL tuning.cc; log2 is
          NCCL's integer log2i).
    auto: the faster of the two per size, as NCCL's tuner does: tree wins small messages across many nodes by its
          logarithmic latency, ring wins large messages by bandwidth. On one node ring always wins.
    `base_latency_s` overrides both algorithms' base (default NCCL_RING/TREE_BASE_LATENCY_S).
    """
    if algorithm not in ("ring", "tree", "auto"):
        raise ValueError(f"algorithm must be ring, tree or auto, got {algorithm!r}")
    s = _bytes(nbytes)
    n, nodes = link.ranks, link.nodes
    if n <= 1:
        return _finish(s, s, link, nbytes)
    best = None
    for proto in _protocols(protocol):
        bw = link.bus_bytes_per_s * DATA_FRACTION[proto]
        ring = _ring_latency_s(link, 2 * (n - 1), 2 * (nodes - 1), base_latency_s, intra_latency_s, proto) \
            + 2.0 * (n - 1) / n * s / bw
        intra, inter = _hop_latencies_s(link, intra_latency_s, proto)
        base = TREE_BASE_LATENCY_S[proto] if base_latency_s is None else base_latency_s
        log2_nodes = max(int(nodes), 1).bit_length() - 1  # NCCL log2i: floor(log2)
        tree = base + 2.0 * ((n / nodes - 1) * intra + log2_nodes * inter) + s / (NCCL_TREE_ALGBW_FRACTION * bw)
        t = {"ring": ring, "tree": tree, "auto": np.minimum(ring, tree)}[algorithm]
        best = t if best is None else np.minimum(best, t)
    return _finish(best, s, link, nbytes)


def reduce_scatter_time_s(nbytes, link: CollectiveLink, *, base_latency_s: float | None = None,
                          intra_latency_s: float | None = None, protocol: Protocol = "auto"):
    """Ring reduce-scatter of a full buffer of `nbytes` (count per rank x n): latency over n-1 steps, N-1 of them
    between nodes (NCCL tuning.cc), plus (n-1)/n * S / busbw (nccl-tests PERFORMANCE.md), for the fastest
    protocol."""
    s = _bytes(nbytes)
    n = link.ranks
    if n <= 1:
        return _finish(s, s, link, nbytes)
    best = None
    for proto in _protocols(protocol):
        t = _ring_latency_s(link, n - 1, link.nodes - 1, base_latency_s, intra_latency_s, proto) \
            + (n - 1) / n * s / (link.bus_bytes_per_s * DATA_FRACTION[proto])
        best = t if best is None else np.minimum(best, t)
    return _finish(best, s, link, nbytes)


def all_gather_time_s(nbytes, link: CollectiveLink, *, base_latency_s: float | None = None,
                      intra_latency_s: float | None = None, protocol: Protocol = "auto"):
    """Ring all-gather into a full buffer of `nbytes` (count per rank x n); same cost as reduce-scatter
    (docs/formulas.md#comm-alpha-beta ring rows without the reduction term; NCCL tuning.cc uses the same step counts)."""
    return reduce_scatter_time_s(nbytes, link, base_latency_s=base_latency_s, intra_latency_s=intra_latency_s,
                                 protocol=protocol)


def all_to_all_time_s(nbytes, link: CollectiveLink, *, base_latency_s: float | None = None,
                      inter_node_bytes_per_s: float | None = None):
    """All-to-all where each rank sends `nbytes` in total (one equal slice to every rank, itself included).

    Pairwise exchange (docs/formulas.md#comm-alpha-beta, MPICH): (n-1) alpha + (n-1)/n * S / busbw (nccl-tests factor (n-1)/n), with
    alpha = link.latency_s and one NCCL base latency for the launch.

    `link.bus_bytes_per_s` is a ring bandwidth: across nodes it is the node's NICs summed, which an all-to-all cannot
    use (every rank's off-node slices leave through its own NIC). Give `inter_node_bytes_per_s`, the per-rank
    bandwidth off the node, and the bandwidth term becomes the slower of the intra-node part (n/N - 1)/n * S / busbw
    and the off-node part (1 - 1/N) * S / inter_node_bytes_per_s (Δ: our model, ranks spread evenly over N nodes).
    """
    s = _bytes(nbytes)
    n, nodes = link.ranks, link.nodes
    if n <= 1:
        return _finish(s, s, link, nbytes)
    base = NCCL_RING_BASE_LATENCY_S if base_latency_s is None else base_latency_s
    lat = base + (n - 1) * link.latency_s
    if inter_node_bytes_per_s is None or nodes <= 1:
        bw_time = (n - 1) / n * s / link.bus_bytes_per_s
    else:
        intra = (n / nodes - 1) / n * s / link.bus_bytes_per_s
        inter = (1 - 1 / nodes) * s / inter_node_bytes_per_s
        bw_time = np.maximum(intra, inter)
    return _finish(lat + bw_time, s, link, nbytes)


def _distinct_nodes(topk: int, nodes: int, groups: int, topk_groups: int) -> float:
    n = int(nodes)
    if n <= 1:
        return float(n)
    if groups and topk_groups < groups and groups % n == 0:
        # r groups per node; the token's topk_groups groups hold j of a node's r with hypergeometric odds,
        # and each of its k experts lies in one of those groups (uniformly)
        r = groups // n
        total = math.comb(groups, topk_groups)
        touched = sum(math.comb(r, j) * math.comb(groups - r, topk_groups - j) / total
                      * (1 - (1 - j / topk_groups) ** topk) for j in range(1, min(r, topk_groups) + 1))
        return n * touched
    return n * (1 - (1 - 1 / n) ** topk)


def remote_nodes_per_token(topk: int, nodes, groups: int = 0, topk_groups: int = 0) -> np.ndarray | float:
    """Expected number of other nodes one token's top-k experts live on, the experts spread evenly over
    `nodes` nodes and chosen independently: a node holds none of the k with probability (1 - 1/N)^k, so
    N (1 - (1 - 1/N)^k) nodes are touched, and by symmetry (N - 1)/N of them are not the token's own
    (Δ: our model; with replacement, which slightly overcounts repeats). Group-limited routing
    (DeepSeek-V3 section 2.1.2: each token reaches at most topk_groups of `groups` expert groups, the groups
    laid out whole on nodes) touches fewer: a node holding j of the token's groups is touched with
    probability 1 - (1 - j/topk_groups)^k, j hypergeometric. Groups that do not divide evenly over the nodes
    are treated as unlimited routing (more nodes, so a slower exchange)."""
    f = np.vectorize(lambda n: _distinct_nodes(topk, n, groups, topk_groups) * (n - 1) / n if n > 1 else 0.0,
                     otypes=[float])
    out = f(np.asarray(nodes))
    return float(out) if out.ndim == 0 else out


def deduplicated_dispatch_time_s(copy_bytes, topk: int, link: CollectiveLink, *,
                                 inter_node_bytes_per_s: float | None = None, base_latency_s: float | None = None,
                                 groups: int = 0, topk_groups: int = 0):
    """MoE dispatch (or combine) with DeepEP's node-deduplicated exchange (DeepSeek-V3 report section 3.2.2;
    deepseek-ai/DeepEP; Megatron --moe-token-dispatcher-type flex --moe-enable-deepep): a token crosses the
    fabric once per destination node, then NVLink forwards it to the experts there, instead of once per
    expert as an all-to-all of its topk copies does. `copy_bytes`: one rank's tokens x hidden x bytes (one
    copy each). Off the node: remote_nodes_per_token copies through the rank's own NIC share; inside: its
    topk copies, of which (n/N - 1)/n stay on the node as in all_to_all_time_s; the slower of the two plus
    all_to_all_time_s's latency. Within one node it is that all-to-all."""
    s = _bytes(copy_bytes)
    n, nodes = link.ranks, link.nodes
    if n <= 1 or nodes <= 1 or inter_node_bytes_per_s is None:
        return all_to_all_time_s(copy_bytes * topk, link, base_latency_s=base_latency_s,
                                 inter_node_bytes_per_s=inter_node_bytes_per_s)
    base = NCCL_RING_BASE_LATENCY_S if base_latency_s is None else base_latency_s
    lat = base + (n - 1) * link.latency_s
    intra = (n / nodes - 1) / n * s * topk / link.bus_bytes_per_s
    inter = remote_nodes_per_token(topk, nodes, groups, topk_groups) * s / inter_node_bytes_per_s
    return _finish(lat + np.maximum(intra, inter), s, link, copy_bytes)


def broadcast_time_s(nbytes, link: CollectiveLink, *, base_latency_s: float | None = None,
                     intra_latency_s: float | None = None):
    """Ring (pipelined) broadcast of `nbytes`: S / busbw (nccl-tests factor 1) plus NCCL tuning.cc ring latency with
    nsteps = n and nInter = N for broadcast/reduce."""
    s = _bytes(nbytes)
    n = link.ranks
    if n <= 1:
        return _finish(s, s, link, nbytes)
    t = _ring_latency_s(link, n, link.nodes, base_latency_s, intra_latency_s) + s / link.bus_bytes_per_s
    return _finish(t, s, link, nbytes)


def p2p_time_s(nbytes, bytes_per_s, latency_s):
    """Point-to-point send of `nbytes`: alpha + n * beta (docs/formulas.md#comm-alpha-beta). Zero bytes, or an infinite bandwidth
    with zero latency (a device to itself, Cluster.p2p(a, a)), take no time. All arguments broadcast."""
    s = _bytes(nbytes)
    bw = np.asarray(bytes_per_s, dtype=float)
    lat = np.asarray(latency_s, dtype=float)
    if np.any(bw <= 0) or np.any(lat < 0):
        raise ValueError("bytes_per_s must be positive and latency_s non-negative")
    t = np.where(s > 0, lat + s / bw, 0.0)
    return _out(t, nbytes, bytes_per_s, latency_s)


# --- traffic per parallelism (bytes on the wire per device; docs/formulas.md#comm-traffic) -------------------------------------

def tp_bytes_per_layer(b, s, h, dtype_bytes, tp, sp: bool = False, recompute: bool = False):
    """Tensor-parallel bytes per transformer layer per device per micro-batch, forward + backward.

    Megatron: 2 all-reduces forward + 2 backward of b*s*h each -> 8*b*s*h*(t-1)/t elements (Narayanan 2021 §2.3,
    §3.2); with SP each all-reduce becomes AG + RS of the same volume (Korthikanti 2022 §4.2.2), so `sp` does not
    change the bytes (it changes the collective count: 4 AG + 4 RS instead of 4 AR). Full recompute re-runs the
    forward: 6 all-reduces, 12*b*s*h*(t-1)/t (ZeRO §8).
    """
    del sp  # same volume (Korthikanti 2022 §4.2.2)
    n_allreduce = 6 if recompute else 4
    t = np.asarray(tp, dtype=float)
    return _out(n_allreduce * 2.0 * (t - 1) / t * np.asarray(b, dtype=float) * s * h * dtype_bytes,
                b, s, h, dtype_bytes, tp)


def dp_grad_bytes(params_per_device, grad_dtype_bytes, dp, zero_stage: int = 0):
    """Data-parallel gradient bytes per device per step.

    Stages 0-2: an all-reduce (or RS of grads + AG of updated params, same volume) moves 2*Psi*(d-1)/d (ZeRO
    §7.1, §7.2.1; docs/formulas.md#comm-traffic gives the large-d 2*Psi). Stage 3: the gradient reduce-scatter alone,
    Psi*(d-1)/d; its parameter gathers are zero3_param_gather_bytes (ZeRO §7.2.2).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    d = np.asarray(dp, dtype=float)
    factor = 1.0 if zero_stage == 3 else 2.0
    return _out(factor * (d - 1) / d * np.asarray(params_per_device, dtype=float) * grad_dtype_bytes,
                params_per_device, grad_dtype_bytes, dp)


def zero3_param_gather_bytes(params_per_device, param_dtype_bytes, dp):
    """ZeRO-3 / FSDP parameter all-gathers per device per step: forward + backward, 2*Psi*(d-1)/d (ZeRO §7.2.2;
    with the gradient RS, 3*Psi = 1.5x DP)."""
    d = np.asarray(dp, dtype=float)
    return _out(2.0 * (d - 1) / d * np.asarray(params_per_device, dtype=float) * param_dtype_bytes,
                params_per_device, param_dtype_bytes, dp)


def pp_boundary_bytes(b, s, h, dtype_bytes, tp=1, sp: bool = False, scatter_gather: bool = False):
    """Pipeline p2p message per micro-batch between adjacent stages, one direction (activations forward; the
    gradient backward is the same size): b*s*h, or b*s*h/t with the scatter/gather optimization or SP, whose
    boundary activation is already split over the TP ranks (Narayanan 2021 §3.2, §4.1). Interleaving sends it v
    times per micro-batch; the caller multiplies."""
    split = np.asarray(tp, dtype=float) if (sp or scatter_gather) else 1.0
    return _out(np.asarray(b, dtype=float) * s * h * dtype_bytes / split, b, s, h, dtype_bytes, tp)


def cp_kv_bytes_per_layer(b, s, n_kv, d_h, cp, dtype_bytes):
    """Context-parallel (Megatron ring) bytes per layer per device per micro-batch, forward + backward.

    Forward: (c-1) * 2 * (s/c) * b * n_kv * d_h (K and V of every other rank's chunk, p2p in a ring); backward twice
    that (KV re-gathered + dKV), so 3x the forward (docs/formulas.md#comm-traffic, Δ; Megatron context_parallel.md). GQA/MQA enter
    through n_kv.
    """
    c = np.asarray(cp, dtype=float)
    fwd = (c - 1) * 2.0 * (np.asarray(s, dtype=float) / c) * b * n_kv * d_h * dtype_bytes
    return _out(3.0 * fwd, b, s, n_kv, d_h, cp, dtype_bytes)


def ep_dispatch_bytes(tokens, topk, h, dtype_bytes, ep):
    """Expert-parallel bytes one device sends in ONE token dispatch all-to-all: tokens*topk*h*(e-1)/e, uniform
    routing (docs/formulas.md#comm-traffic, Δ). Combine moves the same, and forward and backward each do dispatch + combine: x4
    per MoE layer per micro-batch (Megatron moe/README.md alltoall dispatcher). `tokens` is the rank's local
    tokens (b*s); pass tokens*topk*h*dtype_bytes as `nbytes` to all_to_all_time_s."""
    e = np.asarray(ep, dtype=float)
    return _out(np.asarray(tokens, dtype=float) * topk * h * dtype_bytes * (e - 1) / e,
                tokens, topk, h, dtype_bytes, ep)
