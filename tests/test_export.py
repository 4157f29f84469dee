"""Launcher exports (planner/export/): round trips, the launchers' own parsers, flag names, refusals, CLI."""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from planner.app.cli import main
from planner.core.plan import OffloadPolicy, ParallelPlan, PlanFile, StageAssignment, Workload
from planner.export import FORMATS, Unsupported, expected_settings, export_text, make_context, parse_text
from planner.importers import load_model

MODELS = {name: load_model(name) for name in ("tiny-llama-20m", "moe-tiny", "llama3-8b")}
CONVENTIONS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "conventions.md"
CONVENTIONS_FLAGS = Path(__file__).resolve().parent / "data" / "conventions_flags.txt"


def context(plan: ParallelPlan, model: str = "tiny-llama-20m", gbs: int | None = None, seq: int = 1024,
            dtype: str = "bf16"):
    gbs = gbs if gbs is not None else plan.mbs * plan.dp * (plan.num_microbatches or 4)
    pf = PlanFile(model=model, cluster="dgx-h100", nodes=max(1, plan.devices // 8),
                  workload=Workload(global_batch=gbs, seq_len=seq, dtype=dtype), plan=plan)
    return make_context(pf, model=MODELS[model], devices_per_node=8)


@st.composite
def plans(draw, fmt: str | None = None):
    """Valid ParallelPlans on the tiny models: every knob a plan file can hold. With `fmt`, half of the
    draws keep to what that launcher can express, so every format exports many plans, not only refuses."""
    friendly = fmt is not None and draw(st.booleans())
    ds = friendly and fmt == "deepspeed"
    tt = friendly and fmt.startswith("torchtitan")
    # torchtitan runs only the model flavours it ships (planner/export/launchers.py): its friendly draws take
    # llama3-8b, the others also the tiny models, which it refuses in one line naming `model`
    model = "llama3-8b" if tt else draw(st.sampled_from(["tiny-llama-20m", "moe-tiny"]))
    blocks = MODELS[model].num_blocks
    pp = draw(st.sampled_from([1, 2, 3, 4]))
    pp = min(pp, blocks)
    vpp = draw(st.sampled_from([1, 2])) if pp > 1 and blocks >= 2 * pp and not ds else 1
    schedules = ["1f1b"] if ds else ["1f1b", "gpipe", "interleaved-1f1b"] + ([] if tt else ["zb-h1"])
    schedule = "interleaved-1f1b" if vpp > 1 else draw(st.sampled_from(schedules))
    tp = draw(st.sampled_from([1, 2, 4]))
    recompute = draw(st.sampled_from(["none", "selective", "full"]))
    partition = None
    if pp > 1 and not ds and draw(st.booleans()):
        n = pp * vpp
        cuts = sorted(draw(st.lists(st.integers(1, blocks - 1), min_size=n - 1, max_size=n - 1, unique=True)))
        edges = [0, *cuts, blocks]
        partition = [StageAssignment(layers=(edges[i], edges[i + 1])) for i in range(n)]
    mbs = draw(st.sampled_from([1, 2, 4]))
    dp = draw(st.sampled_from([1, 2, 4, 8]))
    ep = draw(st.sampled_from([1, 2, 4])) if model == "moe-tiny" and not ds else 1
    if ds:
        recompute = draw(st.sampled_from(["none", "full"]))
    zero = draw(st.sampled_from([0, 1] if ds and pp > 1 else [0, 2, 3] if tt else [0, 1, 2, 3]))
    plan = ParallelPlan(
        dp=dp, tp=tp, pp=pp, vpp=vpp, cp=1 if ds else draw(st.sampled_from([1, 1, 2])), ep=ep,
        etp=draw(st.sampled_from([None, 1, tp])), sp=tp > 1 and (tt or (not ds and draw(st.booleans()))),
        zero=zero, mbs=mbs, num_microbatches=draw(st.integers(1, 8)), recompute=recompute,
        recompute_num_layers=draw(st.sampled_from([None, None, 1])) if recompute == "full" and not friendly else None,
        offload=OffloadPolicy(optimizer=0.0 if tt else draw(st.sampled_from([0.0, 0.0, 0.5, 1.0]))),
        schedule=schedule, overlap_grad_reduce=draw(st.booleans()),
        overlap_tp_comm=not ds and (tp > 1 or not friendly) and draw(st.booleans()), partition=partition)
    dtype = draw(st.sampled_from(["bf16", "bf16", "fp16" if not tt else "bf16", "fp8" if not ds else "fp32", "fp32"]))
    return context(plan, model=model, dtype=dtype, seq=draw(st.sampled_from([512, 2048, 8192])))


ROUND_TRIP_COUNTS = {f: {"exported": 0, "refused": 0} for f in FORMATS}
# The fields every format must give back (the rest it carries when it can express them).
CORE = {"dp", "tp", "pp", "mbs", "global_batch", "num_microbatches", "recompute", "zero"}


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(fmt, data):
    """export -> parse gives back every value the format carries; a refusal is one line naming a field."""
    ctx = data.draw(plans(fmt))
    try:
        text = export_text(ctx, fmt)
    except Unsupported as e:
        ROUND_TRIP_COUNTS[fmt]["refused"] += 1
        msg = str(e)
        assert "\n" not in msg and f"'{e.field}'" in msg
        root = e.field.split("[")[0].split(".")[0]
        assert root in ParallelPlan.model_fields or root in ("dtype", "model"), e.field
        return
    ROUND_TRIP_COUNTS[fmt]["exported"] += 1
    got = parse_text(fmt, text).carried()
    want = expected_settings(ctx).__dict__
    core = CORE - ({"zero"} if ctx.plan.dp == 1 and fmt.startswith("torchtitan") else set())
    assert core <= set(got), f"{fmt} lost {core - set(got)}"
    for k, v in got.items():
        assert v == want[k], f"{fmt}: {k} exported {want[k]!r}, read back {v!r}\n{text}"


def test_round_trip_covers_every_format():
    """The hypothesis runs above exported (not only refused) plans in every format."""
    for fmt in FORMATS:
        ctx = context(ParallelPlan(dp=4, tp=2, pp=2, sp=fmt != "deepspeed", zero=1 if fmt in ("megatron", "deepspeed") else 3,
                                   mbs=2, num_microbatches=4, recompute="full"),
                      model="llama3-8b" if fmt.startswith("torchtitan") else "tiny-llama-20m")
        got = parse_text(fmt, export_text(ctx, fmt)).carried()
        want = expected_settings(ctx).__dict__
        assert {k: want[k] for k in got} == got


# ---------------------------------------------------------------------------------------------------
# Megatron flag names against conventions.md


# Flags not in conventions.md part 2 tables, each with where its spelling comes from.
MEGATRON_EXTRA_FLAGS = {
    "--kv-channels": "TransformerConfig.kv_channels, conventions.md 2.0 field-to-flag rule",
    "--moe-router-topk": "TransformerConfig.moe_router_topk, conventions.md 2.0 rule",
    "--moe-ffn-hidden-size": "TransformerConfig.moe_ffn_hidden_size, conventions.md 2.0 rule",
    "--normalization": "TransformerConfig.normalization, conventions.md 2.0 rule",
    "--disable-bias-linear": "TransformerConfig.add_bias_linear (default True -> --disable-), conventions.md 2.0",
    "--swiglu": "hand-written in megatron/training/arguments.py _add_network_size_args",
    # issue 19 (the model's real architecture and startup rules; Megatron-LM main @ d98e8a64dd, docs/launchers.md)
    "--position-embedding-type": "arguments.py _add_network_size_args",
    "--untie-embeddings-and-output-weights": "arguments.py _add_network_size_args",
    "--rotary-base": "arguments.py _add_network_size_args",
    "--moe-token-dispatcher-type": "TransformerConfig.moe_token_dispatcher_type, conventions.md 2.0 rule",
    "--moe-flex-dispatcher-backend": "TransformerConfig.moe_flex_dispatcher_backend, conventions.md 2.0 rule",
    "--ckpt-format": "CheckpointConfig / arguments.py _add_checkpointing_args",
    "--qk-layernorm": "TransformerConfig.qk_layernorm, conventions.md 2.0 rule",
    "--add-qkv-bias": "TransformerConfig.add_qkv_bias, conventions.md 2.0 rule",
    "--multi-latent-attention": "arguments.py _add_network_size_args (MLA)",
    "--q-lora-rank": "MLATransformerConfig.q_lora_rank, conventions.md 2.0 rule",
    "--kv-lora-rank": "MLATransformerConfig.kv_lora_rank, conventions.md 2.0 rule",
    "--qk-head-dim": "MLATransformerConfig.qk_head_dim, conventions.md 2.0 rule",
    "--qk-pos-emb-head-dim": "MLATransformerConfig.qk_pos_emb_head_dim, conventions.md 2.0 rule",
    "--v-head-dim": "MLATransformerConfig.v_head_dim, conventions.md 2.0 rule",
    "--moe-shared-expert-intermediate-size": "TransformerConfig.moe_shared_expert_intermediate_size, 2.0 rule",
    "--moe-router-score-function": "TransformerConfig.moe_router_score_function, conventions.md 2.0 rule",
    "--moe-router-enable-expert-bias": "TransformerConfig.moe_router_enable_expert_bias, conventions.md 2.0 rule",
    "--moe-layer-freq": "TransformerConfig.moe_layer_freq, conventions.md 2.0 rule",
}


def _megatron_flags(text: str) -> set[str]:
    body = re.search(r"^MEGATRON_ARGS=\((.*?)^\)", text, re.S | re.M).group(1)
    return {tok for line in body.splitlines() for tok in line.split() if tok.startswith("--")
            and not line.strip().startswith("#")}


def test_megatron_flags_are_named_in_conventions():
    if CONVENTIONS.exists():
        known = set(re.findall(r"`(--[a-z0-9][a-z0-9-]*)", CONVENTIONS.read_text()))
        known |= set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", CONVENTIONS.read_text()))
    else:  # CI's clean clone has no reference folder beside it: the flags extracted from it
        known = {ln.strip() for ln in CONVENTIONS_FLAGS.read_text().splitlines() if ln.startswith("--")}
    assert "--tensor-model-parallel-size" in known
    seen = set()
    cases = [
        context(ParallelPlan(dp=2, tp=2, pp=2, vpp=3, sp=True, zero=1, mbs=1, recompute="full",
                             schedule="interleaved-1f1b", overlap_tp_comm=True, overlap_grad_reduce=True)),
        context(ParallelPlan(dp=4, tp=2, pp=3, zero=2, recompute="full", recompute_num_layers=1,
                             offload=OffloadPolicy(optimizer=0.5), partition=[
                                 StageAssignment(layers=(0, 1)), StageAssignment(layers=(1, 4)),
                                 StageAssignment(layers=(4, 6))]), dtype="fp8"),
        context(ParallelPlan(dp=2, tp=2, pp=4, zero=3, recompute="selective", partition=[
            StageAssignment(layers=(0, 1)), StageAssignment(layers=(1, 2)), StageAssignment(layers=(2, 5)),
            StageAssignment(layers=(5, 6))]),
            dtype="fp16"),
        context(ParallelPlan(dp=4, tp=2, ep=4, etp=1, cp=2, mbs=1), model="moe-tiny"),
        context(ParallelPlan(dp=8, tp=1, mbs=1), model="llama3-8b"),
    ]
    for ctx in cases:
        flags = _megatron_flags(export_text(ctx, "megatron"))
        seen |= flags
        unknown = {f for f in flags if f not in known and f not in MEGATRON_EXTRA_FLAGS}
        assert not unknown, f"flags not in conventions.md: {sorted(unknown)}"
    # the plan-level flags the issue lists are all exercised
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--num-layers-per-virtual-pipeline-stage", "--decoder-first-pipeline-num-layers",
                 "--pipeline-model-parallel-layout", "--context-parallel-size", "--expert-model-parallel-size",
                 "--expert-tensor-parallel-size", "--sequence-parallel", "--recompute-granularity",
                 "--recompute-method", "--recompute-num-layers", "--use-distributed-optimizer",
                 "--micro-batch-size", "--global-batch-size", "--seq-length", "--bf16", "--fp16", "--fp8-format",
                 "--overlap-grad-reduce", "--tp-comm-overlap", "--num-query-groups"):
        assert flag in seen, flag


