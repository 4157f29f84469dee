"""Megatron-LM: a launch script with the arguments of pretrain_gpt.py.

Flag spellings are those of megatron/training/arguments.py as listed in docs/launchers.md
section 2.1 (main @ d98e8a64dd, cross-checked against core_v0.15.0); the section 2.0 rule (TransformerConfig
field `x_y` -> `--x-y`) gives the few model-shape flags that table does not list, each marked below.
The script keeps Megatron's example layout (examples/gpt3/train_gpt3_175b_distributed.sh): node counts as
shell variables, the arguments in a bash array, data and tokenizer arguments passed through "$@".
"""
from __future__ import annotations

import re
import shlex

from planner.core.errors import BadInput
from planner.export.common import ExportContext, LauncherSettings, Unsupported, check_common, header_lines

LAUNCHER = "Megatron-LM"


# docs/launchers.md#schedule: the schedules Megatron-LM runs (pp > 1: 1F1B, or interleaved with
# --num-layers-per-virtual-pipeline-stage); every other one is refused
_SCHEDULES = ("1f1b", "interleaved-1f1b")


def check(ctx: ExportContext) -> None:
    """Refuse (Unsupported) what Megatron-LM cannot run; the rule `plan --for megatron` and a plan's
    `launchers` list use too (planner/export/launchers.py)."""
    p = ctx.plan
    check_common(ctx, LAUNCHER)
    sched = ctx.schedule()
    # docs/launchers.md#schedule: PP > 1 runs 1F1B, or interleaved 1F1B with virtual stages;
    # no GPipe or zero-bubble flag at HEAD.
    if sched is not None and sched not in _SCHEDULES:
        raise Unsupported(LAUNCHER, "schedule", f"'{sched}' has no Megatron flag (pp > 1 runs 1F1B, or "
                          "interleaved 1F1B with virtual stages); re-plan with --for megatron (or --schedule 1f1b)")
    if p.vpp > 1 and p.pp == 1:
        raise Unsupported(LAUNCHER, "vpp", "virtual pipeline stages need pipeline parallelism (pp > 1)")
    # validate_args: tp 1 turns --sequence-parallel off, and --tp-comm-overlap then asserts it on; with tp 1
    # there is nothing to overlap, so the flag is left out (to_megatron) rather than refused here.
    if p.overlap_tp_comm and p.tp > 1 and not p.sp:
        raise Unsupported(LAUNCHER, "overlap_tp_comm", "--tp-comm-overlap requires --sequence-parallel (sp); "
                          "re-plan with --for megatron (or --sp)")
    _check_model(ctx)


def _check_model(ctx: ExportContext) -> None:
    """Architectures Megatron's GPT model has no flag for (docs/launchers.md#architecture)."""
    for layer in ctx.model.layers:
        if layer.kind == "attention" and layer.qk_norm == "full":
            raise Unsupported(LAUNCHER, "model", f"{ctx.pf.model}: --qk-layernorm normalizes each head; this "
                              "model normalizes the whole q/k projection (OLMo-2); no Megatron flag")
        if layer.kind == "embedding" and layer.positions and layer.positions < ctx.workload.seq_len:
            raise Unsupported(LAUNCHER, "model", f"{ctx.pf.model}: learned positions ({layer.positions}) shorter "
                              f"than seq {ctx.workload.seq_len}")


def _layout(stage_layers: tuple[int, ...]) -> str:
    """--pipeline-model-parallel-layout (docs/launchers.md#uneven-pp): E = embedding, t = decoder layer,
    L = loss, `|` between stages, listed chunk by chunk (virtual stage v of rank r at index v*pp + r, as in
    Megatron's docs/.../pipeline_parallel_layout.md table)."""
    stages = ["t" * n for n in stage_layers]
    stages[0] = "E" + stages[0]
    stages[-1] = stages[-1] + "L"
    return "|".join(stages)


