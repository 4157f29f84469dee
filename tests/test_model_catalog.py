"""The model catalog: every preset DESIGN.md names loads, its graph is a DAG, the diffusion model's
frozen encoders sit beside (not inside) its chain, and a layer's forward FLOPs match Kaplan's count."""
from __future__ import annotations

import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # running pytest without an installed package
    sys.path.insert(0, str(REPO_ROOT))

from planner.importers import load_model, model_catalog, model_names  # noqa: E402

# DESIGN.md section 3, "Preset names that must exist" (models), plus the diffusion model.
REQUIRED = ["gpt3-175b", "llama3-8b", "llama3-70b", "llama3.1-405b", "mixtral-8x7b", "mixtral-8x22b",
            "qwen2-57b-a14b", "deepseek-v3", "tiny-llama-20m", "tiny-gpt-20m"]
DIFFUSION = "pixart-alpha-512"


def test_required_presets_exist():
    names = set(model_names())
    missing = [n for n in REQUIRED + [DIFFUSION] if n not in names]
    assert not missing, f"missing model presets: {missing}"


def test_catalog_has_a_diffusion_model_with_frozen_text_encoder():
    fams = {n: load_model(n).family for n in model_names()}
    assert "diffusion" in fams.values()


@pytest.mark.parametrize("name", model_names())
def test_every_preset_loads_as_a_dag(name):
    g = load_model(name)
    assert g.params > 0 and g.layers
    names = [layer.name for layer in g.layers]
    assert len(set(names)) == len(names), "duplicate layer names"
    for a, b in g.edges:
        assert a in g.by_name and b in g.by_name, f"edge {a}->{b} names an unknown layer"
    graph = g.graph
    assert nx.is_directed_acyclic_graph(graph)
    assert nx.is_weakly_connected(graph)
    # one sink: the output head
    sinks = [n for n in graph.nodes if graph.out_degree(n) == 0]
    assert len(sinks) == 1 and g.by_name[sinks[0]].kind == "head"
    assert len(g.topological()) == len(g.layers)
    assert g.num_blocks >= 1
    assert 0 < g.active_params <= g.params
    assert 0 < g.trainable_params <= g.params
    assert g.summary()["params"] == g.params


@pytest.mark.parametrize("name", [n for n in REQUIRED if n != DIFFUSION])
def test_decoders_are_chains(name):
    g = load_model(name)
    graph = g.graph
    assert all(graph.in_degree(n) <= 1 and graph.out_degree(n) <= 1 for n in graph.nodes)
    assert g.family in ("decoder", "moe")
    assert g.trainable_params == g.params


def test_catalog_files_are_named_by_stem():
    cat = model_catalog()
    for name, path in cat.items():
        assert path.stem == name
    assert cat["llama3-8b"].parent.name == "hf"
    assert cat["gpt3-175b"].parent.name == "models"


def test_diffusion_frozen_encoders_feed_the_backbone():
    g = load_model(DIFFUSION)
    graph = g.graph
    frozen = [layer for layer in g.layers if not layer.trainable]
    assert frozen, "no frozen layers"
    kinds = {layer.kind for layer in frozen}
    assert "vae" in kinds and "encoder" in kinds
    # Every frozen layer is a text encoder / VAE piece; the backbone is all trainable.
    for layer in g.layers:
        assert layer.trainable == layer.name.startswith("backbone."), layer.name
    assert g.trainable_params < g.params
    assert g.trainable_params == sum(layer.params() for layer in g.layers if layer.name.startswith("backbone."))
    # Not a chain: some backbone layer has more than one input (VAE latents / text conditioning).
    assert any(graph.in_degree(n) > 1 for n in graph.nodes) or \
        sum(1 for n in graph.nodes if graph.in_degree(n) == 0) > 1
    sources = [n for n in graph.nodes if graph.in_degree(n) == 0]
    assert len(sources) >= 2  # text encoder embedding and the VAE
    backbone = [n for n in graph.nodes if n.startswith("backbone.")]
    for layer in frozen:
        # each frozen layer reaches the backbone, and nothing in the backbone feeds a frozen layer
        assert any(nx.has_path(graph, layer.name, b) for b in backbone[:2]), layer.name
        assert not any(graph.has_edge(b, layer.name) for b in backbone)
    # Frozen layers keep no activations for backward; the text encoder sees its fixed 120 tokens.
    enc = next(layer for layer in frozen if layer.kind == "encoder")
    assert enc.activation_bytes(2, 1024) == 0
    assert enc.tokens(2, 1024) == 2 * 120
    # The denoiser attends over all patches: not causal.
    assert all(not layer.causal for layer in g.layers if layer.kind == "attention")


