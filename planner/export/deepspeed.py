"""DeepSpeed: the ds_config JSON passed to `deepspeed.initialize(config=...)`.

Key spellings from docs/launchers.md (DeepSpeed master @ edaa7221, 0.19.6: keys in
deepspeed/runtime/constants.py and the pydantic models zero/config.py, zero/offload_config.py,
precision_config.py, tensor_parallel/config.py, activation_checkpointing/config.py). tests/test_export.py
feeds every export to DeepSpeed's own `deepspeed.runtime.config.DeepSpeedConfig` when DeepSpeed is installed.

Pipeline and MoE degrees are constructor arguments in DeepSpeed (`PipelineModule(num_stages=...)`,
`MoE(ep_size=...)`), not config keys; the pipeline degree is still recorded in the parsed "pipeline" block.
JSON has no comments, so the notes a user needs go to stderr through `notes()`.
"""
from __future__ import annotations

import json

from planner.core.errors import BadInput
from planner.export.common import ExportContext, LauncherSettings, Unsupported, check_common

LAUNCHER = "DeepSpeed"


def check(ctx: ExportContext) -> None:
    """Refuse (Unsupported) what a ds_config cannot say; the rule `plan --for deepspeed` and a plan's
    `launchers` list use too (planner/export/launchers.py)."""
    p, w = ctx.plan, ctx.workload
    check_common(ctx, LAUNCHER)
    if p.cp > 1 and p.cp_comm != "a2a":
        # docs/launchers.md#degrees: DeepSpeed's sequence parallelism is Ulysses (all-to-all
        # over heads), not the ring context parallelism the plan was costed with.
        raise Unsupported(LAUNCHER, "cp", "DeepSpeed has Ulysses sequence parallelism (all-to-all over heads), "
                          "not ring context parallelism; re-plan with --for deepspeed")
    if p.cp > 1 and (p.tp > 1 or p.pp > 1):
        # Ulysses (deepspeed/sequence/layer.py DistributedAttention) splits the data-parallel ranks; with
        # AutoTP or a PipelineModule beside it the batch assertion's world size is the mpu's, not the config's
        raise Unsupported(LAUNCHER, "cp", "Ulysses (sequence_parallel_size) is configured here for tp 1 and pp 1 "
                          "only; re-plan with --for deepspeed")
    if p.ep > 1:
        raise Unsupported(LAUNCHER, "ep", "expert parallelism is a model-code argument "
                          f"(deepspeed.moe.layer.MoE(ep_size={p.ep})), not a ds_config key; re-plan with "
                          "--for deepspeed (ep 1)")
    if p.sp:
        raise Unsupported(LAUNCHER, "sp", "sequence parallelism has no ds_config key (it comes from model code "
                          "or the mpu); re-plan with --no-sp")
    if p.overlap_tp_comm and p.tp > 1:
        raise Unsupported(LAUNCHER, "overlap_tp_comm", "no ds_config key overlaps TP communication with GEMMs")
    if p.vpp > 1:
        raise Unsupported(LAUNCHER, "vpp", "DeepSpeed runs one pipeline stage per rank (no interleaving)")
    sched = ctx.schedule()
    if sched not in (None, "1f1b"):
        raise Unsupported(LAUNCHER, "schedule", f"DeepSpeed's TrainSchedule is synchronous 1F1B only, not "
                          f"'{sched}'")
    if p.pp > 1 and p.zero >= 2:
        # docs/launchers.md#degrees: assert in runtime/pipe/engine.py.
        raise Unsupported(LAUNCHER, "zero", f"DeepSpeed pipeline parallelism refuses ZeRO stage {p.zero} (>= 2)")
    if p.pp > 1 and len(set(ctx.stage_layers())) > 1:
        raise Unsupported(LAUNCHER, "partition", "PipelineModule balances by parameters or layer count "
                          "(partition_method), it takes no per-stage layer counts")
    if p.recompute == "selective":
        raise Unsupported(LAUNCHER, "recompute", "DeepSpeed checkpoints whole layers; it has no selective "
                          "recompute key")
    if p.recompute_num_layers is not None:
        raise Unsupported(LAUNCHER, "recompute_num_layers", "DeepSpeed checkpoints every N-th layer "
                          "(activation_checkpoint_interval), not the first N of each stage")
    if w.dtype == "fp8":
        raise Unsupported(LAUNCHER, "dtype", "no FP8 key in deepspeed/runtime (FP8 comes from model code, "
                          "e.g. Transformer Engine)")
    if p.offload.optimizer > 0:
        if p.zero == 0:
            raise Unsupported(LAUNCHER, "offload.optimizer", "offload_optimizer needs ZeRO stage 1-3")
        if p.zero < 3 and p.offload.optimizer < 1:
            raise Unsupported(LAUNCHER, "offload.optimizer", "a partial offload (ratio) applies to ZeRO "
                              "stage 3 only")


