"""torchtitan: a TOML job config for the 0.2.x releases and a Python config for the releases after them.

TOML (`--to torchtitan`): section/key spellings of torchtitan v0.2.2 `torchtitan/config/job_config.py`, the
last release with TOML job configs (docs/launchers.md, "torchtitan v0.2.2" column).
Run with `--job.config_file FILE`.

Python (`--to torchtitan-py`): a module with one function returning `Trainer.Config`, chosen with
`--module` and `--config` (docs/launchers.md#torchtitan-head). Field names are those of the released torchtitan 0.3.0
wheel (`torchtitan/config/configs.py`): it still spells the batch as `training.local_batch_size`,
`global_batch_size`, `seq_len` and `parallelism.pipeline_parallel_microbatch_size`.
docs/launchers.md#torchtitan-head reads main @ b5bcd76c6, where token-based names
(`num_tokens_per_microbatch_per_dp_rank`, `num_pp_microbatches`, `max_context_length`) replace them;
the release a user can install is the target here.
"""
from __future__ import annotations

import ast
import tomllib

from planner.core.errors import BadInput
from planner.export.common import ExportContext, LauncherSettings, Unsupported, check_common, header_lines, one_line

LAUNCHER_TOML = "torchtitan 0.2.x (TOML)"
LAUNCHER_PY = "torchtitan >= 0.3 (Python config)"

# docs/launchers.md#schedule: names resolved by torch.distributed.pipelining get_schedule_class.
_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved-1f1b": "Interleaved1F1B"}
_SCHEDULES_BACK = {v.lower(): k for k, v in _SCHEDULES.items()}

# Catalog model -> (TOML [model] name, flavor) at v0.2.2 and the config_registry function after it
# (torchtitan/models/llama3/__init__.py flavour table; models/llama3/config_registry.py in 0.3.0).
_FLAVORS = {
    "llama3-8b": ("llama3", "8B", "torchtitan.models.llama3.config_registry", "llama3_8b"),
    "llama3-70b": ("llama3", "70B", "torchtitan.models.llama3.config_registry", "llama3_70b"),
    "llama3.1-405b": ("llama3", "405B", "torchtitan.models.llama3.config_registry", "llama3_405b"),
}


def check_model(model_name: str, launcher: str = LAUNCHER_TOML) -> None:
    """torchtitan builds the architecture from its own flavour table, so a model it has no flavour for is
    refused in one line, never written as an empty [model] (which torchtitan reads as llama3 debugmodel)."""
    if model_name not in _FLAVORS:
        known = ", ".join(sorted(_FLAVORS))
        raise Unsupported(launcher, "model", f"torchtitan has no model flavour for '{one_line(model_name)}' "
                          f"(the planner maps {known} to torchtitan's llama3 flavours); re-plan with "
                          "--for megatron")


def check(ctx: ExportContext, launcher: str = LAUNCHER_TOML) -> None:
    """Refuse (Unsupported) what torchtitan cannot run; the rule `plan --for torchtitan` and a plan's
    `launchers` list use too (planner/export/launchers.py)."""
    p = ctx.plan
    if launcher == LAUNCHER_TOML:
        if p.tp > 1 and not p.sp:
            # docs/launchers.md#sequence-parallel: no key at v0.2.2, apply_tp always shards the norms.
            raise Unsupported(launcher, "sp", "v0.2.2 always applies sequence parallelism with TP (no key); "
                              "re-plan with --for torchtitan (or --sp), or export --to torchtitan-py")
        if ctx.is_moe and p.tp > 1 and ctx.etp not in (1, p.tp):
            raise Unsupported(launcher, "etp", "expert_tensor_parallel_degree must be 1 or equal to TP")
    _check(ctx, launcher)