# ------------------------------------------------------------------------------------------------
# FLOPs: Kaplan et al. 2020 (Table 1): C_forward per token = 2 N + 2 n_layer n_ctx d_attn, N the
# non-embedding parameters, plus the de-embedding 2 d_model n_vocab. Causal attention: the QK^T and AV
# products over the (halved) causal square are 2 * n_ctx * d_attn per token per layer.


def _matmul_params(layer) -> int:
    """Weights of the GEMMs one token runs through: the layer's parameters minus norms and biases."""
    h = layer.hidden
    if layer.kind == "attention":
        a, kv, d = layer.heads, layer.kv_heads, layer.head_dim
        return h * a * d + 2 * h * kv * d + a * d * h
    if layer.kind == "mlp":
        return (3 if layer.gated else 2) * h * layer.ffn_hidden
    if layer.kind == "moe":
        m = 3 if layer.gated else 2
        routed = layer.topk * m * h * layer.ffn_hidden  # topk experts per token
        shared = layer.shared_experts * m * h * layer.shared_ffn_hidden
        return h * layer.experts + routed + shared  # + router
    if layer.kind == "head":
        return layer.vocab * h  # de-embedding, whether tied or not
    return 0


@pytest.mark.parametrize("name,s", [("llama3-8b", 8192), ("gpt3-175b", 2048), ("tiny-gpt-20m", 512),
                                    ("gpt2", 1024), ("qwen2-7b", 4096)])
def test_layer_flops_match_kaplan_by_hand(name, s):
    g = load_model(name)
    b = 2
    total_by_hand = 0.0
    for layer in g.layers:
        by_hand = 2 * _matmul_params(layer) * b * s
        if layer.kind == "attention":
            by_hand += 2 * s * layer.heads * layer.head_dim * b * s  # causal QK^T + AV
        got = layer.flops_fwd(b, s)
        assert got == pytest.approx(by_hand, rel=0.01), layer.name
        total_by_hand += by_hand
    assert g.flops_fwd(b, s) == pytest.approx(total_by_hand, rel=0.01)

    # Kaplan: 2 * N_nonembedding (norms and biases included: < 1% of N) + attention + de-embedding.
    emb = next(layer for layer in g.layers if layer.kind == "embedding")
    head = next(layer for layer in g.layers if layer.kind == "head")
    n_nonemb = g.params - emb.params() - (0 if head.tied else head.vocab * head.hidden)
    attn = [layer for layer in g.layers if layer.kind == "attention"]
    d_attn = attn[0].heads * attn[0].head_dim
    kaplan = 2 * n_nonemb + 2 * len(attn) * s * d_attn + 2 * head.vocab * head.hidden
    assert g.flops_fwd(1, s) / s == pytest.approx(kaplan, rel=0.01)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen2-57b-a14b", "moe-tiny"])
def test_moe_flops_follow_active_params(name):
    g = load_model(name)
    s = 4096
    emb = next(layer for layer in g.layers if layer.kind == "embedding")
    head = next(layer for layer in g.layers if layer.kind == "head")
    attn = [layer for layer in g.layers if layer.kind == "attention"]
    d_attn = attn[0].heads * attn[0].head_dim
    n_active_nonemb = g.active_params - emb.params() - (0 if head.tied else head.vocab * head.hidden)
    expected = 2 * n_active_nonemb + 2 * len(attn) * s * d_attn + 2 * head.vocab * head.hidden
    assert g.flops_fwd(1, s) / s == pytest.approx(expected, rel=0.01)
    for layer in g.layers:
        if layer.kind == "moe":
            assert layer.flops_fwd(1, s) == pytest.approx(2 * _matmul_params(layer) * s, rel=1e-9)


