"""ModelGraph: a DAG of layers, each knowing its own cost terms (docs/ARCHITECTURE.md#concepts).

A Layer is plain typed data (its dimensions) plus pure functions of the workload shape: parameters,
forward GEMMs and FLOPs, saved-activation bytes and output bytes, for a micro-batch of `b` sequences of
`s` tokens split `tp` ways (tensor parallel) and `cp` ways (context parallel). Every function accepts
numpy arrays for b, s, tp and cp so the search can evaluate many plans at once.

A transformer block is two nodes, attention then mlp/moe (pre-norm: each carries its own norm), so a
pipeline stage boundary can fall between blocks and the partitioner sees one unit per block.
"""
from __future__ import annotations

import itertools
from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

LayerKind = Literal["embedding", "attention", "mlp", "moe", "norm", "head", "encoder", "vae"]
Recompute = Literal["none", "selective", "full"]

# The sane range of every size a model file gives (HF config.json or a project model file): 1 up to this.
# Each is far above any model trained (and the cost model's own caps), so no real model is refused while a
# typo, 1e30 or 2^64 is a one-line error naming the file and the field instead of an overflow downstream.
SIZE_LIMITS = {
    "layers": 10_000,  # Llama-3.1-405B has 126, GPT-3 96
    "hidden": 2**20,  # 1,048,576; the widest published (PaLM, GPT-4-class) are near 2^14-2^15
    "ffn_hidden": 2**22,  # gated FFNs reach 4-8x hidden (Gemma-7B 24,576 = 8x)
    "heads": 2**14,
    "kv_heads": 2**14,
    "head_dim": 2**14,  # Gemma uses 256
    "vocab": 2**24,  # 16.7M; Gemma's 256,000 is the largest common one
    "experts": 2**14,  # DeepSeek-V3 has 256 routed experts
    "topk": 2**14,
    "max_seq": 2**24,  # positions / sequence: the cost model's sequence cap (issue 16)
    "window": 2**24,  # sliding-window width, a sequence length
    "rank": 2**20,  # MLA low-rank widths (DeepSeek-V3: q 1536, kv 512)
}
MAX_SOFTCAP = 1e4  # a logit soft-cap (Gemma 2: 50 on attention, 30 on the output) is a few tens