def _check(ctx: ExportContext, launcher: str) -> None:
    p, w = ctx.plan, ctx.workload
    check_common(ctx, launcher)
    sched = ctx.schedule()
    if sched is not None and sched not in _SCHEDULES:
        raise Unsupported(launcher, "schedule", "torchtitan has GPipe, 1F1B, Interleaved1F1B and the zero-bubble "
                          f"variants InterleavedZeroBubble and ZBVZeroBubble, but nothing named {sched.upper()}; "
                          "re-plan with --for torchtitan (or --schedule 1f1b)")
    if p.cp > 1 and p.cp_comm == "a2a":
        # context_parallel_rotate_method allgather / alltoall both rotate K/V around a ring (ring attention)
        raise Unsupported(launcher, "cp_comm", "torchtitan's context parallelism is ring attention, not Ulysses "
                          "all-to-all; re-plan with --for torchtitan")
    if p.vpp > 1 and p.pp == 1:
        raise Unsupported(launcher, "vpp", "virtual pipeline stages need pipeline parallelism (pp > 1)")
    if p.zero == 1 and p.dp > 1:
        # docs/launchers.md#zero-fsdp: FSDP2 only, no ZeRO-stage key.
        raise Unsupported(launcher, "zero", "torchtitan is FSDP2 (ZeRO-3, or ZeRO-2 with "
                          "fsdp_reshard_after_forward = \"never\") or DDP (ZeRO-0); it has no ZeRO-1")
    if w.dtype == "fp16":
        raise Unsupported(launcher, "dtype", "training.mixed_precision_param is \"bfloat16\" or \"float32\"")
    if p.offload.optimizer > 0:
        raise Unsupported(launcher, "offload.optimizer", "training.enable_cpu_offload offloads parameters, "
                          "gradients and optimizer state together (FSDP CPU offload), not the optimizer alone")
    if p.recompute_num_layers is not None:
        raise Unsupported(launcher, "recompute_num_layers", "torchtitan checkpoints every N-th block "
                          "(selective_ac_option = \"N\"), not the first N blocks of each stage")
    if p.moe_dispatch == "deepep":
        raise Unsupported(launcher, "moe_dispatch", "torchtitan 0.2.2 dispatches tokens with all-to-alls over the "
                          "expert-parallel group; re-plan with moe_dispatch a2a, or export --to megatron")
    if p.ep > 1:
        etp = ctx.etp if launcher == LAUNCHER_TOML else 1
        shard = p.dp if p.zero >= 2 else 1
        # torchtitan/distributed/parallel_dims.py: efsdp = dp_shard * cp * tp / (etp * ep) (0.2.2; etp
        # removed later, efsdp = dp_shard * cp * tp / ep): EP borrows ranks from FSDP, CP and TP, never
        # from dp_replicate.
        if (shard * p.cp * p.tp) % (etp * p.ep):
            raise Unsupported(launcher, "ep", f"expert parallel {p.ep} must divide dp_shard x cp x tp / etp = "
                              f"{shard} x {p.cp} x {p.tp} / {etp} (EP borrows from FSDP, not from replicas; "
                              "zero 0 leaves no FSDP ranks)")
    check_model(ctx.pf.model, launcher)  # last: a plan field the launcher cannot spell is named first


def _fqns(stage_layers: tuple[int, ...]) -> list[list[str]]:
    """module_fqns_per_model_part (docs/launchers.md#uneven-pp): FQNs tok_embeddings, layers.<i>, norm,
    output; model part c runs on pipeline rank c % pp for the looped schedules."""
    out, start = [], 0
    for n in stage_layers:
        out.append([f"layers.{i}" for i in range(start, start + n)])
        start += n
    out[0].insert(0, "tok_embeddings")
    out[-1] += ["norm", "output"]
    return out


def _degrees(ctx: ExportContext) -> dict:
    p = ctx.plan
    # docs/launchers.md#zero-fsdp: data_parallel_shard_degree shards (FSDP2,
    # ZeRO-3); replicate with shard = 1 is DDP (ZeRO-0). reshard_after_forward "never" keeps the gathered
    # parameters from forward to backward, FSDP's ZeRO-2 (SHARD_GRAD_OP) behaviour.
    sharded = p.zero >= 2
    out = {
        "data_parallel_replicate_degree": 1 if sharded else p.dp,
        "data_parallel_shard_degree": p.dp if sharded else 1,
        "fsdp_reshard_after_forward": "never" if p.zero == 2 else "default",
        "tensor_parallel_degree": p.tp,
        "pipeline_parallel_degree": p.pp,
        "context_parallel_degree": p.cp,
        "expert_parallel_degree": p.ep,
    }
    if p.pp > 1:
        out["pipeline_parallel_schedule"] = _SCHEDULES[ctx.schedule()]
        out["pipeline_parallel_microbatch_size"] = p.mbs
        out["module_fqns_per_model_part"] = _fqns(ctx.stage_layers())
    return out


def _training(ctx: ExportContext) -> dict:
    p, w = ctx.plan, ctx.workload
    # docs/launchers.md#batch / "Global batch size": local_batch_size is the per-rank batch of
    # one gradient-accumulation step; with PP it is split into pipeline micro-batches of
    # pipeline_parallel_microbatch_size, so one step holds all of a rank's micro-batches.
    local = p.mbs * ctx.microbatches() if p.pp > 1 else p.mbs
    return {"local_batch_size": local, "global_batch_size": w.global_batch, "seq_len": w.seq_len,
            # "Precision": mixed_precision_param is bfloat16 (default) or float32.
            "mixed_precision_param": "float32" if w.dtype == "fp32" else "bfloat16"}


# ---------------------------------------------------------------------------------------------------
# TOML (0.2.x)