def to_deepspeed(ctx: ExportContext) -> str:
    check(ctx)
    p, w = ctx.plan, ctx.workload
    # docs/launchers.md#batch / "Global batch size": train_batch_size = micro x accumulation x
    # DP world size, asserted by DeepSpeedConfig._batch_assertion.
    cfg: dict = {
        "train_batch_size": w.global_batch,
        "train_micro_batch_size_per_gpu": p.mbs,
        "gradient_accumulation_steps": ctx.microbatches(),
    }
    # "Distributed optimizer / ZeRO / FSDP": stage 0-3; "overlap_comm" overlaps the gradient reduction.
    zero: dict = {"stage": p.zero, "overlap_comm": p.overlap_grad_reduce}
    if p.offload.optimizer > 0:
        # "CPU offload": offload_optimizer for stages 1-3; ratio (partial offload) for stage 3 only.
        off: dict = {"device": "cpu", "pin_memory": True}
        if p.zero == 3:
            off["ratio"] = p.offload.optimizer
        zero["offload_optimizer"] = off
    cfg["zero_optimization"] = zero
    # "Precision: bf16": bf16 / fp16 blocks; loss_scale 0 is dynamic loss scaling.
    if w.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif w.dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if p.cp > 1:
        # Ulysses: runtime/config.py divides the world by "sequence_parallel_size" for the batch assertion
        cfg["sequence_parallel_size"] = p.cp
    if p.tp > 1:
        # "Tensor parallel size": AutoTP training. (Megatron-style TP comes from an mpu instead.)
        cfg["tensor_parallel"] = {"autotp_size": p.tp}
    if p.recompute == "full":
        # "Recompute granularity / method": the block configures deepspeed.checkpointing.checkpoint, which
        # the model code calls around every layer.
        cfg["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False,
                                           "contiguous_memory_optimization": False}
    if p.pp > 1:
        # "Pipeline parallel size": "stages" and "partition" are parsed ds_config keys (the engine takes the
        # degree from PipelineModule(num_stages=...)); activation_checkpoint_interval 1 = every layer.
        cfg["pipeline"] = {"stages": p.pp, "partition": "uniform",
                           "activation_checkpoint_interval": 1 if p.recompute == "full" else 0}
    return json.dumps(cfg, indent=2) + "\n"


def notes(ctx: ExportContext) -> list[str]:
    """What the JSON cannot say: how the launcher must be started for it to mean the plan."""
    p = ctx.plan
    out = [f"deepspeed --num_gpus ... : {ctx.world} processes; DeepSpeed derives data parallel {p.dp} from "
           "the world size (or the mpu)"]
    if p.pp > 1:
        out.append(f"build the model as PipelineModule(layers, num_stages={p.pp}, partition_method='uniform')")
    return out


def parse_deepspeed(text: str) -> LauncherSettings:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"DeepSpeed config: not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise BadInput("DeepSpeed config: expected a JSON object")
    try:
        gbs = int(cfg["train_batch_size"])
        mbs = int(cfg["train_micro_batch_size_per_gpu"])
        gas = int(cfg.get("gradient_accumulation_steps", 1))
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"DeepSpeed config: batch keys missing or not integers ({e})") from None
    zero = cfg.get("zero_optimization", {})
    pipe = cfg.get("pipeline", {})
    pp = int(pipe.get("stages", 1)) if isinstance(pipe.get("stages", 1), int) else 1
    tp = int(cfg.get("tensor_parallel", {}).get("autotp_size", 0)) or 1
    cp = int(cfg.get("sequence_parallel_size", 1))
    full = "activation_checkpointing" in cfg or int(pipe.get("activation_checkpoint_interval", 0)) > 0
    off = zero.get("offload_optimizer")
    offload = 0.0
    if isinstance(off, dict) and off.get("device", "none") != "none":
        offload = float(off.get("ratio", 1.0))
    dtype = "fp32"
    if cfg.get("bf16", cfg.get("bfloat16", {})).get("enabled"):
        dtype = "bf16"
    elif cfg.get("fp16", {}).get("enabled"):
        dtype = "fp16"
    return LauncherSettings(
        dp=gbs // (mbs * gas), tp=tp, pp=pp, vpp=1, cp=cp, ep=1, sp=False, zero=int(zero.get("stage", 0)),
        mbs=mbs, global_batch=gbs, num_microbatches=gas, recompute="full" if full else "none",
        schedule="1f1b" if pp > 1 else None, dtype=dtype, offload_optimizer=offload,
        overlap_grad_reduce=bool(zero.get("overlap_comm", False)), overlap_tp_comm=False)