class MLA(BaseModel):
    """Multi-head latent attention dimensions (DeepSeek-V2 section 2.1; V3 config names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    q_lora_rank: NonNegativeInt = 0  # 0: queries are projected directly from the hidden state
    kv_lora_rank: PositiveInt
    qk_nope_head_dim: PositiveInt
    qk_rope_head_dim: PositiveInt
    v_head_dim: PositiveInt


class Layer(BaseModel):
    """One node of the graph. Which fields matter depends on `kind`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: LayerKind
    trainable: bool = True
    block: int | None = None  # transformer block index; None for embedding, head, encoders
    hidden: PositiveInt
    # attention
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    causal: bool = True
    qkv_bias: bool = False
    mla: MLA | None = None
    # Sliding-window attention: each query sees the last `window` keys (Mistral, Phi-3; Gemma 2 on every
    # other layer); 0 sees the whole (causal) sequence.
    window: int = 0
    # RMSNorm on q and k before the scores: "head" normalizes each head (d weights each for q and k: Qwen3),
    # "full" the whole projection (a*d and kv*d weights: OLMo-2, Olmo2Attention q_norm / k_norm).
    qk_norm: Literal["none", "head", "full"] = "none"
    # Logit soft-capping, cap * tanh(x / cap), on attention scores (or the LM head's logits): Gemma 2
    # (Team Gemma 2024, section 2). Three elementwise ops per score against 4d FLOPs of QK^T and AV per
    # score (d = 256: 0.3%), and FlashAttention applies it inside its kernel: not costed, recorded only.
    logit_softcap: float = 0.0
    # mlp / moe
    ffn_hidden: int = 0
    gated: bool = False
    experts: int = 0
    topk: int = 0
    shared_experts: int = 0
    shared_ffn_hidden: int = 0
    shared_expert_gate: bool = False
    router_bias: bool = False
    route_groups: int = 0  # group-limited routing (builders.MoEConfig); 0: any expert
    route_topk_groups: int = 0
    # embedding / head
    vocab: int = 0
    positions: int = 0  # learned absolute position table rows (GPT-2); 0 for rotary
    tied: bool = False  # head shares the embedding's weights
    # common
    bias: bool = False  # biases on projections and MLP (GPT-2, NeoX)
    norm: Literal["rmsnorm", "layernorm", "none"] = "rmsnorm"
    # A second norm on the sublayer's output before the residual add (Gemma 2's post_attention_layernorm
    # and post_feedforward_layernorm beside its pre-norms): one more norm's weights and saved input.
    post_norm: bool = False
    dropout: bool = False
    # A layer with its own token count (a text encoder reads 77 tokens whatever the image size).
    fixed_tokens: int | None = None
    # Opaque frozen modules (VAE): FLOPs and activation per sample, measured or published.
    flops_per_sample: float = 0.0
    params_fixed: int = 0
    output_elems_per_sample: int = 0

    @cached_property
    def shape_key(self) -> tuple:
        """Everything but the name and block index: layers with equal keys cost the same."""
        return tuple(getattr(self, k) for k in type(self).model_fields if k not in ("name", "block"))

    # ------------------------------------------------------------------------------------------
    # parameters

    @property
    def norm_params(self) -> int:
        return {"rmsnorm": self.hidden, "layernorm": 2 * self.hidden, "none": 0}[self.norm]

    def _attention_params(self) -> int:
        h, a, kv, d = self.hidden, self.heads, self.kv_heads, self.head_dim
        if self.mla is not None:
            m = self.mla
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            if m.q_lora_rank:
                q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * a * qk  # down, norm, up
            else:
                q = h * a * qk
            kv_p = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank  # down (+ shared rope key), norm
            kv_p += m.kv_lora_rank * a * (m.qk_nope_head_dim + m.v_head_dim)
            return q + kv_p + a * m.v_head_dim * h
        p = h * a * d + 2 * h * kv * d + a * d * h
        if self.qk_norm != "none":
            # one weight per normalized element (RMSNorm; LayerNorm adds as many biases)
            width = 2 * d if self.qk_norm == "head" else (a + kv) * d
            p += width * (2 if self.norm == "layernorm" else 1)
        if self.qkv_bias or self.bias:
            p += a * d + 2 * kv * d
        if self.bias:
            p += h
        return p

    def _mlp_params(self, f: int) -> int:
        h = self.hidden
        p = (3 if self.gated else 2) * h * f
        if self.bias:
            p += (2 * f if self.gated else f) + h
        return p

    def params(self) -> int:
        """Total parameters of this layer (unsharded)."""
        k = self.kind
        if k == "embedding":
            return self.vocab * self.hidden + self.positions * self.hidden
        if k == "head":
            return self.norm_params + (0 if self.tied else self.vocab * self.hidden)
        if k == "norm":
            return self.norm_params
        post = self.norm_params if self.post_norm else 0
        if k in ("attention", "encoder"):
            p = self.norm_params + post + self._attention_params()
            if k == "encoder":  # a whole encoder block: attention + mlp + two norms
                p += self.norm_params + self._mlp_params(self.ffn_hidden)
            return p
        if k == "mlp":
            return self.norm_params + post + self._mlp_params(self.ffn_hidden)
        if k == "moe":
            return (self.norm_params + post + self._router_params() + self._shared_params()
                    + self.routed_params())
        if k == "vae":
            return self.params_fixed
        raise AssertionError(k)

    def _router_params(self) -> int:
        return self.hidden * self.experts + (self.experts if self.router_bias else 0)

    def _shared_params(self) -> int:
        if not self.shared_experts:
            return 0
        gate = self.hidden if self.shared_expert_gate else 0
        return self.shared_experts * self._mlp_params(self.shared_ffn_hidden) + gate

    def routed_params(self) -> int:
        return self.experts * self._mlp_params(self.ffn_hidden) if self.kind == "moe" else 0

    def active_params(self) -> int:
        """Parameters one token touches: a MoE layer uses topk of its routed experts."""
        if self.kind != "moe":
            return self.params()
        return self.params() - self.routed_params() + self.topk * self._mlp_params(self.ffn_hidden)

    def params_per_device(self, tp=1, ep=1, etp=None):
        """Parameters one device holds: matrices split tp ways, routed experts ep x etp ways, norms and
        the router replicated. Embedding and head are vocabulary-parallel (Megatron), split tp ways."""
        if self.kind in ("norm", "vae"):
            return self.params()
        etp = tp if etp is None else etp
        replicated = self.norm_params * (2 if self.kind == "encoder" else 1) * (2 if self.post_norm else 1)
        if self.kind == "embedding":
            replicated = 0
        if self.kind == "moe":
            replicated += self._router_params()
        routed = self.routed_params()
        return replicated + (self.params() - replicated - routed) / tp + routed / (ep * etp)

    # ------------------------------------------------------------------------------------------
    # compute

    def tokens(self, b, s):
        """Tokens this layer sees per micro-batch of b sequences of s tokens."""
        return b * (self.fixed_tokens if self.fixed_tokens is not None else s)

    def gemms(self, b, s, tp=1, cp=1, etp=1):
        """Forward GEMMs on one device as (name, m, n, k): m tokens, n output and k reduced columns.

        Column- then row-parallel splits as in Megatron (Shoeybi et al. 2019, section 3): the first GEMM of
        a pair divides n by tp, the second divides k. 2*m*n*k FLOPs each. Routed experts are split etp ways
        (expert tensor parallel): an etp group gathers etp ranks' tokens and each computes f/etp columns, so
        a device's expert FLOPs are the same for every etp (MoE Parallel Folding, Liu et al. 2025).
        """
        t = self.tokens(b, s) / cp
        h = self.hidden
        out = []
        if self.kind in ("attention", "encoder"):
            a, kv, d = self.heads, self.kv_heads, self.head_dim
            if self.mla is not None:
                m = self.mla
                qk = m.qk_nope_head_dim + m.qk_rope_head_dim
                if m.q_lora_rank:
                    out.append(("q_down", t, m.q_lora_rank, h))
                    out.append(("q_up", t, a * qk / tp, m.q_lora_rank))
                else:
                    out.append(("q_proj", t, a * qk / tp, h))
                out.append(("kv_down", t, m.kv_lora_rank + m.qk_rope_head_dim, h))
                out.append(("kv_up", t, a * (m.qk_nope_head_dim + m.v_head_dim) / tp, m.kv_lora_rank))
                out.append(("o_proj", t, h, a * m.v_head_dim / tp))
            else:
                out.append(("qkv_proj", t, (a + 2 * kv) * d / tp, h))
                out.append(("o_proj", t, h, a * d / tp))
        if self.kind in ("mlp", "encoder"):
            f = self.ffn_hidden
            out.append(("up_proj", t, (2 if self.gated else 1) * f / tp, h))
            out.append(("down_proj", t, h, f / tp))
        if self.kind == "moe":
            f, k = self.ffn_hidden, self.topk
            out.append(("router", t, self.experts, h))
            # Balanced routing: each device computes tokens*k*etp/tp expert rows of f/etp columns.
            out.append(("expert_up", t * k * etp / tp, (2 if self.gated else 1) * f / etp, h))
            out.append(("expert_down", t * k * etp / tp, h, f / etp))
            if self.shared_experts:
                fs = self.shared_ffn_hidden * self.shared_experts
                out.append(("shared_up", t, (2 if self.gated else 1) * fs / tp, h))
                out.append(("shared_down", t, h, fs / tp))
        if self.kind == "head":
            out.append(("logits", t, self.vocab / tp, h))
        return out

    def attention_core_flops(self, b, s, tp=1, cp=1):
        """QK^T and AV on one device: 4*b*s^2*a*d for the full square (PaLM App. B), halved when causal
        because FlashAttention skips masked blocks (docs/formulas.md#flops-causal). Context parallel with causal load
        balancing gives each rank 1/cp of the work.

        A sliding window w (Beltagy et al. 2020, Longformer section 3.1: O(s*w) instead of O(s^2)) leaves
        query i min(i+1, w) keys: sum_i min(i+1, w) = s*w - w^2/2 + O(s) with w = min(s, window), which
        is s^2/2 when w = s, so a window at least as long as the sequence costs exactly the causal square.
        FlashAttention-2 skips the blocks outside the window (its window_size argument)."""
        if self.kind not in ("attention", "encoder"):
            return 0 * b
        s_eff = self.fixed_tokens if self.fixed_tokens is not None else s
        if self.mla is not None:
            m = self.mla
            per_pos = self.heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
        else:
            per_pos = self.heads * 2 * self.head_dim
        if self.window:
            w = np.minimum(s_eff, self.window)
            pairs = s_eff * w - w * w / 2 if self.causal else s_eff * w
            return 2 * b * pairs * per_pos / (tp * cp)
        full = 2 * b * s_eff * s_eff * per_pos
        return full * (0.5 if self.causal else 1.0) / (tp * cp)

    def flops_fwd(self, b, s, tp=1, cp=1):
        """Forward FLOPs on one device for one micro-batch (GEMMs + attention core; norms ignored)."""
        if self.kind == "vae":
            return self.flops_per_sample * b
        total = self.attention_core_flops(b, s, tp, cp)
        for _, m, n, k in self.gemms(b, s, tp, cp):
            total = total + 2 * m * n * k
        return total

    # ------------------------------------------------------------------------------------------
    # memory

    def output_bytes(self, b, s, cp=1, dtype_bytes=2):
        """Bytes this layer hands to the next one (what a pipeline boundary after it sends)."""
        if self.kind == "head":
            return 0 * b
        if self.kind == "vae":
            return b * self.output_elems_per_sample * dtype_bytes
        return self.tokens(b, s) / cp * self.hidden * dtype_bytes

    def activation_bytes(self, b, s, tp=1, cp=1, sp=False, recompute: Recompute = "none",
                         dtype_bytes=2, flash=True):
        """Bytes saved for backward by one micro-batch on one device.

        Korthikanti et al. 2022 (section 4.1, Eqs. 1-4, Table 2), tensor by tensor so that gated MLPs,
        GQA and no-dropout layers come out right: with 16-bit activations a GPT layer keeps
        attention 11sbh + 5as^2b, MLP 19sbh, two norms 4sbh. Tensors before the column-parallel GEMM
        (norm inputs, dropout masks) are replicated over tp unless sequence parallel splits them.
        FlashAttention keeps no s^2 scores (Dao et al. 2022). Full recompute keeps only the block input;
        selective recompute drops the attention core's score tensors. The LM head and its loss are not
        recomputed under any policy (Narayanan et al. 2021 section 5.1 counts no recompute for the logit layer,
        docs/formulas.md#memory-activations; Megatron checkpoints the transformer layers only), so the head keeps its fp32 logits
        under full recompute too.
        """
        if not self.trainable:
            return 0 * b
        t = self.tokens(b, s) / cp
        h, e = self.hidden, dtype_bytes
        rep = tp if sp else 1  # split of the tensors outside the tp region
        if recompute == "full" and self.kind != "head":
            # One checkpoint per block: the block input, kept by the attention node.
            keep = self.kind in ("attention", "encoder", "embedding")
            return (t * h * e / rep) if keep and self.kind != "embedding" else 0 * b
        if self.kind in ("embedding", "norm", "vae"):
            return 0 * b
        if self.kind == "head":
            # final norm input + logits in fp32 for the loss (Korthikanti 4.3: 4sbv/t)
            return t * h * e / rep + t * self.vocab * 4 / tp
        mask = t * h * (1 if self.dropout else 0)
        total = 0 * b
        if self.kind in ("attention", "encoder"):
            a, kv, d = self.heads, self.kv_heads, self.head_dim
            if self.mla is not None:
                m = self.mla
                q_w = a * (m.qk_nope_head_dim + m.qk_rope_head_dim)
                kv_w = a * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
                o_w = a * m.v_head_dim
                lat = (m.q_lora_rank + m.kv_lora_rank) * e * t  # latent inputs of the up-projections
            else:
                q_w, kv_w, o_w, lat = a * d, 2 * kv * d, a * d, 0
            total = total + 2 * t * h * e / rep  # norm input, norm output (= QKV input)
            total = total + t * (q_w + kv_w) * e / tp + lat  # Q, K, V for the core
            total = total + t * o_w * e / tp  # core output = o_proj input
            total = total + mask / rep  # residual dropout mask after the output projection
            if self.qk_norm != "none":
                total = total + t * (a + kv) * d * e / tp  # q and k before their norms
            if self.post_norm:
                total = total + t * h * e / rep  # the post-norm's input (the o_proj output)
            s_eff = self.fixed_tokens if self.fixed_tokens is not None else s
            if not flash and recompute == "none":
                # softmax output 2as^2b, its dropout mask as^2b, dropout output 2as^2b (Korthikanti); a
                # sliding window keeps only the scores inside it: s x min(s, window) per head
                per_score = (2 + (3 if self.dropout else 0)) * e / 2
                keys = np.minimum(s_eff, self.window) if self.window else s_eff
                total = total + b * a * (s_eff / cp) * keys * per_score / tp
            elif flash:
                total = total + t * a * 4 / tp  # log-sum-exp per row, fp32
        if self.kind in ("mlp", "encoder"):
            f = self.ffn_hidden
            total = total + 2 * t * h * e / rep  # norm input, norm output (= up_proj input)
            total = total + t * f * e * (3 if self.gated else 2) / tp  # up out(s) and activation out
            total = total + mask / rep
            if self.post_norm and self.kind == "mlp":
                total = total + t * h * e / rep  # the post-norm's input (the down_proj output)
        if self.kind == "moe":
            f, k = self.ffn_hidden, self.topk
            total = total + 2 * t * h * e / rep + t * self.experts * 4 / rep  # norm in/out, router probs
            total = total + t * k / tp * (h + f * (3 if self.gated else 2)) * e  # dispatched in, expert acts
            if self.shared_experts:
                fs = self.shared_ffn_hidden * self.shared_experts
                total = total + t * fs * e * (3 if self.gated else 2) / tp
            if self.post_norm:
                total = total + t * h * e / rep
        return total


    def logits_transient_bytes(self, b, s, tp=1, cp=1, dtype_bytes=2):
        """Bytes of the loss's 16-bit logits copy, beyond the fp32 logits activation_bytes keeps: one
        micro-batch on one device, b x s/cp x vocab/tp x dtype_bytes (LM head only, else 0).

        Megatron's vocab-parallel cross entropy (megatron/core/tensor_parallel/cross_entropy.py) casts the
        head's 16-bit logits to fp32 (`calculate_logits_max`: `.float()`), turns that copy into the softmax
        in place and saves it (the 4 bytes per element of activation_bytes, Korthikanti 4.3); backward makes
        the gradient in place in the same fp32 buffer, and the cast's backward produces a 16-bit logits
        gradient. So 16-bit logits (forward) or their 16-bit gradient (backward) sit beside the fp32 buffer:
        one micro-batch, once per stage, at the last stage's peak. With fp32 activations `.float()` is the
        same tensor and the cast backward a no-op: nothing beyond the saved copy. Eager PyTorch
        (F.cross_entropy on upcast logits) keeps more copies: that belongs to the torch stack, not here.
        """
        if self.kind != "head" or not self.trainable or dtype_bytes >= 4:
            return 0 * b
        return self.tokens(b, s) / cp * self.vocab * dtype_bytes / tp


