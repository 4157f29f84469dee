"""Efficiency.tp_dispatch_us / sp_dispatch_us: a tensor-parallel framework's host cost per split sublayer
(DTensor on the torch backend, measured by `calibrate --backend torch`), charged by compute.layer_time, so
that estimate() and estimate_batch() carry it alike."""
from __future__ import annotations

import math

import pytest

from planner.catalog import load_cluster
from planner.core.plan import ParallelPlan, Workload
from planner.cost.batch import estimate_batch
from planner.cost.compute import layer_time
from planner.cost.estimate import estimate
from planner.importers import load_model

TP_US, SP_US = 700.0, 1100.0


def _with_dispatch(cluster, **fields):
    devices = []
    for ref in cluster.devices:
        d = ref.device
        devices.append(ref.model_copy(update={"device": d.model_copy(
            update={"efficiency": d.efficiency.model_copy(update=fields)})}))
    return cluster.model_copy(update={"devices": devices})


def test_layer_time_charges_split_sublayers_once_forward_twice_backward():
    graph = load_model("tiny-llama-20m")
    dev = load_cluster("dgx-h100", 1).devices[0].device
    fast = dev
    slow = dev.model_copy(update={"efficiency": dev.efficiency.model_copy(
        update={"tp_dispatch_us": TP_US, "sp_dispatch_us": SP_US})})
    for layer in graph.layers:
        for tp, sp in ((1, False), (2, False), (2, True)):
            a = layer_time(layer, 2, 256, fast, "bf16", tp=tp, sp=sp)
            b = layer_time(layer, 2, 256, slow, "bf16", tp=tp, sp=sp)
            want = 0.0 if tp == 1 else (SP_US if sp else TP_US) * 1e-6
            assert float(b.fwd_s - a.fwd_s) == pytest.approx(want, abs=1e-12), (layer.kind, tp, sp)
            assert float(b.bwd_s - a.bwd_s) == pytest.approx(2 * want, abs=1e-12), (layer.kind, tp, sp)


def test_sp_dispatch_defaults_to_tp_dispatch():
    dev = load_cluster("dgx-h100", 1).devices[0].device
    layer = next(x for x in load_model("tiny-llama-20m").layers if x.kind == "mlp")
    one = dev.model_copy(update={"efficiency": dev.efficiency.model_copy(update={"tp_dispatch_us": TP_US})})
    base = layer_time(layer, 2, 256, dev, "bf16", tp=2, sp=True)
    got = layer_time(layer, 2, 256, one, "bf16", tp=2, sp=True)
    assert float(got.fwd_s - base.fwd_s) == pytest.approx(TP_US * 1e-6, abs=1e-12)