def test_megatron_uneven_stages():
    """First/last stage counts use the decoder-first/last flags; uneven middles use the layout string."""
    ctx = context(ParallelPlan(dp=1, pp=3, partition=[StageAssignment(layers=(0, 1)), StageAssignment(layers=(1, 4)),
                                                       StageAssignment(layers=(4, 6))]))
    flags = _megatron_flags(export_text(ctx, "megatron"))
    assert {"--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"} <= flags
    ctx = context(ParallelPlan(dp=1, pp=4, partition=[StageAssignment(layers=(0, 1)), StageAssignment(layers=(1, 2)),
                                                       StageAssignment(layers=(2, 5)), StageAssignment(layers=(5, 6))]))
    text = export_text(ctx, "megatron")
    assert "--pipeline-model-parallel-layout 'Et|t|ttt|tL'" in text
    assert parse_text("megatron", text).stage_layers == (1, 1, 3, 1)


# ---------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("fmt,plan,kw,field", [
    ("megatron", ParallelPlan(pp=2, schedule="zb-h1"), {}, "schedule"),
    ("megatron", ParallelPlan(pp=2, schedule="gpipe"), {}, "schedule"),
    ("megatron", ParallelPlan(tp=2, overlap_tp_comm=True), {}, "overlap_tp_comm"),
    ("deepspeed", ParallelPlan(pp=2, schedule="zb-h1"), {}, "schedule"),
    ("deepspeed", ParallelPlan(dp=2, cp=2), {}, "cp"),
    ("deepspeed", ParallelPlan(dp=2, pp=2, zero=2), {}, "zero"),
    ("deepspeed", ParallelPlan(recompute="selective"), {}, "recompute"),
    ("deepspeed", ParallelPlan(), {"dtype": "fp8"}, "dtype"),
    ("torchtitan", ParallelPlan(pp=2, schedule="zb-h1"), {}, "schedule"),
    ("torchtitan", ParallelPlan(tp=2, sp=False), {}, "sp"),
    ("torchtitan", ParallelPlan(dp=2, zero=1), {}, "zero"),
    ("torchtitan", ParallelPlan(), {"dtype": "fp16"}, "dtype"),
    ("torchtitan-py", ParallelPlan(), {"dtype": "fp8"}, "dtype"),
    ("torchtitan-py", ParallelPlan(pp=2, schedule="zb-h1"), {}, "schedule"),
    ("megatron", ParallelPlan(dp=2, mbs=2, num_microbatches=3), {"gbs": 10}, "num_microbatches"),
    ("megatron", ParallelPlan(offload=OffloadPolicy(activations=0.5)), {}, "offload.activations"),
])
def test_refusals_name_the_field(fmt, plan, kw, field):
    with pytest.raises(Unsupported) as e:
        export_text(context(plan, **kw), fmt)
    assert e.value.field == field and f"'{field}'" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------
