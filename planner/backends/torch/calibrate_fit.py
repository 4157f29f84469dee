"""The fitting of `calibrate --backend torch`: profile fields from the measurements (calibrate_measure.py),
each fitted so that the planner's own formulas (planner.cost) reproduce what was measured.

Separate from the measurements because the fits are plain arithmetic on recorded rows (tests call them on
made-up ones, without torch measuring anything) and from calibrate(), which only writes their results.
"""
from __future__ import annotations

import math

import numpy as np

from planner.backends.torch.calibrate_measure import decoder_step_case
from planner.core.errors import BadInput


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
    formulas best match the measured times (least squares on log time: a coarse grid, then refined by
    Nelder-Mead in log space so the result does not snap to the grid's 12% steps)."""
    import numpy as np
    from scipy.optimize import minimize

    from planner.core.hardware import CollectiveLink
    from planner.cost import comm

    def sq_err(bw: float, lat: float) -> float:
        link = CollectiveLink(bus_bytes_per_s=bw, latency_s=lat, level="intra-node", ranks=nproc, nodes=1)
        err = 0.0
        for r in rows:
            s = r["bytes"]
            err += math.log(comm.all_reduce_time_s(s, link) / r["all_reduce_s"]) ** 2
            err += math.log(comm.all_gather_time_s(s, link) / r["all_gather_s"]) ** 2
            err += math.log(comm.p2p_time_s(s, bw, lat) / r["p2p_s"]) ** 2
        return err

    best = (float("inf"), 0.0, 0.0)
    for bw in np.logspace(7, 11.5, 46):
        for lat in np.logspace(-6.5, -2, 46):
            err = sq_err(bw, lat)
            if err < best[0]:
                best = (err, float(bw), float(lat))
    # within the grid's range: with only small messages (--quick) the bandwidth is not identified and an
    # unbounded search walks off to absurd values
    res = minimize(lambda v: sq_err(10 ** v[0], 10 ** v[1]), [math.log10(best[1]), math.log10(best[2])],
                   method="Nelder-Mead", bounds=[(7.0, 11.5), (-6.5, -2.0)],
                   options={"xatol": 1e-4, "fatol": 1e-10})
    if res.fun < best[0]:
        best = (float(res.fun), float(10 ** res.x[0]), float(10 ** res.x[1]))
    err, bw, lat = best
    return bw, lat, math.sqrt(err / (3 * len(rows)))


def fit_layer_overhead_s(device_fields: dict, measured: float) -> dict:
    """Charge what the device profile does not explain of the decoder step's measured time (`measured`
    seconds, measure_decoder_step) to every layer's forward and backward passes (3 passes' worth per layer
    per micro-batch)."""
    from planner.core.plan import ParallelPlan
    from planner.cost.estimate import estimate

    graph, workload = decoder_step_case()
    cluster = one_device_cluster(device_fields, layer_overhead_us=0.0)
    predicted = estimate(graph, cluster, workload, ParallelPlan(mbs=workload.global_batch)).step_time_s
    layers = len(graph.layers)
    overhead = max(0.0, (measured - predicted) / (3 * layers))
    return {"model_params": graph.params, "measured_step_s": measured, "predicted_without_s": predicted,
            "layers": layers, "layer_overhead_s": overhead}


def fit_tp_dispatch(tp_block: dict, bytes_per_s: float, latency_s: float) -> dict:
    """Efficiency.tp_dispatch_us, sp_dispatch_us and tp_dispatch_ns_per_byte, fitted jointly (non-negative
    least squares, each row weighted by the inverse of its split block's time, i.e. on relative error) to
    calibrate_measure.tp_block_times: what each split block takes beyond the plain one, less the four
    all-reduces (one per sublayer and pass) planner.cost.layer_terms charges on the fitted link, is what
    compute.layer_time charges for DTensor: per sublayer a + b x bytes forward and twice that backward, so
    6 (a + b x bytes) per block, with a = tp_dispatch_us or sp_dispatch_us and bytes = tokens x hidden x 4.
    Several sizes pin the split between a and b, which one size at each end of the range left to noise."""
    from scipy.optimize import nnls

    from planner.core.hardware import CollectiveLink
    from planner.cost import comm

    link = CollectiveLink(bus_bytes_per_s=bytes_per_s, latency_s=latency_s, level="intra-node",
                          ranks=tp_block["tp"], nodes=1)
    rows = tp_block["rows"]
    nbytes = np.array([r["tokens"] * tp_block["hidden"] * 4 for r in rows], dtype=float)
    sp = np.array([bool(r["sp"]) for r in rows])
    link_s = 4 * np.asarray(comm.all_reduce_time_s(nbytes, link), dtype=float)
    beyond = np.array([r["extra_s"] for r in rows]) - link_s
    design = 6 * np.column_stack([~sp, sp, nbytes]).astype(float)
    weight = 1.0 / np.array([r["dtensor_fwd_bwd_s"] for r in rows])
    (a_tp, a_sp, b), _ = nnls(design * weight[:, None], beyond * weight)
    fitted = design @ np.array([a_tp, a_sp, b]) + link_s
    for r, lk, fit in zip(rows, link_s, fitted):
        r.update({"link_s": float(lk), "fitted_extra_s": float(fit)})
    rel = (fitted - np.array([r["extra_s"] for r in rows])) / np.array([r["dtensor_fwd_bwd_s"] for r in rows])
    return {"tp_dispatch_s": float(a_tp), "sp_dispatch_s": float(a_sp), "tp_dispatch_ns_per_byte": float(b * 1e9),
            "rows": rows, "rms_rel_error": float(np.sqrt(np.mean(rel ** 2)))}


def fit_shard_copy(fsdp: dict, bytes_per_s: float, latency_s: float, nproc: int) -> dict:
    """ns per byte copied (Efficiency.shard_copy_ns_per_byte) from calibrate_step.fsdp_copy: the FSDP2 stack's
    time beyond the plain stack and its collectives on the fitted link (per block, a gather in forward and
    again in backward, a reduce-scatter of the gradients: estimate.dp_sync_s's ZeRO-3 count), over the
    bytes estimate.shard_copy_s charges for it (fp32: 2 gathers x 4 B + 4 B of gradient per parameter)."""
    from planner.core.hardware import CollectiveLink
    from planner.cost import comm

    link = CollectiveLink(bus_bytes_per_s=bytes_per_s, latency_s=latency_s, level="intra-node", ranks=nproc,
                          nodes=1)
    link_s = sum(2 * float(comm.all_gather_time_s(p * 4, link)) + float(comm.reduce_scatter_time_s(p * 4, link))
                 for p in fsdp["per_layer_params"])
    extra = fsdp["fsdp_fwd_bwd_s"] - fsdp["plain_fwd_bwd_s"] - link_s
    copied = fsdp["params"] * (2 * 4 + 4)
    return {"link_s": link_s, "extra_s": extra, "bytes": copied, "ns_per_byte": max(0.0, extra) / copied * 1e9}


def one_device_cluster(device_fields: dict, **efficiency):
    """A one-device cluster carrying a device built from `device_fields` (for fitting, before the profile
    is written): any one-device node type of the catalog with its device swapped."""
    from planner import catalog
    from planner.core.hardware import Device

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