def _pipeline_args(ctx: ExportContext) -> list[tuple[str, object]]:
    p = ctx.plan
    if p.pp == 1 and p.vpp == 1:
        return []
    counts = ctx.stage_layers()
    out: list[tuple[str, object]] = []
    if len(set(counts)) == 1:
        if p.vpp > 1:
            # docs/launchers.md#virtual-pipeline: VPP = num_layers / PP / L.
            out.append(("--num-layers-per-virtual-pipeline-stage", counts[0]))
        return out
    middle = counts[1:-1]
    if p.vpp == 1 and len(set(middle)) <= 1:
        # docs/launchers.md#uneven-pp: explicit transformer-layer counts.
        if counts[0] != (middle[0] if middle else None):
            out.append(("--decoder-first-pipeline-num-layers", counts[0]))
        if counts[-1] != (middle[0] if middle else None):
            out.append(("--decoder-last-pipeline-num-layers", counts[-1]))
        return out
    # Anything else (uneven middle stages, uneven chunks with VPP) needs the free-form layout; it also sets
    # VPP, and at most one of the VPP flags may be given (docs/launchers.md#virtual-pipeline).
    out.append(("--pipeline-model-parallel-layout", _layout(counts)))
    return out


# RoPE theta of the catalog models (their config.json rope_theta); the model graph does not carry it, and
# Megatron's default --rotary-base 10000 would train another model. Prefix match, longest first.
_ROPE_BASE = {"llama3": 500000, "mixtral": 1000000, "mistral": 1000000, "qwen": 1000000, "deepseek": 10000}


def rope_base(model_name: str) -> int | None:
    name = model_name.lower().rsplit("/", 1)[-1]
    return next((v for k, v in sorted(_ROPE_BASE.items(), key=lambda kv: -len(kv[0])) if name.startswith(k)), None)


def _model_args(ctx: ExportContext) -> list[tuple[str, object]]:
    """Model architecture from the planner's model graph (docs/launchers.md#architecture; * = section 2.0
    rule): Megatron's defaults (learned positions, tied embeddings, GeLU, LayerNorm, allgather MoE) train
    another model than a Llama or Mixtral, so every difference from them is written."""
    blocks = [layer for layer in ctx.model.layers if layer.block is not None and layer.trainable]
    attn = next((layer for layer in blocks if layer.kind == "attention"), None)
    mlp = next((layer for layer in blocks if layer.kind == "mlp"), None)
    moe = next((layer for layer in blocks if layer.kind == "moe"), None)
    emb = next((layer for layer in ctx.model.layers if layer.kind == "embedding"), None)
    head = next((layer for layer in ctx.model.layers if layer.kind == "head"), None)
    out: list[tuple[str, object]] = [("--num-layers", ctx.num_blocks)]
    if attn is None:
        return out
    out += [("--hidden-size", attn.hidden), ("--num-attention-heads", attn.heads)]
    if attn.mla is not None:
        # MLA (DeepSeek-V2/V3): TransformerConfig.multi_latent_attention and MLATransformerConfig's dims;
        # validate_args: GQA is mutually exclusive with it
        m = attn.mla
        out.append(("--multi-latent-attention", None))  # *
        if m.q_lora_rank:
            out.append(("--q-lora-rank", m.q_lora_rank))
        out += [("--kv-lora-rank", m.kv_lora_rank), ("--qk-head-dim", m.qk_nope_head_dim),
                ("--qk-pos-emb-head-dim", m.qk_rope_head_dim), ("--v-head-dim", m.v_head_dim)]
    elif attn.kv_heads and attn.kv_heads != attn.heads:
        out += [("--group-query-attention", None), ("--num-query-groups", attn.kv_heads)]
    if attn.mla is None and attn.head_dim and attn.head_dim * attn.heads != attn.hidden:
        out.append(("--kv-channels", attn.head_dim))  # * TransformerConfig.kv_channels
    if emb is None or not emb.positions:
        # rotary positions (the graph has no position table); Megatron's default is learned_absolute
        out.append(("--position-embedding-type", "rope"))
        base = rope_base(ctx.pf.model)
        if base is not None:
            out.append(("--rotary-base", base))
    if head is not None and not head.tied:
        out.append(("--untie-embeddings-and-output-weights", None))  # Megatron ties them by default
    if attn.qk_norm == "head":
        out.append(("--qk-layernorm", None))  # * TransformerConfig.qk_layernorm (per head, uses --normalization)
    if attn.qkv_bias and not attn.bias:
        out.append(("--add-qkv-bias", None))  # * TransformerConfig.add_qkv_bias
    if mlp is not None:
        out.append(("--ffn-hidden-size", mlp.ffn_hidden))
    if moe is not None:
        out += [("--num-experts", moe.experts),
                ("--moe-router-topk", moe.topk),  # * TransformerConfig.moe_router_topk
                ("--moe-ffn-hidden-size", moe.ffn_hidden)]  # * TransformerConfig.moe_ffn_hidden_size
        if moe.shared_experts:
            out.append(("--moe-shared-expert-intermediate-size", moe.shared_experts * moe.shared_ffn_hidden))  # *
        if moe.router_bias:
            # DeepSeek-V3's aux-loss-free balancing: sigmoid scores with a per-expert bias
            out += [("--moe-router-score-function", "sigmoid"), ("--moe-router-enable-expert-bias", None)]  # *
        kinds = [next(layer.kind for layer in blocks if layer.block == b and layer.kind in ("mlp", "moe"))
                 for b in sorted({layer.block for layer in blocks if layer.kind in ("mlp", "moe")})]
        if "mlp" in kinds:
            # dense and MoE blocks mixed (DeepSeek's first dense layers): the per-layer pattern, 1 = MoE
            out.append(("--moe-layer-freq", "[" + ",".join("1" if k == "moe" else "0" for k in kinds) + "]"))
    if (mlp or moe) is not None and (mlp or moe).gated:
        out.append(("--swiglu", None))  # hand-written flag, arguments.py _add_network_size_args
    if attn.norm == "rmsnorm":
        out += [("--normalization", "RMSNorm")]  # * TransformerConfig.normalization
    if not attn.bias:
        out.append(("--disable-bias-linear", None))  # * TransformerConfig.add_bias_linear (True -> --disable-)
    return out