def test_batch_equals_scalar_with_tp_dispatch():
    graph = load_model("tiny-llama-20m")
    cluster = _with_dispatch(load_cluster("dgx-h100", 1), tp_dispatch_us=TP_US, sp_dispatch_us=SP_US)
    workload = Workload(global_batch=16, seq_len=256)
    plans = [ParallelPlan(tp=tp, dp=8 // tp, sp=sp, mbs=mbs, recompute=rc)
             for tp in (1, 2) for sp in ((False, True) if tp > 1 else (False,)) for mbs in (1, 2)
             for rc in ("none", "full")]
    plans += [ParallelPlan(tp=2, pp=2, dp=2, sp=True, mbs=1, schedule="1f1b"),
              ParallelPlan(tp=2, pp=2, dp=2, vpp=3, mbs=1, schedule="interleaved-1f1b")]
    got = estimate_batch(graph, cluster, workload, plans)
    plain = estimate_batch(graph, load_cluster("dgx-h100", 1), workload, plans)
    for i, plan in enumerate(plans):
        want = estimate(graph, cluster, workload, plan)
        assert math.isclose(got["step_time_s"][i], want.step_time_s, rel_tol=1e-9), plan
        assert (got["step_time_s"][i] > plain["step_time_s"][i]) == (plan.tp > 1), plan


def test_per_byte_part_grows_with_the_activation():
    # tp_dispatch_ns_per_byte: t x h x bytes of the sublayer's activation, once forward and twice backward,
    # on split layers only; doubling the tokens doubles it
    graph = load_model("tiny-llama-20m")
    dev = load_cluster("dgx-h100", 1).devices[0].device
    ns = 0.5
    slow = dev.model_copy(update={"efficiency": dev.efficiency.model_copy(update={"tp_dispatch_ns_per_byte": ns})})
    mlp = next(x for x in graph.layers if x.kind == "mlp")
    for b in (1, 2):
        for tp in (1, 2):
            a = layer_time(mlp, b, 256, dev, "bf16", tp=tp)
            c = layer_time(mlp, b, 256, slow, "bf16", tp=tp)
            want = 0.0 if tp == 1 else b * 256 * mlp.hidden * 2 * ns * 1e-9
            assert float(c.fwd_s - a.fwd_s) == pytest.approx(want, abs=1e-15)
            assert float(c.bwd_s - a.bwd_s) == pytest.approx(2 * want, abs=1e-15)


def _block_rows(a_tp, a_sp, ns, link, hidden=512, tp=2, noise=None):
    """Synthetic calibrate rows: a split block's time beyond the plain one, as the cost model charges it:
    the attention and MLP sublayers' dispatch (layer_time on the catalog H100 with the fields set, less
    without) plus four all-reduces of the activation on `link`."""
    from planner.core.model import Layer
    from planner.cost import comm

    dev = load_cluster("dgx-h100", 1).devices[0].device
    slow = dev.model_copy(update={"efficiency": dev.efficiency.model_copy(
        update={"tp_dispatch_us": a_tp * 1e6, "sp_dispatch_us": a_sp * 1e6, "tp_dispatch_ns_per_byte": ns})})
    layers = [x for x in load_model("tiny-llama-20m").layers if x.kind in ("attention", "mlp")][:2]
    layers = [Layer(**{**x.model_dump(), "hidden": hidden}) for x in layers]
    rows = []
    for i, (sp, tokens) in enumerate((sp, t) for sp in (False, True) for t in (64, 256, 1024)):
        dispatch = 0.0
        for layer in layers:
            fast_t = layer_time(layer, 1, tokens, dev, "fp32", tp=tp, sp=sp)
            slow_t = layer_time(layer, 1, tokens, slow, "fp32", tp=tp, sp=sp)
            dispatch += float(slow_t.fwd_s + slow_t.bwd_s - fast_t.fwd_s - fast_t.bwd_s)
        extra = dispatch + 4 * float(comm.all_reduce_time_s(tokens * hidden * 4, link))
        if noise is not None:
            extra *= 1 + noise[i]
        rows.append({"tokens": tokens, "sp": sp, "extra_s": extra, "dtensor_fwd_bwd_s": extra + 0.02 * tokens / 64,
                     "plain_fwd_bwd_s": 0.02 * tokens / 64})
    return {"tp": tp, "hidden": hidden, "rows": rows}


def test_block_fit_recovers_what_layer_time_charges():
    # calibrate's joint fit inverts compute.layer_time's dispatch terms plus layer_terms' all-reduces
    from planner.backends.torch.calibrate_fit import fit_tp_dispatch
    from planner.core.hardware import CollectiveLink

    bw, lat = 1.4e9, 1.1e-3
    link = CollectiveLink(bus_bytes_per_s=bw, latency_s=lat, level="intra-node", ranks=2, nodes=1)
    got = fit_tp_dispatch(_block_rows(0.4e-3, 1.2e-3, 2.5, link), bw, lat)
    assert got["tp_dispatch_s"] == pytest.approx(0.4e-3, rel=1e-6)
    assert got["sp_dispatch_s"] == pytest.approx(1.2e-3, rel=1e-6)
    assert got["tp_dispatch_ns_per_byte"] == pytest.approx(2.5, rel=1e-6)
    assert got["rms_rel_error"] < 1e-9


def test_block_fit_is_stable_under_noise_where_the_study_runs():
    # Two one-size fits (session 3) split the same box's DTensor cost as 0.71 ms + 2.6 ns/B and 0.05 ms +
    # 7.1 ns/B an hour apart. With three sizes per mode and 5% noise on every row, the charge the fit implies
    # at 512 tokens stays within 10% of the truth.
    import numpy as np

    from planner.backends.torch.calibrate_fit import fit_tp_dispatch
    from planner.core.hardware import CollectiveLink

    bw, lat = 1.4e9, 1.1e-3
    link = CollectiveLink(bus_bytes_per_s=bw, latency_s=lat, level="intra-node", ranks=2, nodes=1)
    a_tp, a_sp, ns = 1.0e-3, 1.5e-3, 3.0
    nbytes = 512 * 512 * 4
    truth = a_tp + ns * 1e-9 * nbytes
    rng = np.random.default_rng(7)
    for _ in range(20):
        got = fit_tp_dispatch(_block_rows(a_tp, a_sp, ns, link, noise=rng.uniform(-0.05, 0.05, 6)), bw, lat)
        charged = got["tp_dispatch_s"] + got["tp_dispatch_ns_per_byte"] * 1e-9 * nbytes
        assert charged == pytest.approx(truth, rel=0.10)
