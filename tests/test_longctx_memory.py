"""Memory at millions of tokens (issue 9): the ring context-parallel forward's retained step buffers
(longctx.ring_forward_buffers_bytes, after Transformer Engine's AttnFuncWithCPAndKVP2P) and the 7B / 4M-token /
128 A100 case."""
from __future__ import annotations

import math

import pytest

from planner.app.api import load_cluster
from planner.core.builders import TransformerConfig, build_transformer
from planner.core.plan import ParallelPlan, Workload
from planner.cost import longctx
from planner.cost.batch import estimate_batch
from planner.cost.estimate import estimate

S_4M = 4 * 2**20


def seven_b():
    return build_transformer(TransformerConfig(name="llama2-7b", layers=32, hidden=4096, heads=32, kv_heads=32,
                                               ffn_hidden=11008, vocab=32000, max_seq=S_4M))


def test_ring_buffers_hand_case():
    att = next(layer for layer in seven_b().layers if layer.kind == "attention")
    # cp 128, tp 1, 4M tokens: every step's K/V (the whole sequence's: 2 x 4096 per token in bf16), every step's
    # bf16 partial output (4096 per token) and fp32 LSE (32 heads), and the fp32 merge of the 32768 local queries
    kv = S_4M * 2 * 4096 * 2
    outs = S_4M * (4096 * 2 + 4 * 32)
    merged = S_4M // 128 * 4096 * 4
    assert longctx.ring_forward_buffers_bytes(att, 1, S_4M, S_4M, 1, 128, 2) == kv + outs + merged
    assert (kv + outs + merged) / 1e9 == pytest.approx(104.2, abs=0.1)  # more than an 80 GB A100 holds
    # tp splits the heads; the K/V of every step does not shrink with cp (cp blocks of s/cp tokens)
    assert longctx.ring_forward_buffers_bytes(att, 1, S_4M, S_4M, 4, 128, 2) == pytest.approx((kv + outs + merged) / 4)
    assert longctx.ring_forward_buffers_bytes(att, 1, S_4M, S_4M, 1, 1, 2) == 0.0
    mlp = next(layer for layer in seven_b().layers if layer.kind == "mlp")
    assert longctx.ring_forward_buffers_bytes(mlp, 1, S_4M, S_4M, 1, 128, 2) == 0.0


def test_ring_buffers_in_the_estimate_beyond_the_working_set():
    m, c = seven_b(), load_cluster("dgx-a100-80gb", 16)
    w = Workload(global_batch=1, seq_len=S_4M)
    att = next(layer for layer in m.layers if layer.kind == "attention")
    ring = estimate(m, c, w, ParallelPlan(cp=128, mbs=1, zero=3, recompute="full"))
    buffers = longctx.ring_forward_buffers_bytes(att, 1, S_4M, S_4M, 1, 128, 2)
    assert ring.memory["cp_ring_buffers_bytes"] == pytest.approx(buffers - ring.memory["backward_working_bytes"])
    assert not ring.fits  # tp1 cp128 ring: the forward's step buffers alone exceed the device
    # Ulysses keeps no per-step buffers; cp 1 has no ring
    a2a = estimate(m, load_cluster("dgx-a100-80gb", 4), w, ParallelPlan(cp=32, mbs=1, zero=3, recompute="full",
                                                                        cp_comm="a2a"))
    assert a2a.memory["cp_ring_buffers_bytes"] == 0.0
    short = estimate(m, load_cluster("dgx-a100-80gb", 1), Workload(global_batch=8, seq_len=4096),
                     ParallelPlan(dp=8, mbs=1))
    assert short.memory["cp_ring_buffers_bytes"] == 0.0
    # the batch estimate carries the same term
    plans = [ParallelPlan(cp=128, mbs=1, zero=3, recompute="full"),
             ParallelPlan(tp=4, cp=32, mbs=1, zero=1, sp=True, recompute="full"),
             ParallelPlan(tp=2, pp=2, cp=32, mbs=1, zero=1, sp=True, recompute="full", seq_chunks=8)]
    got = estimate_batch(m, c, w, plans)
    for i, p in enumerate(plans):
        want = estimate(m, c, w, p)
        assert math.isclose(got["peak_memory_bytes"][i], want.peak_memory_bytes, rel_tol=1e-9)
        assert got["fits"][i] == want.fits
