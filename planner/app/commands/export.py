"""`planner export`: a plan file as launcher arguments or config (planner/export/: Megatron, DeepSpeed,
torchtitan)."""
from __future__ import annotations

import sys
from pathlib import Path

from planner.core.errors import BadInput
from planner.files import write_atomic


def cmd_export(args) -> None:
    from planner.export import context_of, export_text
    from planner.files import check_output
    from planner.planfile import load_plan_file

    if args.output == "":
        raise BadInput("-o '': give a file name, or leave -o out to write to stdout")
    out = Path(args.output) if args.output else None
    if out is not None:  # refuse before loading anything, not after
        check_output(out, args.force)
    # the plan file as `estimate` would take it, or one line: never a launch script for a plan it refuses
    ctx = context_of(load_plan_file(args.plan))
    text = export_text(ctx, args.to)
    if args.to == "deepspeed":  # JSON has no comments: say on stderr what the file cannot
        from planner.export.deepspeed import notes

        for line in notes(ctx):
            print(f"note: {line}", file=sys.stderr)
    if out is None:
        sys.stdout.write(text)
    else:
        write_atomic(out, text)
        print(f"{args.to} configuration written to {out}", file=sys.stderr)


def register(sub) -> None:
    """Adds `export PLAN.json --to TARGET`."""
    ex = sub.add_parser("export", help="a plan file as launcher arguments or config (Megatron, DeepSpeed, torchtitan)")
    ex.add_argument("plan", metavar="PLAN.json", help="a plan file (plan --save)")
    ex.add_argument("--to", required=True, choices=["megatron", "deepspeed", "torchtitan", "torchtitan-py"],
                    help="megatron: pretrain_gpt.py launch script; deepspeed: ds_config JSON; torchtitan: TOML "
                         "job config (0.2.x); torchtitan-py: Python Trainer.Config (0.3 and later)")
    ex.add_argument("-o", "--output", metavar="FILE", help="file to write (default: stdout)")
    ex.add_argument("--force", action="store_true", help="overwrite an existing -o file")
    ex.set_defaults(func=cmd_export)