def _toml_string(v: str) -> str:
    """A TOML basic string holding exactly v (TOML 1.0 "String"): `"` and `\\` escaped, and every control
    character (U+0000-U+001F, U+007F), which a basic string may not hold raw, as \\uXXXX; the rest as it
    is (the file is UTF-8). So a newline or `"` in a model name cannot end the string or start a table."""
    out = []
    for ch in v:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:  # not a Unicode scalar value: no TOML (or UTF-8) spelling
            raise BadInput(f"torchtitan TOML: {v!r} holds a lone surrogate, which TOML cannot store")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def to_toml(ctx: ExportContext) -> str:
    launcher = LAUNCHER_TOML
    check(ctx, launcher)
    p, w = ctx.plan, ctx.workload
    sections: dict[str, dict] = {"job": {"description": f"planner export: {ctx.pf.model} on {ctx.pf.cluster}"}}
    flavor = _FLAVORS[ctx.pf.model]  # check_model refused the others
    sections["model"] = {"name": flavor[0], "flavor": flavor[1]}
    if w.dtype == "fp8":
        # "Precision: fp8": Float8 linear layers through the model converter.
        sections["model"]["converters"] = ["quantize.linear.float8"]
        sections["quantize.linear.float8"] = {"recipe_name": "tensorwise"}
    par = _degrees(ctx)
    if ctx.is_moe:
        par["expert_tensor_parallel_degree"] = ctx.etp  # "Expert tensor parallel size": 1 or TP
    if p.overlap_tp_comm and p.tp > 1:
        par["enable_async_tensor_parallel"] = True  # v0.2.2 [parallelism]; needs torch.compile
        sections["compile"] = {"enable": True, "components": ["model", "loss"]}
    sections["parallelism"] = par
    sections["training"] = _training(ctx)
    # "Recompute granularity / method": selective_ac_option "op" is per-op SAC.
    ac: dict = {"mode": p.recompute}
    if p.recompute == "selective":
        ac["selective_ac_option"] = "op"
    sections["activation_checkpoint"] = ac

    lines = [f"# {x}" for x in header_lines(ctx, launcher)]
    lines += ["# Run: ./run_train.sh --job.config_file THIS_FILE  (NGPU and nodes as in the header)"]
    for name, body in sections.items():
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def _settings(par: dict, training: dict, ac_mode: str, dtype: str, sp: bool, overlap_tp: bool,
              etp: int | None) -> LauncherSettings:
    rep = int(par.get("data_parallel_replicate_degree", 1))
    shard = int(par.get("data_parallel_shard_degree", -1))
    if shard < 1:
        raise BadInput("torchtitan config: data_parallel_shard_degree -1 (all leftover ranks) needs the world "
                       "size; give the degree")
    dp = rep * shard
    zero = None
    if dp > 1:
        zero = 0 if shard == 1 else (2 if par.get("fsdp_reshard_after_forward") == "never" else 3)
    tp = int(par.get("tensor_parallel_degree", 1))
    pp = int(par.get("pipeline_parallel_degree", 1))
    local = int(training.get("local_batch_size", 8))
    gbs = int(training.get("global_batch_size", -1))
    if gbs < 0:
        gbs = local * dp
    stage_layers, vpp, sched = None, 1, None
    if pp > 1:
        mbs = int(par.get("pipeline_parallel_microbatch_size", 1))
        nmb = local // mbs * (gbs // (local * dp))
        parts = par.get("module_fqns_per_model_part")
        if parts:
            stage_layers = tuple(sum(1 for f in part if f.startswith("layers.")) for part in parts)
            vpp = len(parts) // pp
        sched = _SCHEDULES_BACK.get(str(par.get("pipeline_parallel_schedule", "1F1B")).lower())
    else:
        mbs = local
        nmb = gbs // (local * dp)
    return LauncherSettings(
        dp=dp, tp=tp, pp=pp, vpp=vpp, cp=int(par.get("context_parallel_degree", 1)),
        ep=int(par.get("expert_parallel_degree", 1)), etp=etp, sp=sp if tp > 1 else False, zero=zero, mbs=mbs,
        global_batch=gbs, num_microbatches=nmb, seq_len=int(training.get("seq_len", 2048)), recompute=ac_mode,
        schedule=sched, dtype=dtype, stage_layers=stage_layers, offload_optimizer=0.0,
        overlap_tp_comm=overlap_tp)


