"""Architecture descriptions a user writes (the project model file) and the ModelGraphs they build.

Two families: decoder-only transformers (GPT-, Llama-, Mixtral-, DeepSeek-style; dense or MoE, MHA,
GQA or MLA) and diffusion models (a trainable transformer backbone beside frozen encoders). The HF
importer and `backtest` translate into TransformerConfig too, so there is one builder for every source.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from planner.core.model import MLA, Layer, ModelGraph, chain


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    experts: PositiveInt
    topk: PositiveInt
    ffn_hidden: PositiveInt = Field(description="width of one routed expert")
    shared_experts: NonNegativeInt = 0
    shared_ffn_hidden: NonNegativeInt = 0
    shared_expert_gate: bool = False  # Qwen2-MoE gates its shared expert with a h->1 projection
    router_bias: bool = False  # DeepSeek-V3's e_score_correction_bias
    dense_layers_first: NonNegativeInt = 0  # DeepSeek-V3: the first 3 blocks keep a dense MLP
    every: PositiveInt = 1  # a MoE block every `every` blocks (Qwen2-MoE decoder_sparse_step)
    # Group-limited routing (DeepSeek-V2 section 2.1.3 device-limited, DeepSeek-V3 section 2.1.2 node-limited;
    # HF n_group / topk_group, Megatron --moe-router-num-groups / --moe-router-group-topk): the experts fall
    # into route_groups equal groups and a token's topk experts come from its best route_topk_groups groups.
    route_groups: NonNegativeInt = 0
    route_topk_groups: NonNegativeInt = 0

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.topk > self.experts:
            raise ValueError(f"topk {self.topk} exceeds experts {self.experts}")
        if self.shared_experts and not self.shared_ffn_hidden:
            raise ValueError("shared_experts given without shared_ffn_hidden")
        g, tg = self.route_groups, self.route_topk_groups
        if g and (self.experts % g or not 0 < tg <= g):
            raise ValueError(f"route_groups (HF n_group) {g} must divide the {self.experts} experts, "
                             f"and route_topk_groups (HF topk_group) {tg} be 1..{g}")
        return self


class TransformerConfig(BaseModel):
    """A decoder-only transformer. Field names follow Megatron's where they differ from HF's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: str = ""
    layers: PositiveInt = Field(le=10_000)
    hidden: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt | None = None  # None: multi-head attention (kv_heads = heads)
    head_dim: PositiveInt | None = None  # None: hidden / heads
    ffn_hidden: PositiveInt
    vocab: PositiveInt
    gated_mlp: bool = True
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    position: Literal["rope", "learned"] = "rope"
    max_seq: PositiveInt = 4096
    tied_embeddings: bool = False
    bias: bool = False
    qkv_bias: bool = False
    dropout: bool = False
    moe: MoEConfig | None = None
    mla: MLA | None = None

    @model_validator(mode="after")
    def _check(self) -> TransformerConfig:
        kv = self.kv_heads or self.heads
        if self.heads % kv:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({kv})")
        if self.head_dim is None and self.mla is None and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) is not a multiple of heads ({self.heads}); give head_dim")
        return self

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


def build_transformer(cfg: TransformerConfig) -> ModelGraph:
    h = cfg.hidden
    common = dict(hidden=h, norm=cfg.norm, bias=cfg.bias, dropout=cfg.dropout)
    layers = [Layer(name="embedding", kind="embedding", hidden=h, vocab=cfg.vocab,
                    positions=cfg.max_seq if cfg.position == "learned" else 0)]
    for i in range(cfg.layers):
        layers.append(Layer(
            name=f"block{i}.attention", kind="attention", block=i, heads=cfg.heads,
            kv_heads=cfg.kv_heads or cfg.heads, head_dim=cfg.resolved_head_dim, qkv_bias=cfg.qkv_bias,
            mla=cfg.mla, **common))
        moe = cfg.moe
        is_moe = moe is not None and i >= moe.dense_layers_first and (i + 1) % moe.every == 0
        if is_moe:
            layers.append(Layer(
                name=f"block{i}.moe", kind="moe", block=i, ffn_hidden=moe.ffn_hidden, gated=cfg.gated_mlp,
                experts=moe.experts, topk=moe.topk, shared_experts=moe.shared_experts,
                shared_ffn_hidden=moe.shared_ffn_hidden, shared_expert_gate=moe.shared_expert_gate,
                router_bias=moe.router_bias, route_groups=moe.route_groups, route_topk_groups=moe.route_topk_groups,
                **common))
        else:
            layers.append(Layer(name=f"block{i}.mlp", kind="mlp", block=i, ffn_hidden=cfg.ffn_hidden,
                                gated=cfg.gated_mlp, **common))
    layers.append(Layer(name="head", kind="head", vocab=cfg.vocab, tied=cfg.tied_embeddings, **common))
    family = "moe" if cfg.moe else "decoder"
    return chain(cfg.name, layers, source=cfg.source, family=family, default_seq=cfg.max_seq)


