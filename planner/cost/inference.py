"""Generation cost: what a serving engine (vLLM, SGLang) takes to prefill prompts and decode responses on one
engine of tp x pp devices, and how many sequences its paged KV cache holds (docs/guide/rl.md#generation).

  prefill   compute-bound: the same forward layer times as training (compute.layer_time: every GEMM on the
            roofline at the device's matmul efficiency, FlashAttention at its attention efficiency), over the
            prompt tokens; logits only for the last position of each sequence (what an engine samples from).
  decode    one token per sequence per step, memory-bound: the GEMMs of a batch of b tokens (layer_time with
            s = 1, whose memory roof reads every weight of the tp shard once per step) plus attention reading
            each sequence's KV cache, max(FLOPs / compute roof, bytes / (bandwidth x memory efficiency)) per
            layer (the roofline, Williams et al. 2009), plus per token one tensor-parallel all-reduce after
            each sublayer (Megatron's row-parallel output, Shoeybi et al. 2019 section 3) on the engine's link.
  KV cache  layers x 2 x kv_heads x head_dim x tokens x bytes (K and V of every attention layer); the MLA
            latent (kv_lora_rank + qk_rope_head_dim per token and layer, DeepSeek-V2 section 2.1.2) where the
            model has it; paged in blocks of 16 tokens (vLLM, Kwon et al. 2023 section 4: waste below one
            block per sequence), a prompt's full blocks shared by its samples (section 4.4, parallel sampling).
  batching  continuous batching (Orca, Yu et al. 2022; vLLM): the engine keeps as many sequences running as
            fit in memory after the weights. All responses are response_len long, so a finished sequence is
            replaced at the same step by the next: N sequences run in ceil(N / max_batch) full waves. Real
            rollouts have a long tail of lengths; response_len is their cap, so this is the time at the cap.

Engine settings are the defaults of verl's rollout config (actor_rollout_ref.rollout in
verl/trainer/config/ppo_trainer.yaml: max_num_seqs 1024, max_num_batched_tokens 8192) and vLLM's
(gpu_memory_utilization 0.9, block_size 16).
CUDA graphs replay the decode step, so the host's per-op dispatch is not on its critical path; each kernel
still pays the device's launch overhead (layer_time's kernel_overhead_us).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from planner.core.dtypes import BYTES_PER_ELEMENT
from planner.core.hardware import CollectiveLink, Device
from planner.core.model import Layer, ModelGraph
from planner.cost import comm
from planner.cost.compute import layer_time

BLOCK_TOKENS = 16  # vLLM's default KV block size (Kwon et al. 2023, the block-size ablation of section 7)
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of device memory for weights, workspace and KV cache
MAX_NUM_SEQS = 1024  # verl rollout default: the most sequences an engine runs at once
MAX_NUM_BATCHED_TOKENS = 8192  # verl rollout default: tokens per prefill chunk, which sizes the workspace
DECODE_SAMPLES = 256  # context lengths at which a long decode's step time is evaluated (midpoint rule)
SUBLAYERS = ("attention", "mlp", "moe")  # each ends in a row-parallel GEMM and its tp all-reduce


@dataclass(frozen=True)
class Generation:
    """One engine serving `sequences` sequences: prefill and decode time, and its memory."""

    prefill_s: float
    decode_s: float
    tokens_per_s: float  # generated tokens / (prefill_s + decode_s)
    kv_cache_bytes: float  # per device, at the largest wave
    weights_bytes: float  # per device
    max_batch: int  # sequences the engine can run at once (0: the weights alone do not fit)
    waves: int
    fits: bool  # every sequence's KV cache fits at once (one wave)
    tp: int
    pp: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    def as_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}


# ---------------------------------------------------------------------------------------------------------
# memory


def _attention_layers(model: ModelGraph) -> list[Layer]:
    return [layer for layer in model.layers if layer.kind == "attention"]


def kv_width_bytes(layer: Layer, tp: int = 1, dtype_bytes: int = 2) -> float:
    """KV-cache bytes per token of one attention layer on one device: K and V of kv_heads / tp heads (an engine
    replicates a KV head when tp exceeds kv_heads: vLLM keeps max(1, kv_heads / tp) per rank), or the MLA
    latent, which every tp rank keeps whole."""
    if layer.mla is not None:
        return (layer.mla.kv_lora_rank + layer.mla.qk_rope_head_dim) * dtype_bytes
    return 2 * max(layer.kv_heads / tp, 1) * layer.head_dim * dtype_bytes


def _blocks(tokens: int) -> int:
    return -(-int(tokens) // BLOCK_TOKENS)


def kv_cache_bytes(model: ModelGraph, prompt_len: int, gen_len: int, tp: int = 1, pp: int = 1,
                   dtype_bytes: int = 2, samples: int = 1) -> float:
    """Paged KV-cache bytes of one sequence on one device at its full length.

    Blocks of BLOCK_TOKENS: the prompt's full blocks are shared by its `samples` sequences (copy-on-write,
    Kwon et al. section 4.4), the rest (prompt tail and response) is private. A sliding-window layer keeps
    only the blocks its window reaches. The layers are split evenly over pp stages."""
    shared = prompt_len // BLOCK_TOKENS
    private = _blocks(prompt_len - shared * BLOCK_TOKENS + gen_len)
    total = 0.0
    for layer in _attention_layers(model):
        blocks = shared / samples + private
        if layer.window:
            blocks = min(blocks, _blocks(layer.window) + 1)
        total += blocks * BLOCK_TOKENS * kv_width_bytes(layer, tp, dtype_bytes)
    return total / pp


def weights_bytes(model: ModelGraph, tp: int = 1, pp: int = 1, dtype_bytes: int = 2) -> float:
    """Weight bytes on one device of a tp x pp engine (Layer.params_per_device, layers split over pp)."""
    return sum(layer.params_per_device(tp=tp) for layer in model.layers) * dtype_bytes / pp


def workspace_bytes(model: ModelGraph, tp: int = 1, dtype_bytes: int = 2) -> float:
    """Activation workspace of one prefill chunk of MAX_NUM_BATCHED_TOKENS: the widest layer's GEMM outputs
    for that many tokens (one layer is live at a time in a forward pass), plus fp32 logits of the sequences
    sampled at once (MAX_NUM_SEQS rows of vocab / tp)."""
    widest = max((sum(n for _, _, n, _ in layer.gemms(1, 1, tp)) for layer in model.layers
                  if layer.kind != "head"), default=0)
    vocab = max((layer.vocab for layer in model.layers if layer.kind == "head"), default=0)
    return MAX_NUM_BATCHED_TOKENS * widest * dtype_bytes + MAX_NUM_SEQS * vocab / tp * 4


def max_batch(model: ModelGraph, device_bytes: float, prompt_len: int, gen_len: int, tp: int = 1, pp: int = 1,
              dtype_bytes: int = 2, samples: int = 1, resident_bytes: float = 0.0,
              utilization: float = GPU_MEMORY_UTILIZATION) -> int:
    """Sequences whose full-length KV cache fits beside the weights, the workspace and `resident_bytes` of
    other tenants (a colocated trainer's states) in `utilization` of the device, capped at MAX_NUM_SEQS."""
    free = device_bytes * utilization - resident_bytes - weights_bytes(model, tp, pp, dtype_bytes) \
        - workspace_bytes(model, tp, dtype_bytes)
    per_seq = kv_cache_bytes(model, prompt_len, gen_len, tp, pp, dtype_bytes, samples)
    if free <= 0 or per_seq <= 0:
        return 0
    return int(min(MAX_NUM_SEQS, free // per_seq))


# ---------------------------------------------------------------------------------------------------------
# time


def _tp_comm_s(model: ModelGraph, tokens, rows, scoring: bool, tp: int, link: CollectiveLink | None,
               dtype_bytes: int):
    """Tensor-parallel traffic of one forward pass over `tokens` tokens: an all-reduce of tokens x hidden
    after each sublayer; at the vocabulary-parallel head, the logits of the `rows` sampled rows gathered for
    sampling, or, when `scoring` (log-probs of every position), the three fp32 all-reduces per row of
    Megatron's vocab-parallel cross entropy (max, sum of exponentials, target logit)."""
    if tp <= 1 or link is None:
        return 0.0 * tokens
    total = 0.0 * tokens
    for layer in model.layers:
        if layer.kind in SUBLAYERS:
            total = total + comm.all_reduce_time_s(tokens * layer.hidden * dtype_bytes, link)
        elif layer.kind == "head" and scoring:
            total = total + 3 * comm.all_reduce_time_s(rows * 4, link)
        elif layer.kind == "head":
            total = total + comm.all_gather_time_s(rows * layer.vocab * dtype_bytes, link)
    return total


def _forward_s(model: ModelGraph, device: Device, batch, seq, tp: int, dtype: str, link, head_rows_per_seq):
    """Forward time of every layer of `model` (all stages) for `batch` sequences of `seq` new tokens each, the
    LM head over head_rows_per_seq rows per sequence, without the attention core of decode steps (seq = 1
    there: its cost is the KV-cache read, added by the caller)."""
    e = BYTES_PER_ELEMENT[dtype] if dtype != "fp8" else 2
    total = 0.0 * batch
    for layer in model.layers:
        if layer.kind == "head":
            lt = layer_time(layer, batch, head_rows_per_seq, device, dtype, tp)
        else:
            lt = layer_time(layer, batch, seq, device, dtype, tp)
        total = total + lt.fwd_s - (lt.attention_fwd_s if seq == 1 else 0.0)
    scoring = head_rows_per_seq > 1
    return total + _tp_comm_s(model, batch * seq, batch * head_rows_per_seq, scoring, tp, link, e)


def _p2p_s(model: ModelGraph, tokens, pp_link, dtype_bytes: int):
    """One pipeline send of `tokens` tokens' hidden states over pp_link (bytes/s, latency s), alpha-beta."""
    if pp_link is None:
        return 0.0 * tokens
    hidden = model.layers[0].hidden
    return comm.p2p_time_s(tokens * hidden * dtype_bytes, pp_link[0], pp_link[1])


def prefill_time_s(model: ModelGraph, device: Device, batch, prompt_len: int, tp: int = 1, pp: int = 1,
                   tp_link: CollectiveLink | None = None, pp_link=None, dtype: str = "bf16"):
    """Seconds to prefill `batch` prompts of prompt_len tokens on one tp x pp engine.

    With pp stages the batch runs as pp micro-batches through the pipeline: (m + pp - 1) stage slots of a
    micro-batch (GPipe fill and drain, Huang et al. 2019), each 1/pp of the layers, plus the p2p sends of one
    micro-batch through the pp - 1 stage boundaries. pp_link: (bytes/s, latency s) between stages."""
    if pp == 1:
        return _forward_s(model, device, batch, prompt_len, tp, dtype, tp_link, 1)
    m = pp
    stage = _forward_s(model, device, batch / m, prompt_len, tp, dtype, tp_link, 1) / pp
    e = 2 if dtype == "fp8" else BYTES_PER_ELEMENT[dtype]
    return (m + pp - 1) * stage + (pp - 1) * _p2p_s(model, batch / m * prompt_len, pp_link, e)


def scoring_time_s(model: ModelGraph, device: Device, batch, seq_len: int, tp: int = 1,
                   tp_link: CollectiveLink | None = None, dtype: str = "bf16"):
    """Seconds of one forward pass over `batch` whole sequences with the head on every position: what the
    log-probabilities of a reference (or the actor's own recomputed ones) and a critic's values need."""
    return _forward_s(model, device, batch, seq_len, tp, dtype, tp_link, seq_len)


def decode_attention_s(model: ModelGraph, device: Device, batch, context, tp: int = 1, dtype_bytes: int = 2):
    """Attention of one decode step: every sequence's query reads its `context` cached keys and values.

    Per layer the slower of its FLOPs (QK^T and AV: 2 x context x heads x (qk + v) width per sequence, as in
    Layer.attention_core_flops with one query) at the attention roof and its KV bytes at the memory roof
    (a sliding window reads at most `window` tokens)."""
    e = device.efficiency
    peak = device.peak_flops("bf16") * e.attention
    bw = device.memory_bandwidth_bytes_per_s * e.memory
    total = 0.0 * np.asarray(context, dtype=float)
    for layer in _attention_layers(model):
        ctx = np.minimum(context, layer.window) if layer.window else np.asarray(context, dtype=float)
        if layer.mla is not None:
            m = layer.mla
            per_pos = layer.heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
        else:
            per_pos = layer.heads * 2 * layer.head_dim
        flops = 2 * batch * ctx * per_pos / tp
        nbytes = batch * ctx * kv_width_bytes(layer, tp, dtype_bytes)
        total = total + np.maximum(flops / peak, nbytes / bw)
    return total


def decode_step_s(model: ModelGraph, device: Device, batch, context, tp: int = 1, pp: int = 1,
                  tp_link: CollectiveLink | None = None, pp_link=None, dtype: str = "bf16"):
    """Seconds of one decode step: one new token for each of `batch` sequences whose caches hold `context`.

    With pp stages an engine keeps pp micro-batches of batch / pp in flight (vLLM's virtual engines): each stage
    runs every micro-batch once per step, so a step takes the whole model's time for batch / pp sequences, plus
    the (pp - 1) sends one micro-batch waits for on its way through the stages."""
    b = batch / pp
    e = 2 if dtype == "fp8" else BYTES_PER_ELEMENT[dtype]
    fixed = _forward_s(model, device, b, 1, tp, dtype, tp_link, 1)
    return fixed + decode_attention_s(model, device, b, context, tp, e) + (pp - 1) * _p2p_s(model, b, pp_link, e)


def decode_time_s(model: ModelGraph, device: Device, batch, prompt_len: int, gen_len: int, tp: int = 1,
                  pp: int = 1, tp_link: CollectiveLink | None = None, pp_link=None, dtype: str = "bf16") -> float:
    """Seconds to decode gen_len tokens for `batch` sequences after their prefill (which yields the first
    token): gen_len - 1 steps with contexts prompt_len + 1 ... prompt_len + gen_len - 1.

    The step time is linear in the context between the kinks of max() and min() in decode_attention_s, so
    up to DECODE_SAMPLES steps are summed exactly and longer decodes by the midpoint rule over DECODE_SAMPLES
    equal spans (exact on every linear span)."""
    steps = gen_len - 1
    if steps <= 0:
        return 0.0
    if steps <= DECODE_SAMPLES:
        ctx = prompt_len + np.arange(1, steps + 1, dtype=float)
        weight = 1.0
    else:
        ctx = prompt_len + 1 + (np.arange(DECODE_SAMPLES) + 0.5) * steps / DECODE_SAMPLES - 0.5
        weight = steps / DECODE_SAMPLES
    return float(np.sum(decode_step_s(model, device, batch, ctx, tp, pp, tp_link, pp_link, dtype)) * weight)


def generate(model: ModelGraph, device: Device, sequences: int, prompt_len: int, gen_len: int, tp: int = 1,
             pp: int = 1, tp_link: CollectiveLink | None = None, pp_link=None, dtype: str = "bf16", samples: int = 1,
             resident_bytes: float = 0.0, utilization: float = GPU_MEMORY_UTILIZATION) -> Generation:
    """One engine generating gen_len tokens for each of `sequences` sequences (`samples` per prompt): full
    waves of max_batch sequences and one partial wave (module docstring, batching). A prompt is prefilled
    once for its samples (they share its blocks). max_batch 0 (the weights do not fit): times are inf."""
    e = 2 if dtype == "fp8" else BYTES_PER_ELEMENT[dtype]
    cap = max_batch(model, device.memory_bytes, prompt_len, gen_len, tp, pp, e, samples, resident_bytes,
                    utilization)
    w = weights_bytes(model, tp, pp, e)
    if cap == 0:
        return Generation(math.inf, math.inf, 0.0, 0.0, w, 0, 0, False, tp, pp)
    full, rest = divmod(sequences, cap)
    prefill = decode = 0.0
    for b, count in ((cap, full), (rest, 1)):
        if b == 0 or count == 0:
            continue
        prompts = b / samples  # a prompt is prefilled once for its samples
        prefill += count * float(prefill_time_s(model, device, prompts, prompt_len, tp, pp, tp_link, pp_link, dtype))
        decode += count * decode_time_s(model, device, b, prompt_len, gen_len, tp, pp, tp_link, pp_link, dtype)
    largest = min(cap, sequences)
    kv = largest * kv_cache_bytes(model, prompt_len, gen_len, tp, pp, e, samples)
    tokens_per_s = sequences * gen_len / (prefill + decode)
    return Generation(prefill, decode, tokens_per_s, kv, w, cap, full + (1 if rest else 0), sequences <= cap, tp, pp)