def parse_toml(text: str) -> LauncherSettings:
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"torchtitan TOML: cannot parse ({e})") from None
    par, training = cfg.get("parallelism", {}), cfg.get("training", {})
    mode = cfg.get("activation_checkpoint", {}).get("mode", "selective")  # v0.2.2 default: selective
    converters = cfg.get("model", {}).get("converters", [])
    if any("float8" in c for c in converters):
        dtype = "fp8"
    else:
        dtype = "fp32" if training.get("mixed_precision_param", "bfloat16") == "float32" else "bf16"
    etp = par.get("expert_tensor_parallel_degree")
    return _settings(par, training, mode, dtype, sp=True, overlap_tp=bool(par.get("enable_async_tensor_parallel")),
                     etp=int(etp) if etp is not None else None)


# ---------------------------------------------------------------------------------------------------
# Python config (0.3.0 and later)

_AC_CLASS = {"selective": "SelectiveAC.Config()", "full": "FullAC.Config()", "none": "None"}


def to_python(ctx: ExportContext) -> str:
    launcher = LAUNCHER_PY
    p, w = ctx.plan, ctx.workload
    if w.dtype == "fp8":
        raise Unsupported(launcher, "dtype", "FP8 is a converter given to model_registry(flavor, converters=["
                          "Float8LinearConverter.Config(...)]) when the model spec is built; export bf16 and add it")
    if ctx.is_moe and p.ep > 1 and p.tp > 1 and ctx.etp != 1:
        # docs/launchers.md#torchtitan-head: removed; the mesh is dp_shard*cp*tp = efsdp*ep.
        raise Unsupported(launcher, "etp", "expert tensor parallelism was removed after v0.2.2 (experts are "
                          "not tensor-parallel); set etp 1 or export --to torchtitan (0.2.x)")
    _check(ctx, launcher)
    flavor = _FLAVORS[ctx.pf.model]  # _check refused the others
    # The header is comments, one line each (header_lines: no line breaks), above a fixed docstring: free text
    # inside a docstring could close it with three quotes or make a bad escape.
    lines = [f"# {x}" for x in header_lines(ctx, launcher)]
    lines += ["# Run: NGPU=... MODULE=<this module, importable> CONFIG=planner_plan ./run_train.sh",
              "# (torchtitan's --module / --config; field names of torchtitan 0.3.0 torchtitan/config/configs.py)",
              '"""torchtitan Trainer.Config of a plan, written by `planner export` (see the comments above)."""',
              "from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC",
              "from torchtitan.trainer import Trainer"]
    lines += [f"from {flavor[2]} import {flavor[3]} as _base"]
    lines += ["", "", "def planner_plan() -> Trainer.Config:", "    config = _base()"]
    par = _degrees(ctx)
    # docs/launchers.md#torchtitan-head: enable_sequence_parallel (default True).
    par["enable_sequence_parallel"] = bool(p.sp) if p.tp > 1 else True
    for k, v in par.items():
        lines.append(f"    config.parallelism.{k} = {v!r}")
    for k, v in _training(ctx).items():
        lines.append(f"    config.training.{k} = {v!r}")
    if p.overlap_tp_comm and p.tp > 1:
        # docs/launchers.md#torchtitan-head: moved to config.compile, and needs compile of "model".
        lines += ["    config.compile.enable = True", "    config.compile.enable_async_tensor_parallel = True"]
    # docs/launchers.md#torchtitan-head: a config object, or None for no checkpointing.
    lines.append(f"    config.activation_checkpoint = {_AC_CLASS[p.recompute]}")
    lines += ["    return config", ""]
    return "\n".join(lines)


def parse_python(text: str) -> LauncherSettings:
    """Read the assignments `config.<section>.<key> = <literal>` without running the file."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise BadInput(f"torchtitan Python config: cannot parse ({e.msg}, line {e.lineno})") from None
    values: dict[str, dict] = {"parallelism": {}, "training": {}, "compile": {}}
    mode = None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        t = node.targets[0]
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Attribute) and \
                isinstance(t.value.value, ast.Name) and t.value.value.id == "config" and t.value.attr in values:
            try:
                values[t.value.attr][t.attr] = ast.literal_eval(node.value)
            except ValueError:
                raise BadInput(f"torchtitan Python config: config.{t.value.attr}.{t.attr} is not a literal") from None
        elif isinstance(t, ast.Attribute) and t.attr == "activation_checkpoint":
            src = ast.unparse(node.value)
            mode = {"SelectiveAC.Config()": "selective", "FullAC.Config()": "full", "None": "none"}.get(src)
            if mode is None:
                raise BadInput(f"torchtitan Python config: unknown activation_checkpoint {src}")
    par, training = values["parallelism"], values["training"]
    dtype = "fp32" if training.get("mixed_precision_param", "bfloat16") == "float32" else "bf16"
    return _settings(par, training, mode or "selective", dtype, sp=bool(par.get("enable_sequence_parallel", True)),
                     overlap_tp=bool(values["compile"].get("enable_async_tensor_parallel")), etp=None)
