"""A runnable torch decoder built from the planner's own ModelGraph, so a plan is executed on the very
model it was costed for (same layers, same parameter count; tests/test_torch_backend.py holds them equal).

Llama style (RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases) or GPT style
(LayerNorm, learned positions, GELU MLP, biases, tied embeddings) follow from the graph's Layer fields;
any mix of those fields works. Module names follow torchtitan's Llama (tok_embeddings, layers.N.attention.wq,
feed_forward.w1/w2/w3, norm, output) so that the tensor-parallel plan in parallel.py reads like the
upstream one. Blocks sit in an nn.ModuleDict keyed by their index: a pipeline stage keeps only its blocks
and its parameter names stay those of the full model.

Dropout is not built (a deterministic model is what the loss-equivalence tests need); its cost in the planner
is only the saved masks. MoE, MLA and diffusion graphs are refused with one line (BadInput).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from planner.core.errors import BadInput
from planner.core.model import Layer, ModelGraph

INIT_STD = 0.02  # GPT-2 / Llama initialisation of projections and embeddings
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the torch modules need, read off a ModelGraph's layers."""

    name: str
    vocab: int
    hidden: int
    positions: int  # learned position rows; 0 for rotary
    blocks: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_hidden: int
    gated: bool
    norm: str  # "rmsnorm" or "layernorm"
    bias: bool
    qkv_bias: bool
    tied: bool

    @property
    def rope(self) -> bool:
        return self.positions == 0


def spec_from_graph(graph: ModelGraph) -> DecoderSpec:
    """The DecoderSpec of a dense decoder graph (embedding, attention/mlp blocks, head); BadInput otherwise."""
    kinds = {layer.kind for layer in graph.layers}
    unsupported = kinds - {"embedding", "attention", "mlp", "head"}
    if unsupported:
        raise BadInput(f"model {graph.name}: the torch backend runs dense decoders only; layer kinds "
                       f"{sorted(unsupported)} are not supported")
    if any(not layer.trainable for layer in graph.layers):
        raise BadInput(f"model {graph.name}: frozen layers are not supported by the torch backend")
    emb = [x for x in graph.layers if x.kind == "embedding"]
    head = [x for x in graph.layers if x.kind == "head"]
    attn = [x for x in graph.layers if x.kind == "attention"]
    mlp = [x for x in graph.layers if x.kind == "mlp"]
    if len(emb) != 1 or len(head) != 1 or not attn or len(attn) != len(mlp):
        raise BadInput(f"model {graph.name}: expected one embedding, one head and attention+mlp blocks")
    if any(a.mla is not None for a in attn):
        raise BadInput(f"model {graph.name}: multi-head latent attention is not supported by the torch backend")
    a0, m0 = attn[0], mlp[0]
    for x in attn[1:]:
        if x.shape_key != a0.shape_key:
            raise BadInput(f"model {graph.name}: blocks of different shapes are not supported")
    for x in mlp[1:]:
        if x.shape_key != m0.shape_key:
            raise BadInput(f"model {graph.name}: blocks of different shapes are not supported")
    if a0.norm == "none":
        raise BadInput(f"model {graph.name}: blocks without norms are not supported")
    return DecoderSpec(name=graph.name, vocab=emb[0].vocab, hidden=a0.hidden, positions=emb[0].positions,
                       blocks=len(attn), heads=a0.heads, kv_heads=a0.kv_heads, head_dim=a0.head_dim,
                       ffn_hidden=m0.ffn_hidden, gated=m0.gated, norm=a0.norm, bias=a0.bias or m0.bias,
                       qkv_bias=a0.qkv_bias, tied=head[0].tied)


