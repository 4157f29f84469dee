"""Which launchers can run a plan, and the search space each one can express (`plan --for`).

One rule per launcher: a plan runs on a launcher when its exporter's own refusal check (megatron.check,
deepspeed.check, torchtitan.check) passes. `plan --for X` narrows the search to what X can spell before
searching (the stack's schedules, cp kinds, MoE dispatchers, ...: `search_limits`) and keeps only the plans
that check accepts, so whatever it saves exports.
"""
from __future__ import annotations

import dataclasses

from planner.core.errors import BadInput
from planner.export.common import ExportContext, Unsupported

LAUNCHERS = ("megatron", "deepspeed", "torchtitan")

# The software-stack profile (hardware_profiles/stacks/) each launcher runs: its kernel efficiencies and the
# pipeline schedules it has. `plan --for X` implies `--stack STACKS[X]` unless --stack is given.
STACKS = {"megatron": "megatron-core", "deepspeed": "deepspeed", "torchtitan": "torchtitan"}


def check(ctx: ExportContext, launcher: str) -> None:
    """Raise Unsupported (one line, naming the plan field and the re-plan flag) when `launcher` cannot run the plan."""
    from planner.export import deepspeed, megatron, torchtitan

    checks = {"megatron": megatron.check, "deepspeed": deepspeed.check, "torchtitan": torchtitan.check}
    if launcher not in checks:
        raise BadInput(f"unknown launcher '{launcher}'; choose one of {', '.join(LAUNCHERS)}")
    checks[launcher](ctx)


def refusal(ctx: ExportContext, launcher: str) -> Unsupported | None:
    try:
        check(ctx, launcher)
    except Unsupported as e:
        return e
    return None


def launchers_for(ctx: ExportContext) -> list[str]:
    """The launchers whose exporter writes this plan (the `launchers` column of `plan`)."""
    return [name for name in LAUNCHERS if refusal(ctx, name) is None]


def check_request(launcher: str, model_name: str, dtype: str) -> None:
    """What refuses a whole request before any search: a model or a precision the launcher has no setting for
    (exit 2, one line)."""
    from planner.export import torchtitan

    if launcher == "torchtitan":
        torchtitan.check_model(model_name)
        if dtype == "fp16":
            raise Unsupported(torchtitan.LAUNCHER_TOML, "dtype", "training.mixed_precision_param is bfloat16 or "
                              "float32; re-plan with --dtype bf16, or --for megatron")
    if launcher == "deepspeed" and dtype == "fp8":
        raise Unsupported("DeepSpeed", "dtype", "no FP8 key in deepspeed/runtime; re-plan with --dtype bf16, "
                          "or --for megatron")


def _narrow(c, name: str, allowed: tuple, launcher: str):
    """Constraints field `name` (a tuple of choices) cut to `allowed`; nothing left is a contradiction."""
    kept = tuple(v for v in getattr(c, name) if v in allowed)
    if not kept:
        raise BadInput(f"--for {launcher}: {name.replace('_', '-')} {', '.join(map(str, getattr(c, name)))} is not "
                       f"among what {launcher} runs ({', '.join(map(str, allowed))}); drop the flag or change --for")
    return kept


def _fix(c, name: str, value, launcher: str):
    """Constraints field `name` fixed to `value`; a user's other value is a contradiction."""
    given = getattr(c, name)
    if given is not None and given != value:
        flag = f"--{name}" if not isinstance(value, bool) else ("--sp" if given else "--no-sp")
        raise BadInput(f"--for {launcher}: {flag}{'' if isinstance(value, bool) else ' ' + str(given)} cannot be "
                       f"run by {launcher}, which needs {name} {value}; drop the flag or change --for")
    return value


def search_limits(c, launcher: str):
    """Constraints (planner.search.space) narrowed to what `launcher` can express; the stack (STACKS) already
    holds the schedules. What one field cannot say (DeepSpeed's ZeRO <= 1 with pp > 1, torchtitan's no ZeRO-1,
    sp exactly when tp > 1) the caller filters with `check` after the search."""
    up: dict = {"offload_activations": _narrow(c, "offload_activations", (0.0,), launcher),
                "seq_chunks": _narrow(c, "seq_chunks", (1,), launcher),
                "attention_pool": _narrow(c, "attention_pool", (False,), launcher),
                # Pipeline MoE's TP-group slicing: no launcher has it (common.check_common)
                "moe_dispatch": _narrow(c, "moe_dispatch", ("a2a", "deepep") if launcher == "megatron" else ("a2a",),
                                        launcher)}
    if launcher == "deepspeed":
        # Ulysses only (sequence_parallel_size), no ds_config key for EP, SP or interleaving, whole-layer recompute
        up.update(cp_comm=_narrow(c, "cp_comm", ("a2a",), launcher), ep=_fix(c, "ep", 1, launcher),
                  sp=_fix(c, "sp", False, launcher), vpp=_fix(c, "vpp", 1, launcher), partial_recompute=False)
    elif launcher == "torchtitan":
        # ring attention only (context_parallel_rotate_method allgather / alltoall rotate K/V around the ring);
        # FSDP CPU offload moves everything, not the optimizer alone; checkpoints every N-th block, not the first N
        up.update(cp_comm=_narrow(c, "cp_comm", ("ring",), launcher),
                  offload_optimizer=_narrow(c, "offload_optimizer", (0.0,), launcher), partial_recompute=False)
    return dataclasses.replace(c, **up)
