"""Command line: `python cli.py ...` in a checkout, `planner ...` once installed (docs/ARCHITECTURE.md#contracts).

Every user error ends as one line on stderr and exit status 2 (1 for infeasible requests); a traceback
means a bug in the planner, never in the input. Each command lives in planner/app/commands/ and adds its
own parser; this module only puts them together and runs one.
"""
from __future__ import annotations

import argparse
import sys

from planner.app.commands import (
    backtest,
    calibrate,
    diff,
    estimate,
    export,
    plan,
    profiles,
    replan,
    simulate,
    sweep,
    validate,
)
from planner.core.errors import BadInput, PlannerError

# in the order `planner --help` lists them
COMMANDS = (profiles, estimate, plan, replan, simulate, diff, sweep, export, validate, calibrate, backtest)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the contract), not usage text plus a line."""

    def error(self, message: str):  # noqa: D102
        raise BadInput(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="planner", description="Parallelism planner and cost model for distributed training.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
        return 0
    except PlannerError as e:
        print(f"error: {e}", file=sys.stderr)
        _json_error(e, args, argv)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _json_error(e: PlannerError, args, argv: list[str]) -> None:
    """With --json / --format json, the error as a JSON object on stdout too (docs/guide/output.md); a usage
    error comes before argparse has made args, so the words of the command line say whether JSON was asked."""
    from planner.app.commands.output import emit, error_object
    from planner.app.table import json_requested

    if getattr(args, "json", False) if args is not None else json_requested([str(a) for a in argv]):
        try:
            emit(error_object(e), True, "")
        except BrokenPipeError:
            pass


if __name__ == "__main__":
    sys.exit(main())