# ---------------------------------------------------------------------------------------------------
# Diffusion: frozen text encoder and VAE beside a trainable transformer backbone (DiT / MMDiT style).


class TextEncoderConfig(BaseModel):
    """A frozen transformer text encoder (CLIP / T5 encoder)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "text_encoder"
    layers: PositiveInt = Field(le=10_000)
    hidden: PositiveInt
    heads: PositiveInt
    ffn_hidden: PositiveInt
    vocab: PositiveInt
    tokens: PositiveInt = Field(77, description="prompt length, fixed whatever the image size")
    gated_mlp: bool = False
    norm: Literal["rmsnorm", "layernorm"] = "layernorm"
    bias: bool = True
    trainable: bool = False


class VAEConfig(BaseModel):
    """A frozen VAE encoder, opaque: its published parameter count and FLOPs per image."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    params: PositiveInt
    gflops_per_sample: float = Field(gt=0)
    latent_elems_per_sample: PositiveInt
    trainable: bool = False


class DiffusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    source: str = ""
    text_encoders: list[TextEncoderConfig] = Field(min_length=1)
    vae: VAEConfig
    backbone: TransformerConfig = Field(description="the denoiser; its tokens are latent patches")
    latent_tokens: PositiveInt = Field(description="patches per image = the workload's sequence length")
    conditioning_hidden: PositiveInt | None = None


def build_diffusion(cfg: DiffusionConfig) -> ModelGraph:
    layers: list[Layer] = []
    edges: list[tuple[str, str]] = []
    enc_outputs = []
    for enc in cfg.text_encoders:
        prev = f"{enc.name}.embedding"
        layers.append(Layer(name=prev, kind="embedding", hidden=enc.hidden, vocab=enc.vocab,
                            positions=enc.tokens, trainable=enc.trainable, fixed_tokens=enc.tokens))
        for i in range(enc.layers):
            name = f"{enc.name}.block{i}"
            layers.append(Layer(
                name=name, kind="encoder", hidden=enc.hidden, heads=enc.heads, kv_heads=enc.heads,
                head_dim=enc.hidden // enc.heads, ffn_hidden=enc.ffn_hidden, gated=enc.gated_mlp,
                norm=enc.norm, bias=enc.bias, causal=False, trainable=enc.trainable,
                fixed_tokens=enc.tokens))
            edges.append((prev, name))
            prev = name
        enc_outputs.append(prev)
    layers.append(Layer(name="vae.encoder", kind="vae", hidden=1, trainable=cfg.vae.trainable,
                        params_fixed=cfg.vae.params, flops_per_sample=cfg.vae.gflops_per_sample * 1e9,
                        output_elems_per_sample=cfg.vae.latent_elems_per_sample))
    backbone = build_transformer(cfg.backbone)
    # The denoiser attends over all latent patches (not causal); its "embedding" is a patch projection.
    for layer in backbone.layers:
        layers.append(layer.model_copy(update={"name": f"backbone.{layer.name}", "causal": False}))
    first = f"backbone.{backbone.layers[0].name}"
    edges += [(f"backbone.{a}", f"backbone.{b}") for a, b in backbone.edges]
    edges.append(("vae.encoder", first))
    for out in enc_outputs:
        # Text conditioning enters the first backbone block (cross-attention or joint attention).
        edges.append((out, f"backbone.{backbone.layers[1].name}"))
    return ModelGraph(name=cfg.name, source=cfg.source, family="diffusion", layers=layers, edges=edges,
                      default_seq=cfg.latent_tokens)
