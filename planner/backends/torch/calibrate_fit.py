"""The fitting of `calibrate --backend torch`: profile fields from the measurements (calibrate_measure.py),
each fitted so that the planner's own formulas (planner.cost) reproduce what was measured.

Separate from the measurements because the fits are plain arithmetic on recorded rows (tests call them on
made-up ones, without torch measuring anything) and from calibrate(), which only writes their results.
"""
from __future__ import annotations

import math

from planner.backends.torch.calibrate_measure import _decoder_step_case
from planner.errors import BadInput


def fit_gemm(rows: list[dict]) -> tuple[float, float]:
    """(peak FLOP/s, gemm_half_dim): the 80th percentile of the measured rates (one lucky, cache-resident
    shape on a shared machine should not set the peak), and the half-dim that best explains the rest as
    peak * d / (d + half), d = min(m, n, k) (least squares on log rate, grid search)."""
    import numpy as np

    peak = float(np.percentile([r["flops_per_s"] for r in rows], 80))
    best = (float("inf"), 0.0)
    for half in [0.0] + [2 ** (i / 4) for i in range(0, 48)]:
        err = 0.0
        for r in rows:
            d = min(r["m"], r["n"], r["k"])
            pred = peak * d / (d + half)
            err += math.log(pred / r["flops_per_s"]) ** 2
        best = min(best, (err, half))
    return peak, best[1]


def fit_link(rows: list[dict], nproc: int) -> tuple[float, float, float]:
    """(bytes/s, latency s, rms log error) for which planner.cost.comm's all-reduce, all-gather and p2p
    formulas best match the measured times (grid search, least squares on log time)."""
    import numpy as np

    from planner.cost import comm
    from planner.hardware import CollectiveLink

    best = (float("inf"), 0.0, 0.0)
    for bw in np.logspace(7, 11.5, 91):
        for lat in np.logspace(-6.5, -2, 91):
            link = CollectiveLink(bus_bytes_per_s=bw, latency_s=lat, level="intra-node", ranks=nproc, nodes=1)
            err = 0.0
            for r in rows:
                s = r["bytes"]
                err += math.log(comm.all_reduce_time_s(s, link) / r["all_reduce_s"]) ** 2
                err += math.log(comm.all_gather_time_s(s, link) / r["all_gather_s"]) ** 2
                err += math.log(comm.p2p_time_s(s, bw, lat) / r["p2p_s"]) ** 2
            if err < best[0]:
                best = (err, float(bw), float(lat))
    err, bw, lat = best
    return bw, lat, math.sqrt(err / (3 * len(rows)))


def fit_layer_overhead_s(device_fields: dict, measured: float) -> dict:
    """Charge what the device profile does not explain of the decoder step's measured time (`measured`
    seconds, measure_decoder_step) to every layer's forward and backward passes (3 passes' worth per layer
    per micro-batch)."""
    from planner.cost.estimate import estimate
    from planner.plan import ParallelPlan

    graph, workload = _decoder_step_case()
    cluster = _one_device_cluster(device_fields, layer_overhead_us=0.0)
    predicted = estimate(graph, cluster, workload, ParallelPlan(mbs=workload.global_batch)).step_time_s
    layers = len(graph.layers)
    overhead = max(0.0, (measured - predicted) / (3 * layers))
    return {"model_params": graph.params, "measured_step_s": measured, "predicted_without_s": predicted,
            "layers": layers, "layer_overhead_s": overhead}


