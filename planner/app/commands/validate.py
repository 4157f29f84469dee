"""`planner validate`: run a plan file for real with torch.distributed and compare with the prediction."""
from __future__ import annotations

from planner.app.commands.output import emit
from planner.app.commands.torch_backend import require_torch
from planner.core.errors import BadInput


def cmd_validate(args) -> None:
    require_torch(args)
    from planner.backends.torch.runner import RunOptions
    from planner.backends.torch.validate import MAX_NPROC, check_nproc, report_text, validate
    from planner.planfile import load_plan_file

    # steps: a validation run is a handful of steps (default 6); 1000 is already minutes of a real model
    for flag, cap in (("nproc", MAX_NPROC), ("steps", 1000), ("threads", MAX_NPROC)):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise BadInput(f"--{flag} must be a positive integer, got {v}")
        if v is not None and v > cap:
            raise BadInput(f"--{flag} {v} is past the cap of {cap}")
    if args.warmup < 0:
        raise BadInput(f"--warmup must be >= 0, got {args.warmup}")
    loaded = load_plan_file(args.plan)  # checked as `estimate` checks it, before anything is started
    check_nproc(args.nproc, loaded.pf.plan.devices)
    opts = RunOptions(steps=args.steps, warmup=args.warmup, seed=args.seed, device=args.device,
                      threads=args.threads)
    res = validate(loaded.pf, args.nproc, opts, force=args.force)
    emit(res, args.json, report_text(res))


def register(sub) -> None:
    """Adds `validate PLAN.json`."""
    va = sub.add_parser("validate", help="run a plan file for real (torch.distributed) and compare with the prediction")
    va.add_argument("plan", metavar="PLAN.json", help="a plan file (plan --save)")
    va.add_argument("--backend", default="torch", help="execution backend (torch)")
    va.add_argument("--nproc", type=int, help="processes: the plan's dp*tp*pp*cp, the default (at most 4 per core "
                    "and 1024)")
    va.add_argument("--steps", type=int, default=6, help="training steps, warm-up included (default 6)")
    va.add_argument("--warmup", type=int, default=2, help="steps left out of the median (default 2)")
    va.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: one GPU per process with NCCL when there are enough, else CPU with gloo")
    va.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    va.add_argument("--seed", type=int, default=0)
    va.add_argument("--force", action="store_true",
                    help="run even when the plan's predicted peak memory per process exceeds this machine's")
    va.add_argument("--json", action="store_true")
    va.set_defaults(func=cmd_validate)