def _norm(kind: str, hidden: int) -> nn.Module:
    # LayerNorm carries weight and bias (2h), RMSNorm weight only (h): Layer.norm_params counts the same.
    return nn.LayerNorm(hidden) if kind == "layernorm" else nn.RMSNorm(hidden)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles (Su et al. 2021, rotate-half form)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, s: DecoderSpec):
        super().__init__()
        qkv_bias = s.qkv_bias or s.bias
        self.head_dim = s.head_dim
        self.rep = s.heads // s.kv_heads  # query heads per key/value head (GQA)
        self.rope = s.rope
        self.wq = nn.Linear(s.hidden, s.heads * s.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(s.heads * s.head_dim, s.hidden, bias=s.bias)
        # Selective recompute (Korthikanti 2022): keep Q, K, V, recompute the attention core in backward.
        self.recompute_core = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds heads/tp of them (column-parallel wq/wk/wv).
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.rope:
            pos = torch.arange(t, device=x.device, dtype=torch.float32)
            inv = ROPE_THETA ** (-torch.arange(0, self.head_dim, 2, device=x.device, dtype=torch.float32)
                                 / self.head_dim)
            ang = torch.outer(pos, inv)
            cos, sin = ang.cos().to(q.dtype), ang.sin().to(q.dtype)
            q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        if self.rep > 1:
            k = k.repeat_interleave(self.rep, dim=1)
            v = v.repeat_interleave(self.rep, dim=1)
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(_sdpa, q, k, v, use_reentrant=False)
        else:
            out = _sdpa(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, s: DecoderSpec):
        super().__init__()
        self.gated = s.gated
        self.w1 = nn.Linear(s.hidden, s.ffn_hidden, bias=s.bias)
        self.w3 = nn.Linear(s.hidden, s.ffn_hidden, bias=s.bias) if s.gated else None
        self.w2 = nn.Linear(s.ffn_hidden, s.hidden, bias=s.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU (Shazeer 2020)
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(.)). The planner's attention and mlp Layers."""

    def __init__(self, s: DecoderSpec):
        super().__init__()
        self.attention_norm = _norm(s.norm, s.hidden)
        self.attention = Attention(s)
        self.ffn_norm = _norm(s.norm, s.hidden)
        self.feed_forward = FeedForward(s)
        # Full recompute: keep only the block input, rerun the block in backward (Megatron "full").
        self.recompute_full = False

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_full and torch.is_grad_enabled():
            return checkpoint(self._body, x, use_reentrant=False)
        return self._body(x)


class Embedding(nn.Module):
    """Token (+ learned position) embedding: the planner's embedding Layer."""

    def __init__(self, s: DecoderSpec):
        super().__init__()
        self.tok = nn.Embedding(s.vocab, s.hidden)
        self.pos = nn.Embedding(s.positions, s.hidden) if s.positions else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens)
        if self.pos is not None:
            h = h + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return h


class Decoder(nn.Module):
    """The whole model, or one pipeline chunk of it (`chunk`): a chunk without the embedding takes hidden
    states instead of token ids; one without the head returns hidden states instead of logits."""

    def __init__(self, s: DecoderSpec, init_seed: int | None = 0):
        super().__init__()
        self.spec = s
        self.tok_embeddings = Embedding(s)
        self.layers = nn.ModuleDict({str(i): Block(s) for i in range(s.blocks)})
        self.norm = _norm(s.norm, s.hidden)
        self.output = None if s.tied else nn.Linear(s.hidden, s.vocab, bias=False)
        if init_seed is not None:
            self.reset_parameters(init_seed)

    def reset_parameters(self, seed: int) -> None:
        """Deterministic initialisation from `seed` alone, in parameter-name order: every rank builds
        the same full model, so a sharded run starts from exactly the single-process weights."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * INIT_STD)

    def chunk(self, lo: int, hi: int, first: bool, last: bool) -> Decoder:
        """A Decoder sharing this one's modules for blocks [lo, hi), with the embedding when `first` and
        the final norm and head when `last`. Parameter names stay those of the full model."""
        if self.spec.tied and not (first and last):
            raise BadInput("tied input/output embeddings cannot be split over pipeline stages by the torch "
                           "backend; use pp=1 or an untied model")
        part = Decoder.__new__(Decoder)
        nn.Module.__init__(part)
        part.spec = self.spec
        part.tok_embeddings = self.tok_embeddings if first else None
        part.layers = nn.ModuleDict({str(i): self.layers[str(i)] for i in range(lo, hi)})
        part.norm = self.norm if last else None
        part.output = self.output if last else None
        return part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for block in self.layers.values():
            h = block(h)
        if self.norm is None:
            return h
        h = self.norm(h)
        if self.output is not None:
            return self.output(h)
        return F.linear(h, self.tok_embeddings.tok.weight)  # tied head: the embedding matrix


def build_decoder(graph: ModelGraph, init_seed: int | None = 0) -> Decoder:
    return Decoder(spec_from_graph(graph), init_seed=init_seed)


def tiny_graph(family: str = "llama", layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               ffn_hidden: int = 128, vocab: int = 256, max_seq: int = 64) -> ModelGraph:
    """A few-thousand-parameter decoder for tests: Llama style, or GPT style (tied, learned positions)."""
    from planner.core.builders import TransformerConfig, build_transformer

    if family == "llama":
        cfg = TransformerConfig(name=f"test-llama-{hidden}", layers=layers, hidden=hidden, heads=heads,
                                kv_heads=kv_heads, ffn_hidden=ffn_hidden, vocab=vocab, max_seq=max_seq)
    elif family == "gpt":
        cfg = TransformerConfig(name=f"test-gpt-{hidden}", layers=layers, hidden=hidden, heads=heads,
                                ffn_hidden=ffn_hidden, vocab=vocab, max_seq=max_seq, gated_mlp=False,
                                norm="layernorm", position="learned", tied_embeddings=True, bias=True)
    else:
        raise BadInput(f"family must be 'llama' or 'gpt', got {family!r}")
    return build_transformer(cfg)


__all__ = ["Decoder", "DecoderSpec", "build_decoder", "spec_from_graph", "tiny_graph", "Layer"]