# the launchers' own parsers (the README's test command and .ci/run install them; see README "export")

LAUNCHERS_INSTALL = 'pip install ".[launchers]" && pip install --no-deps torchtitan==0.2.2 (the README\'s test command)'


def _require(dist: str) -> str:
    """The installed version of `dist`; a failure naming the install command when it is missing: these tests
    check exports against the launchers' own parsers, and a missing parser must not pass as a skip."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{dist} is not installed; {LAUNCHERS_INSTALL}")


def _deepspeed_config_class(monkeypatch):
    _require("deepspeed")
    import deepspeed.runtime.config as dsc

    # DeepSpeedConfig asks torch.distributed for the rank and, without a process group, falls back to a
    # world of 1; a rank and an mpu stub make it check the batch identity against the plan's dp.
    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    return dsc.DeepSpeedConfig


@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(ctx=plans("deepspeed"))
def test_deepspeed_accepts_export(monkeypatch, ctx):
    config_cls = _deepspeed_config_class(monkeypatch)
    try:
        text = export_text(ctx, "deepspeed")
    except Unsupported:
        assume(False)
    p = ctx.plan

    class Mpu:
        def get_data_parallel_world_size(self):
            return p.dp

    cfg = config_cls(json.loads(text), mpu=Mpu())
    assert cfg.train_batch_size == ctx.workload.global_batch
    assert cfg.train_micro_batch_size_per_gpu == p.mbs
    assert cfg.gradient_accumulation_steps == ctx.microbatches()
    assert cfg.zero_optimization_stage == p.zero
    assert cfg.zero_config.overlap_comm == p.overlap_grad_reduce
    assert (cfg.zero_config.offload_optimizer is not None) == (p.offload.optimizer > 0)
    if p.pp > 1:
        assert cfg.pipeline["stages"] == p.pp
        assert cfg.pipeline["activation_checkpoint_interval"] == (1 if p.recompute == "full" else 0)
    assert cfg.bfloat16_config.enabled == (ctx.workload.dtype == "bf16")
    assert cfg.float16_config.enabled == (ctx.workload.dtype == "fp16")
    if p.tp > 1:
        assert cfg.tensor_parallel_config.autotp_size == p.tp


def _torchtitan_022_config_manager():
    """torchtitan 0.2.2's ConfigManager, loaded without `torchtitan/__init__.py`: that file imports the
    quantization and MoE kernels, which need triton (a GPU package); the config modules need only torch,
    tyro and tomllib."""
    version = _require("torchtitan")
    # The TOML job config exists only in 0.2.x; another version installed means the pin was lost.
    assert version.startswith("0.2."), f"torchtitan {version} has no TOML job config; install 0.2.2"
    _require("tyro")
    if "torchtitan" not in sys.modules:
        # A bare package object over the installed folder: its submodules load, its __init__ does not. It
        # stays registered: tyro reads the dataclasses' source through sys.modules.
        spec = importlib.util.find_spec("torchtitan")
        pkg = types.ModuleType("torchtitan")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchtitan"] = pkg
    from torchtitan.config.manager import ConfigManager

    return ConfigManager


@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(ctx=plans("torchtitan"))
def test_torchtitan_022_accepts_toml(tmp_path_factory, ctx):
    manager_cls = _torchtitan_022_config_manager()
    try:
        text = export_text(ctx, "torchtitan")
    except Unsupported:
        assume(False)
    path = tmp_path_factory.mktemp("tt") / "job.toml"
    path.write_text(text)
    job = manager_cls().parse_args(["--job.config_file", str(path)])
    p, want = ctx.plan, expected_settings(ctx)
    par, tr = job.parallelism, job.training
    assert par.data_parallel_replicate_degree * par.data_parallel_shard_degree == p.dp
    assert (par.tensor_parallel_degree, par.pipeline_parallel_degree, par.context_parallel_degree,
            par.expert_parallel_degree) == (p.tp, p.pp, p.cp, p.ep)
    assert tr.global_batch_size == ctx.workload.global_batch and tr.seq_len == ctx.workload.seq_len
    assert job.activation_checkpoint.mode == p.recompute
    if p.pp > 1:
        assert par.pipeline_parallel_microbatch_size == p.mbs
        assert tr.local_batch_size == p.mbs * want.num_microbatches
        assert par.pipeline_parallel_schedule.lower() == {"gpipe": "gpipe", "1f1b": "1f1b",
                                                          "interleaved-1f1b": "interleaved1f1b"}[want.schedule]
        assert [sum(f.startswith("layers.") for f in part) for part in par.module_fqns_per_model_part] == \
            list(want.stage_layers)
    else:
        assert tr.local_batch_size == p.mbs


# torchtitan 0.3.0 (the first release with Python configs), torchtitan/config/configs.py: the fields the
# export assigns, by section. The wheel cannot be imported on CPU (torchtitan/__init__ needs triton), so
# the names are checked here; the values by the round trip above.
TORCHTITAN_03_FIELDS = {
    "parallelism": {"data_parallel_replicate_degree", "data_parallel_shard_degree", "fsdp_reshard_after_forward",
                    "tensor_parallel_degree", "enable_sequence_parallel", "pipeline_parallel_degree",
                    "module_fqns_per_model_part", "pipeline_parallel_schedule", "pipeline_parallel_microbatch_size",
                    "context_parallel_degree", "expert_parallel_degree"},
    "training": {"local_batch_size", "global_batch_size", "seq_len", "mixed_precision_param", "enable_cpu_offload",
                 "dtype"},
    "compile": {"enable", "enable_async_tensor_parallel"},
}


def test_torchtitan_py_field_names():
    ctx = context(ParallelPlan(dp=2, tp=2, pp=2, vpp=2, sp=True, zero=3, mbs=1, schedule="interleaved-1f1b",
                               overlap_tp_comm=True, recompute="selective"), model="llama3-8b")
    text = export_text(ctx, "torchtitan-py")
    tree = ast.parse(text)
    assigned = [(t.value.attr, t.attr) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Attribute)]
    assert assigned
    for section, name in assigned:
        assert name in TORCHTITAN_03_FIELDS[section], (section, name)
    assert "config.activation_checkpoint = SelectiveAC.Config()" in text
    compile(text, "export.py", "exec")


# ---------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def plan_file(tmp_path):
    # dp 4 x pp 2: the 8 GPUs of one DGX node, as `estimate` requires (a plan on part of the cluster is refused)
    # llama3-8b: torchtitan refuses a model it has no flavour for (the tiny test models)
    pf = PlanFile(model="llama3-8b", cluster="dgx-h100", nodes=1,
                  workload=Workload(global_batch=32, seq_len=1024),
                  plan=ParallelPlan(dp=4, pp=2, mbs=2, recompute="full"))
    path = tmp_path / "plan.json"
    path.write_text(pf.model_dump_json())
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_stdout(capsys, plan_file, fmt):
    assert main(["export", str(plan_file), "--to", fmt]) == 0
    out = capsys.readouterr().out
    got = parse_text(fmt, out)
    assert (got.dp, got.tp, got.pp, got.mbs, got.global_batch, got.recompute) == (4, 1, 2, 2, 32, "full")


def test_cli_output_file_and_force(capsys, plan_file, tmp_path):
    out = tmp_path / "ds.json"
    assert main(["export", str(plan_file), "--to", "torchtitan", "-o", str(out)]) == 0
    first = out.read_text()
    capsys.readouterr()
    assert parse_text("torchtitan", first).pp == 2
    out.write_text("keep me")
    assert main(["export", str(plan_file), "--to", "torchtitan", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and out.read_text() == "keep me"
    assert main(["export", str(plan_file), "--to", "torchtitan", "-o", str(out), "--force"]) == 0
    assert out.read_text() == first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("args,words", [
    (["--to", "deepspeed"], ["cp"]),
    (["--to", "nope"], ["invalid choice"]),
    ([], ["--to"]),
])
def test_cli_errors_one_line(capsys, tmp_path, args, words):
    pf = PlanFile(model="tiny-llama-20m", cluster="dgx-h100", nodes=1,
                  workload=Workload(global_batch=8, seq_len=1024), plan=ParallelPlan(dp=4, cp=2, mbs=1))
    path = tmp_path / "plan.json"
    path.write_text(pf.model_dump_json())
    assert main(["export", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err


def test_cli_bad_plan_files(capsys, tmp_path):
    assert main(["export", str(tmp_path / "missing.json"), "--to", "megatron"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 99}))
    assert main(["export", str(bad), "--to", "megatron"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "schema_version 99" in err
    assert main(["export", str(bad), "--to", "megatron", "-o", str(tmp_path / "no" / "dir.sh")]) == 2
