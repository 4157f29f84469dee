"""Generation cost (planner/cost/inference.py) and `estimate --infer` (planner.app.rl_job.run_infer): decode against
the bandwidth roofline worked out by hand, prefill against the FLOP count, the KV cache and its paged blocks, the
memory that bounds a batch, tensor and pipeline parallel engines, and the refusals."""
from __future__ import annotations

import pytest

from planner import catalog
from planner.app.rl_job import run_infer
from planner.core.builders import TransformerConfig, build_transformer
from planner.core.errors import BadInput, Infeasible
from planner.core.hardware import Device, Efficiency
from planner.cost import inference as inf
from planner.importers import load_model

# A small Llama-style model whose sizes are easy to count by hand.
L, H, A, KV, D, F, V = 4, 1024, 16, 4, 64, 4096, 32000
SMALL = build_transformer(TransformerConfig(name="small", layers=L, hidden=H, heads=A, kv_heads=KV, ffn_hidden=F,
                                            vocab=V, gated_mlp=True))
# GEMM weights one decode step reads: q and o (H x H each), k and v (H x KV*D each), gate, up and down
# (H x F each) per block, and the LM head (V x H). The embedding is a lookup of one row per token.
GEMM_PARAMS = L * (2 * H * H + 2 * H * KV * D + 3 * H * F) + V * H
KV_BYTES_PER_TOKEN = L * 2 * KV * D * 2  # K and V, bf16


def bare_device(bandwidth_gb_s=2000.0, memory_eff=0.8, tflops=1000.0, matmul=1.0, memory_gb=80.0) -> Device:
    """A device with no launch or framework overheads, so the roofline is all there is."""
    return Device(name="bare", source="test device", kind="gpu", peak_tflops={"bf16": tflops}, memory_gb=memory_gb,
                  memory_bandwidth_gb_s=bandwidth_gb_s,
                  efficiency=Efficiency(matmul=matmul, memory=memory_eff, attention=1.0, kernel_overhead_us=0,
                                        host_dispatch_us=0))


def test_decode_time_is_the_bandwidth_roofline_solved_by_hand():
    dev = bare_device()
    bw = 2000e9 * 0.8
    prompt, gen = 100, 201
    # gen - 1 steps after the prefill; step i reads every weight once and the cache of prompt + i tokens
    steps = range(1, gen)
    by_hand = sum((GEMM_PARAMS * 2 + KV_BYTES_PER_TOKEN * (prompt + i)) / bw for i in steps)
    got = inf.decode_time_s(SMALL, dev, 1, prompt, gen)
    # above the roofline only by the bytes of one token's activations and norms (well under 1%)
    assert by_hand <= got <= by_hand * 1.01
    # and one step at a long context: the KV read is now a visible part of it
    step = float(inf.decode_step_s(SMALL, dev, 1, 8192))
    roofline = (GEMM_PARAMS * 2 + KV_BYTES_PER_TOKEN * 8192) / bw
    assert roofline <= step <= roofline * 1.01


def test_long_decodes_sum_by_the_midpoint_rule_as_exactly_as_step_by_step():
    dev = bare_device()
    exact = sum(float(inf.decode_step_s(SMALL, dev, 8, 64 + i)) for i in range(1, 1000))
    assert inf.decode_time_s(SMALL, dev, 8, 64, 1000) == pytest.approx(exact, rel=1e-6)


def test_prefill_is_compute_bound_at_the_flop_count():
    # memory so fast that the norms and activations (memory-bound) vanish beside the GEMMs
    dev = bare_device(tflops=100.0, bandwidth_gb_s=99_000.0)
    b, s = 8, 2048
    # 2 x params x tokens for the blocks, the causal attention square (2 x b x s^2 x heads x 2d / 2), and the
    # head on the last token of each sequence
    flops = 2 * (GEMM_PARAMS - V * H) * b * s + L * 2 * b * s * s * A * 2 * D / 2 + 2 * V * H * b
    roofline = flops / 100e12
    got = float(inf.prefill_time_s(SMALL, dev, b, s))
    assert roofline <= got <= roofline * 1.01


def test_kv_cache_counts_layers_heads_and_paged_blocks():
    exact = KV_BYTES_PER_TOKEN * (100 + 57)
    paged = inf.kv_cache_bytes(SMALL, 100, 57)
    assert 0 <= paged - exact < inf.BLOCK_TOKENS * KV_BYTES_PER_TOKEN  # waste under one block per sequence
    assert inf.kv_cache_bytes(SMALL, 96, 64) == KV_BYTES_PER_TOKEN * 160  # whole blocks: no waste
    # tp 2 halves the 4 KV heads per device; tp 8 keeps one head each (replicated), not half a head
    assert inf.kv_cache_bytes(SMALL, 96, 64, tp=2) == KV_BYTES_PER_TOKEN * 160 / 2
    assert inf.kv_cache_bytes(SMALL, 96, 64, tp=8) == KV_BYTES_PER_TOKEN * 160 / 4
    # 8 samples of one 96-token prompt share its 6 blocks: each keeps 6/8 of them plus its own 4
    assert inf.kv_cache_bytes(SMALL, 96, 64, samples=8) == KV_BYTES_PER_TOKEN * 16 * (6 / 8 + 4)