def environment(ctx: ExportContext) -> list[str]:
    """The environment validate_args checks (megatron/training/arguments.py, Hopper and older): tp > 1 or
    cp > 1 asserts CUDA_DEVICE_MAX_CONNECTIONS=1, except under Megatron-FSDP, which asserts it is not 1."""
    p = ctx.plan
    if p.zero in (2, 3):
        return ["unset CUDA_DEVICE_MAX_CONNECTIONS  # Megatron-FSDP: must not be 1 (validate_args)"]
    if p.tp > 1 or p.cp > 1:
        return ["export CUDA_DEVICE_MAX_CONNECTIONS=1  # tp > 1 or cp > 1 (validate_args, before Blackwell)"]
    return []


def to_megatron(ctx: ExportContext) -> str:
    check(ctx)
    p, w = ctx.plan, ctx.workload
    par: list[tuple[str, object]] = [
        # docs/launchers.md#degrees .. "Expert tensor parallel size"
        ("--tensor-model-parallel-size", p.tp),
        ("--pipeline-model-parallel-size", p.pp),
        *_pipeline_args(ctx),
        ("--context-parallel-size", p.cp),
    ]
    if p.cp > 1:
        # the plan's exchange: ring attention is Megatron's p2p, Ulysses its a2a (--cp-comm-type, default p2p)
        par.append(("--cp-comm-type", "a2a" if p.cp_comm == "a2a" else "p2p"))
    if p.ep > 1 or ctx.is_moe:
        par.append(("--expert-model-parallel-size", p.ep))
        if p.etp is not None:  # None = TP size, Megatron's own default
            par.append(("--expert-tensor-parallel-size", p.etp))
        # The default dispatcher is allgather (TransformerConfig.moe_token_dispatcher_type): the plan's
        # exchange is written out. DeepEP runs through the flex dispatcher (--moe-enable-deepep is deprecated
        # at HEAD: transformer_config.py __post_init__).
        if p.moe_dispatch == "deepep":
            par += [("--moe-token-dispatcher-type", "flex"), ("--moe-flex-dispatcher-backend", "deepep")]
        else:
            par.append(("--moe-token-dispatcher-type", "alltoall"))
    if p.sp:
        par.append(("--sequence-parallel", None))
    if p.overlap_tp_comm and p.tp > 1:
        par.append(("--tp-comm-overlap", None))
    # "Distributed optimizer / ZeRO / FSDP": the distributed optimizer is the ZeRO-1 memory profile;
    # Megatron-FSDP optim_grads / optim_grads_params are ZeRO-2 / 3 (docs/user-guide/parallelism-guide.md).
    # The strategy is always written: its CLI default differs between core_v0.15.0 and HEAD.
    if p.zero == 1:
        par.append(("--use-distributed-optimizer", None))
    elif p.zero in (2, 3):
        par += [("--use-distributed-optimizer", None), ("--use-megatron-fsdp", None),
                ("--data-parallel-sharding-strategy", "optim_grads" if p.zero == 2 else "optim_grads_params"),
                # validate_args: "Megatron-FSDP requires the `fsdp_dtensor` checkpointing format."
                ("--ckpt-format", "fsdp_dtensor")]
    if p.overlap_grad_reduce:
        par.append(("--overlap-grad-reduce", None))
    if p.offload.optimizer > 0:
        # "CPU offload": --optimizer-cpu-offload asserts --use-precision-aware-optimizer.
        par += [("--optimizer-cpu-offload", None), ("--optimizer-offload-fraction", p.offload.optimizer),
                ("--use-precision-aware-optimizer", None)]
    # "Recompute granularity / method": selective covers all layers; full + uniform + 1 checkpoints every
    # layer; the plan's recompute_num_layers is Megatron's block method (planner/core/plan.py).
    if p.recompute == "selective":
        par.append(("--recompute-granularity", "selective"))
    elif p.recompute == "full":
        par.append(("--recompute-granularity", "full"))
        if p.recompute_num_layers is None:
            par += [("--recompute-method", "uniform"), ("--recompute-num-layers", 1)]
        else:
            par += [("--recompute-method", "block"), ("--recompute-num-layers", p.recompute_num_layers)]
    batch = [("--micro-batch-size", p.mbs), ("--global-batch-size", w.global_batch), ("--seq-length", w.seq_len),
             ("--max-position-embeddings", max(w.seq_len, ctx.model.default_seq or 0))]
    # "Precision": --bf16 / --fp16; FP8 is --fp8-format on bf16 params (hybrid: e4m3 forward, e5m2 grads,
    # the format of Megatron-Bridge's fp8 presets, docs/launchers.md#megatron-bridge). fp32 is Megatron's default.
    prec = {"bf16": [("--bf16", None)], "fp16": [("--fp16", None)], "fp32": [],
            "fp8": [("--bf16", None), ("--fp8-format", "hybrid")]}[w.dtype]

    world = ctx.world
    dpn = ctx.devices_per_node or world
    if world <= dpn:
        gpus, nodes = world, 1
    elif world % dpn == 0:
        gpus, nodes = dpn, world // dpn
    else:
        raise Unsupported(LAUNCHER, "dp", f"{world} devices do not fill whole nodes of {dpn}; torchrun starts "
                          "the same number of processes on every node")

    lines = ["#!/usr/bin/env bash"] + [f"# {x}" for x in header_lines(ctx, LAUNCHER)]
    lines += ["# Usage: bash THIS_FILE <data and tokenizer arguments>  (on every node; add torchrun's",
              "# --node-rank/--master-addr, or --rdzv-endpoint, for more than one node)",
              "set -euo pipefail", "", *environment(ctx),
              f"GPUS_PER_NODE={gpus}", f"NUM_NODES={nodes}",
              f"# Megatron derives data parallel = world / (tp x pp x cp) = {world} / "
              f"({p.tp} x {p.pp} x {p.cp}) = {p.dp}", "", "MEGATRON_ARGS=("]
    for title, group in (("parallelism", par), ("batch and sequence", batch), ("precision", prec),
                         ("model shape (from the planner's model; check against your checkpoint)",
                          _model_args(ctx))):
        if not group:
            continue
        lines.append(f"    # {title}")
        for flag, value in group:
            lines.append(f"    {flag}" + ("" if value is None else f" {shlex.quote(str(value))}"))
    if p.flash_attention is False:
        lines.append("    # the plan was costed without fused attention; Megatron picks its attention backend")
    lines += [")", "",
              'torchrun --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NUM_NODES" pretrain_gpt.py '
              '"${MEGATRON_ARGS[@]}" "$@"', ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# reading back


def _flags(text: str) -> dict[str, list[str]]:
    m = re.search(r"^MEGATRON_ARGS=\((.*?)^\)", text, re.S | re.M)
    body = m.group(1) if m else text
    try:
        tokens = shlex.split(body, comments=True)
    except ValueError as e:
        raise BadInput(f"Megatron arguments: cannot split ({e})") from None
    out: dict[str, list[str]] = {}
    current = None
    for tok in tokens:
        if tok.startswith("--"):
            current = tok
            out[current] = []
        elif current is not None:
            out[current].append(tok)
    return out


def parse_megatron(text: str) -> LauncherSettings:
    f = _flags(text)

    def num(flag, default=None, cast=int):
        if flag not in f:
            return default
        try:
            return cast(f[flag][0])
        except (IndexError, ValueError):
            raise BadInput(f"Megatron arguments: {flag} needs a number, got {f[flag]!r}") from None

    tp = num("--tensor-model-parallel-size", 1)
    pp = num("--pipeline-model-parallel-size", 1)
    cp = num("--context-parallel-size", 1)
    num_layers = num("--num-layers")
    dp = None
    gpus = re.search(r"^GPUS_PER_NODE=(\d+)", text, re.M)
    nodes = re.search(r"^NUM_NODES=(\d+)", text, re.M)
    if gpus and nodes:
        dp = int(gpus.group(1)) * int(nodes.group(1)) // (tp * pp * cp)

    vpp, stage_layers = 1, None
    if "--pipeline-model-parallel-layout" in f:
        stages = f["--pipeline-model-parallel-layout"][0].split("|")
        stage_layers = tuple(s.count("t") for s in stages)
        vpp = len(stages) // pp
    elif num_layers is not None:
        if "--num-layers-per-virtual-pipeline-stage" in f:
            per = num("--num-layers-per-virtual-pipeline-stage")
            vpp = num_layers // pp // per
        elif "--num-virtual-stages-per-pipeline-rank" in f:
            vpp = num("--num-virtual-stages-per-pipeline-rank")
        first = num("--decoder-first-pipeline-num-layers")
        last = num("--decoder-last-pipeline-num-layers")
        rest, stages_left = num_layers - (first or 0) - (last or 0), pp - (first is not None) - (last is not None)
        mid = [rest // stages_left] * stages_left if stages_left else []
        counts = ([first] if first is not None else []) + mid + ([last] if last is not None else [])
        # Megatron splits a rank's layers evenly over its virtual stages; chunk c sits on rank c % pp.
        stage_layers = tuple(counts[c % pp] // vpp for c in range(pp * vpp))

    sched = None
    if pp > 1:
        sched = "interleaved-1f1b" if vpp > 1 else "1f1b"

    zero = 0
    if "--use-megatron-fsdp" in f:
        zero = 2 if f.get("--data-parallel-sharding-strategy", ["optim_grads_params"])[0] == "optim_grads" else 3
    elif "--use-distributed-optimizer" in f:
        zero = 1

    recompute, rnl = "none", None
    gran = f.get("--recompute-granularity", [None])[0]
    if "--recompute-activations" in f or gran == "selective":
        recompute = "selective"
    elif gran == "full":
        recompute = "full"
        if f.get("--recompute-method", [None])[0] == "block":
            rnl = num("--recompute-num-layers")

    if "--fp8-format" in f:
        dtype = "fp8"
    elif "--fp16" in f:
        dtype = "fp16"
    elif "--bf16" in f:
        dtype = "bf16"
    else:
        dtype = "fp32"

    mbs = num("--micro-batch-size", 1)
    gbs = num("--global-batch-size")
    nmb = gbs // (mbs * dp) if gbs is not None and dp else None
    offload = num("--optimizer-offload-fraction", 1.0, float) if "--optimizer-cpu-offload" in f else 0.0
    return LauncherSettings(
        dp=dp, tp=tp, pp=pp, vpp=vpp, cp=cp, ep=num("--expert-model-parallel-size", 1),
        etp=num("--expert-tensor-parallel-size", tp), sp="--sequence-parallel" in f, zero=zero, mbs=mbs,
        global_batch=gbs, num_microbatches=nmb, seq_len=num("--seq-length"), recompute=recompute,
        recompute_num_layers=rnl, schedule=sched, dtype=dtype, stage_layers=stage_layers,
        offload_optimizer=offload, overlap_grad_reduce="--overlap-grad-reduce" in f,
        overlap_tp_comm="--tp-comm-overlap" in f)