def fit_tp_dispatch(tp_mlp: dict, bytes_per_s: float, latency_s: float) -> dict:
    """tp_dispatch_s: a third (one forward, two backward passes' worth, as layer_time charges overheads) of
    what the tiny DTensor MLP's forward + backward takes beyond the plain one (the rank's FFN share) and the
    two all-reduces (forward output, backward input gradient) that planner.cost.comm charges on the fitted
    link; never negative. tp_dispatch_ns_per_byte: the same at the small model's size, less that fixed
    part, per byte of the sublayer's activation (tokens x hidden x 4 B, what DTensor redistributes)."""
    from planner.cost import comm
    from planner.hardware import CollectiveLink

    link = CollectiveLink(bus_bytes_per_s=bytes_per_s, latency_s=latency_s, level="intra-node",
                          ranks=tp_mlp["tp"], nodes=1)

    def beyond(case, key="dtensor_fwd_bwd_s"):
        nbytes = case["tokens"] * case["hidden"] * 4
        link_s = 2 * float(comm.all_reduce_time_s(nbytes, link))
        return case[key] - case["plain_fwd_bwd_s"] - link_s, link_s, nbytes

    extra, link_s, _ = beyond(tp_mlp)
    # sequence parallel: an all-gather and a reduce-scatter of the same bytes in each pass
    nbytes = tp_mlp["tokens"] * tp_mlp["hidden"] * 4
    sp_link_s = 2 * float(comm.all_gather_time_s(nbytes, link) + comm.reduce_scatter_time_s(nbytes, link))
    sp_extra = tp_mlp["sp_dtensor_fwd_bwd_s"] - tp_mlp["plain_fwd_bwd_s"] - sp_link_s
    fixed = max(0.0, extra) / 3
    out = {"link_s": link_s, "tp_dispatch_s": fixed, "sp_link_s": sp_link_s, "sp_dispatch_s": max(0.0, sp_extra) / 3}
    if "large" in tp_mlp:
        big, big_link_s, big_bytes = beyond(tp_mlp["large"])
        out.update({"large_link_s": big_link_s, "large_extra_s": big,
                    "tp_dispatch_ns_per_byte": max(0.0, big / 3 - fixed) / big_bytes * 1e9})
    return out


def fit_shard_copy(fsdp: dict, bytes_per_s: float, latency_s: float, nproc: int) -> dict:
    """ns per byte copied (Efficiency.shard_copy_ns_per_byte) from calibrate_step.fsdp_copy: the FSDP2 stack's
    time beyond the plain stack and its collectives on the fitted link (per block, a gather in forward and
    again in backward, a reduce-scatter of the gradients: estimate.dp_sync_s's ZeRO-3 count), over the
    bytes estimate.shard_copy_s charges for it (fp32: 2 gathers x 4 B + 4 B of gradient per parameter)."""
    from planner.cost import comm
    from planner.hardware import CollectiveLink

    link = CollectiveLink(bus_bytes_per_s=bytes_per_s, latency_s=latency_s, level="intra-node", ranks=nproc,
                          nodes=1)
    link_s = sum(2 * float(comm.all_gather_time_s(p * 4, link)) + float(comm.reduce_scatter_time_s(p * 4, link))
                 for p in fsdp["per_layer_params"])
    extra = fsdp["fsdp_fwd_bwd_s"] - fsdp["plain_fwd_bwd_s"] - link_s
    copied = fsdp["params"] * (2 * 4 + 4)
    return {"link_s": link_s, "extra_s": extra, "bytes": copied, "ns_per_byte": max(0.0, extra) / copied * 1e9}


def _one_device_cluster(device_fields: dict, **efficiency):
    """A one-device cluster carrying a device built from `device_fields` (for fitting, before the profile
    is written): any one-device node type of the catalog with its device swapped."""
    from planner import catalog
    from planner.hardware import Device

    dev = Device.model_validate(device_fields)
    if efficiency:
        dev = dev.model_copy(update={"efficiency": dev.efficiency.model_copy(update=efficiency)})
    for name in catalog.names("nodes"):
        node = catalog.node_type(name)
        if sum(s.count for s in node.devices) == 1:
            cluster = catalog.load_cluster(name, 1)
            refs = [cluster.devices[0].model_copy(update={"device": dev})]
            return cluster.model_copy(update={"devices": refs})
    raise BadInput("the catalog has no one-device node type to fit against")  # pragma: no cover