def test_mla_caches_the_compressed_latent():
    v3 = load_model("deepseek-v3")
    layer = next(x for x in v3.layers if x.kind == "attention")
    assert layer.mla is not None
    per_token = sum(1 for x in v3.layers if x.kind == "attention") * \
        (layer.mla.kv_lora_rank + layer.mla.qk_rope_head_dim) * 2
    assert inf.kv_cache_bytes(v3, 1024, 1024) == per_token * 2048
    # far below what full K and V of every head would take
    assert per_token < sum(2 * x.heads * (layer.mla.qk_nope_head_dim + layer.mla.qk_rope_head_dim) * 2
                           for x in v3.layers if x.kind == "attention") / 10


def test_max_batch_is_what_fits_after_the_weights():
    dev = bare_device(memory_gb=2.0)
    free = 2e9 * inf.GPU_MEMORY_UTILIZATION - inf.weights_bytes(SMALL) - inf.workspace_bytes(SMALL)
    per_seq = inf.kv_cache_bytes(SMALL, 512, 512)
    assert inf.max_batch(SMALL, dev.memory_bytes, 512, 512) == int(free // per_seq)
    # another tenant's bytes leave less room; nothing left means no batch at all
    assert inf.max_batch(SMALL, dev.memory_bytes, 512, 512, resident_bytes=free / 2) < int(free // per_seq)
    assert inf.max_batch(SMALL, dev.memory_bytes, 512, 512, resident_bytes=2e9) == 0
    # a roomy device stops at the engine's sequence cap
    assert inf.max_batch(SMALL, 1e12, 512, 512) == inf.MAX_NUM_SEQS


def test_a_rollout_that_does_not_fit_runs_in_waves():
    dev = bare_device(memory_gb=2.0)
    cap = inf.max_batch(SMALL, dev.memory_bytes, 512, 512)
    one = inf.generate(SMALL, dev, cap, 512, 512)
    two = inf.generate(SMALL, dev, 2 * cap, 512, 512)
    assert one.fits and one.waves == 1
    assert not two.fits and two.waves == 2
    assert two.total_s == pytest.approx(2 * one.total_s)


def test_four_times_longer_response_takes_at_least_two_and_a_half_times_as_long():
    """The must-show: a 7B actor's rollout on H100s, and the small model on the bare device."""
    h100 = catalog.load_cluster("dgx-h100", 1)
    qwen = load_model("qwen2-7b")
    for model, dev, link in ((qwen, h100.devices[0].device, h100.collective(range(2))), (SMALL, bare_device(), None)):
        tp = 2 if link is not None else 1
        short = inf.generate(model, dev, 512, 512, 1024, tp=tp, tp_link=link, samples=8)
        long = inf.generate(model, dev, 512, 512, 4096, tp=tp, tp_link=link, samples=8)
        assert long.total_s >= 2.5 * short.total_s


def test_tensor_parallel_splits_the_weights_and_pays_an_all_reduce_per_sublayer():
    cl = catalog.load_cluster("dgx-h100", 1)
    dev, link = cl.devices[0].device, cl.collective(range(2))
    one = float(inf.decode_step_s(SMALL, dev, 16, 1024))
    no_comm = float(inf.decode_step_s(SMALL, dev, 16, 1024, tp=2))
    two = float(inf.decode_step_s(SMALL, dev, 16, 1024, tp=2, tp_link=link))
    assert no_comm < one  # half the weights per device
    assert two > no_comm  # 2 all-reduces per block and the logits gather
    assert inf.weights_bytes(SMALL, tp=2) < inf.weights_bytes(SMALL) / 2 * 1.001


def test_pipeline_parallel_doubles_the_room_for_the_cache_not_the_step_speed():
    dev = bare_device(memory_gb=2.0)
    assert inf.max_batch(SMALL, dev.memory_bytes, 512, 512, pp=2) > inf.max_batch(SMALL, dev.memory_bytes, 512, 512)
    # pp micro-batches of b / pp: a step costs the whole model's time for b / pp sequences
    assert float(inf.decode_step_s(SMALL, dev, 16, 1024, pp=2)) == \
        pytest.approx(float(inf.decode_step_s(SMALL, dev, 8, 1024)))


def test_run_infer_reports_the_outputs_and_refuses_bad_engines():
    out, text = run_infer("qwen2-7b", "dgx-h100", 1, batch=64, prompt_len=512, gen_len=256, tp=2)
    for key in ("prefill_s", "decode_s", "tokens_per_s", "kv_cache_bytes", "fits", "max_batch"):
        assert key in out
    assert out["fits"] and out["decode_s"] > out["prefill_s"] > 0
    assert "tokens/s" in text
    with pytest.raises(BadInput, match="--tp 3 does not divide"):
        run_infer("qwen2-7b", "dgx-h100", 1, batch=1, prompt_len=8, gen_len=8, tp=3)
    with pytest.raises(BadInput, match="--tp 16 x --pp 1 = 16 devices"):
        run_infer("qwen2-7b", "dgx-h100", 1, batch=1, prompt_len=8, gen_len=8, tp=16)
    with pytest.raises(BadInput, match="--gen-len"):
        run_infer("qwen2-7b", "dgx-h100", 1, batch=1, prompt_len=8, gen_len=0)
    with pytest.raises(Infeasible, match="raise --tp or --pp"):
        run_infer("llama3-70b", "dgx-h100", 1, batch=1, prompt_len=8, gen_len=8)