def test_tensor_parallel_splits_dense_flops_evenly():
    g = load_model("llama3-8b")
    for layer in g.layers:
        if layer.kind in ("attention", "mlp", "head"):
            assert layer.flops_fwd(1, 4096, tp=4) * 4 == pytest.approx(layer.flops_fwd(1, 4096))


# ------------------------------------------------------------------------------------------------
# Sliding-window attention (Mistral, Phi-3, Gemma 2's local layers): FLOPs and saved scores scale with
# min(seq, window), not seq.

def _attn(**kw):
    from planner.core.model import Layer

    return Layer(name="a", kind="attention", hidden=8, heads=2, kv_heads=1, head_dim=4, **kw)


@pytest.mark.parametrize("s,w", [(64, 16), (64, 64), (64, 1000), (1000, 7)])
def test_sliding_window_attention_flops_by_hand(s, w):
    # Query i (0-based) sees min(i + 1, w) keys under a causal window; QK^T and AV cost 2 * 2 * d FLOPs per
    # (query, key) pair and head: per pair 2 * a * 2 * d = 32 FLOPs with a = 2, d = 4.
    pairs = sum(min(i + 1, w) for i in range(s))
    full = _attn()
    windowed = _attn(window=w)
    got = float(windowed.attention_core_flops(1, s))
    if w >= s:
        assert got == float(full.attention_core_flops(1, s))  # a window at least the sequence changes nothing
    # the formula s*w - w^2/2 leaves out the diagonal's w/2 pairs, as s^2/2 leaves out s/2 for causal
    assert abs(got - 32 * pairs) <= 32 * min(s, w) / 2 + 1e-9
    assert got <= float(full.attention_core_flops(1, s))
    # numpy arrays of sequence lengths (the search evaluates many plans at once)
    arr = windowed.attention_core_flops(np.array([1, 2]), np.array([s, s]))
    assert list(arr) == [got, 2 * got]


def test_sliding_window_saved_scores_without_flash():
    # Without FlashAttention the softmax output (2 bytes) per kept score is saved: b * a * s * min(s, w).
    s, w = 64, 16
    full = _attn().activation_bytes(1, s, flash=False)
    win = _attn(window=w).activation_bytes(1, s, flash=False)
    assert full - win == 1 * 2 * s * (s - w) * 2
    assert _attn(window=w).activation_bytes(1, s) == _attn().activation_bytes(1, s)  # flash: no scores kept


def test_qk_norm_and_post_norm_save_their_inputs():
    s = 32
    base = _attn().activation_bytes(1, s)
    # q and k before their norms: t * (a + kv) * d * 2 bytes = 32 * 12 * 2
    assert _attn(qk_norm="full").activation_bytes(1, s) - base == s * 12 * 2
    # the post-norm's input, t * h * 2 bytes
    assert _attn(post_norm=True).activation_bytes(1, s) - base == s * 8 * 2


def test_gemma2_local_layers_cost_less_attention_at_long_sequences():
    from planner.importers import load_model

    g = load_model("gemma2-9b")
    attn = [layer for layer in g.layers if layer.kind == "attention"]
    assert sum(1 for layer in attn if layer.window == 4096) == 21 and len(attn) == 42
    s = 8192
    got = sum(float(layer.attention_core_flops(1, s)) for layer in attn)
    per_pair = 2 * 16 * 2 * 256  # 2 FLOPs x heads x (QK^T + AV) x head_dim
    local = s * 4096 - 4096**2 / 2  # Longformer-style band, sum of min(i+1, w)
    assert got == pytest.approx(per_pair * (21 * s * s / 2 + 21 * local))
    # at or below the window every layer is the causal square
    assert sum(float(layer.attention_core_flops(1, 4096)) for layer in attn) == pytest.approx(
        42 * per_pair * 4096**2 / 2)