_SERIALS = itertools.count()


class ModelGraph(BaseModel):
    """Layers plus the edges between them. Most models are a chain; a diffusion model's frozen encoders
    feed its backbone from the side."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: str = ""
    family: str = Field("decoder", description="decoder, moe, diffusion, or traced")
    layers: list[Layer]
    edges: list[tuple[str, str]]
    default_seq: int | None = None

    @cached_property
    def graph(self):
        import networkx as nx

        g = nx.DiGraph()
        for layer in self.layers:
            g.add_node(layer.name, layer=layer)
        g.add_edges_from(self.edges)
        if not nx.is_directed_acyclic_graph(g):
            raise ValueError(f"model {self.name}: layer graph has a cycle")
        return g

    @cached_property
    def by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}

    @property
    def _cost_cache(self) -> dict:
        """What the cost model derives from this (immutable) model alone, kept with it and freed with it
        (planner/cost/chunks.py); its "serial" names the model in caches kept elsewhere (a cluster's) without
        an id() that a later object could reuse. Owned by this object: a model_copy (which copies the
        instance dict) starts its own."""
        hit = self.__dict__.get("_cost_cache_dict")
        if hit is None or hit["owner"] is not self:
            hit = self.__dict__["_cost_cache_dict"] = {"owner": self, "serial": next(_SERIALS)}
        return hit

    def topological(self) -> list[Layer]:
        return list(self._topological)

    @cached_property
    def _topological(self) -> tuple[Layer, ...]:
        import networkx as nx

        return tuple(self.by_name[n] for n in nx.topological_sort(self.graph))

    @property
    def params(self) -> int:
        return sum(layer.params() for layer in self.layers)

    @property
    def active_params(self) -> int:
        return sum(layer.active_params() for layer in self.layers)

    @property
    def trainable_params(self) -> int:
        return sum(layer.params() for layer in self.layers if layer.trainable)

    @property
    def num_blocks(self) -> int:
        return len({layer.block for layer in self.layers if layer.block is not None})

    def flops_fwd(self, b, s, tp=1, cp=1):
        return sum(layer.flops_fwd(b, s, tp, cp) for layer in self.layers)

    def summary(self) -> dict:
        kinds: dict[str, int] = {}
        for layer in self.layers:
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        return {
            "name": self.name,
            "family": self.family,
            "source": self.source,
            "params": self.params,
            "active_params": self.active_params,
            "trainable_params": self.trainable_params,
            "blocks": self.num_blocks,
            "layers": len(self.layers),
            "layer_kinds": kinds,
        }


def chain(name: str, layers: list[Layer], **kw) -> ModelGraph:
    """A ModelGraph whose layers run one after another."""
    edges = [(a.name, b.name) for a, b in zip(layers, layers[1:])]
    return ModelGraph(name=name, layers=layers, edges=edges, **kw)
