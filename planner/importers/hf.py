"""Hugging Face config.json -> TransformerConfig -> ModelGraph, offline (no download, no weights).

Key names are those of the transformers library's configuration classes for each `model_type`.
"""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from planner.builders import MoEConfig, TransformerConfig, build_transformer
from planner.catalog import validation_message
from planner.errors import BadInput
from planner.model import MLA, ModelGraph

_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "mixtral", "qwen2_moe", "qwen3_moe"}
SUPPORTED = sorted(_LLAMA_LIKE | {"deepseek_v3", "deepseek_v2", "gpt2", "gpt_neox"})


def _need(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise BadInput(f"{where}: missing key '{key}' for model_type '{cfg.get('model_type')}'")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise BadInput(f"{where}: key '{key}' must be an integer, got {value!r}")
    return int(value)


def hf_to_transformer(cfg: dict, where: str, name: str | None = None) -> TransformerConfig:
    mt = cfg.get("model_type")
    if mt is None:
        raise BadInput(f"{where}: config.json has no 'model_type'; supported: {', '.join(SUPPORTED)}")
    if mt not in SUPPORTED:
        raise BadInput(f"{where}: model_type '{mt}' is not supported; supported: {', '.join(SUPPORTED)}")
    name = name or cfg.get("_name_or_path") or mt
    src = f"Hugging Face config.json ({where})"
    need = lambda k: _need(cfg, k, where)  # noqa: E731

    try:
        if mt == "gpt2":
            h = need("n_embd")
            fields = dict(layers=need("n_layer"), hidden=h, heads=need("n_head"),
                          ffn_hidden=cfg.get("n_inner") or 4 * h, vocab=need("vocab_size"), gated_mlp=False,
                          norm="layernorm", position="learned", max_seq=cfg.get("n_positions", 1024),
                          tied_embeddings=cfg.get("tie_word_embeddings", True), bias=True, dropout=True)
        elif mt == "gpt_neox":
            fields = dict(layers=need("num_hidden_layers"), hidden=need("hidden_size"),
                          heads=need("num_attention_heads"), ffn_hidden=need("intermediate_size"),
                          vocab=need("vocab_size"), gated_mlp=False, norm="layernorm", position="rope",
                          max_seq=cfg.get("max_position_embeddings", 2048),
                          tied_embeddings=cfg.get("tie_word_embeddings", False), bias=True)
        else:
            heads = need("num_attention_heads")
            fields = dict(layers=need("num_hidden_layers"), hidden=need("hidden_size"), heads=heads,
                          kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim"),
                          ffn_hidden=need("intermediate_size"), vocab=need("vocab_size"), gated_mlp=True,
                          norm="rmsnorm", position="rope", max_seq=cfg.get("max_position_embeddings", 4096),
                          tied_embeddings=cfg.get("tie_word_embeddings", False),
                          # Qwen2 and Qwen2-MoE put biases on q, k, v; Llama's attention_bias says so itself.
                          qkv_bias=mt in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias", False)))
            if mt == "mixtral":
                fields["moe"] = MoEConfig(experts=need("num_local_experts"), topk=need("num_experts_per_tok"),
                                          ffn_hidden=need("intermediate_size"))
            elif mt in ("qwen2_moe", "qwen3_moe"):
                shared = cfg.get("shared_expert_intermediate_size") or 0
                if cfg.get("mlp_only_layers"):
                    raise BadInput(f"{where}: 'mlp_only_layers' is not supported yet; remove it or set it to []")
                fields["moe"] = MoEConfig(
                    experts=need("num_experts"), topk=need("num_experts_per_tok"),
                    ffn_hidden=need("moe_intermediate_size"), shared_experts=1 if shared else 0,
                    shared_ffn_hidden=shared, shared_expert_gate=bool(shared),
                    every=cfg.get("decoder_sparse_step", 1))
            elif mt in ("deepseek_v3", "deepseek_v2"):
                fields["mla"] = MLA(q_lora_rank=cfg.get("q_lora_rank") or 0, kv_lora_rank=need("kv_lora_rank"),
                                    qk_nope_head_dim=need("qk_nope_head_dim"),
                                    qk_rope_head_dim=need("qk_rope_head_dim"), v_head_dim=need("v_head_dim"))
                fields["head_dim"] = None
                fields["kv_heads"] = heads
                if cfg.get("moe_layer_freq", 1) != 1:
                    raise BadInput(f"{where}: moe_layer_freq other than 1 is not supported")
                shared = cfg.get("n_shared_experts") or 0
                # Multi-token-prediction modules (num_nextn_predict_layers) are training-only extras that the
                # published 671B total leaves out; they are not built.
                fields["moe"] = MoEConfig(
                    experts=need("n_routed_experts"), topk=need("num_experts_per_tok"),
                    ffn_hidden=need("moe_intermediate_size"), shared_experts=shared,
                    shared_ffn_hidden=need("moe_intermediate_size") * 1 if shared else 0,
                    router_bias=mt == "deepseek_v3", dense_layers_first=cfg.get("first_k_dense_replace", 0),
                    route_groups=cfg.get("n_group") or 0,
                    route_topk_groups=(cfg.get("topk_group") or 0) if cfg.get("n_group") else 0)
        return TransformerConfig(name=name, source=src, **fields)
    except ValidationError as e:
        raise BadInput(validation_message(e, where)) from None


def from_hf_config(cfg: dict, where: str, name: str | None = None) -> ModelGraph:
    return build_transformer(hf_to_transformer(cfg, where, name))
