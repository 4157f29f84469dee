"""What a command prints: its JSON (--json / --format json) or its text, on stdout; the request a JSON answer
echoes; the JSON object of an error. Shared by every command module, below them all (with planner/app/cli.py
above them, a helper there would put each command in an import cycle)."""
from __future__ import annotations

import json
import sys

# argparse's bookkeeping and the output flags: how to print, not what was asked
_NOT_REQUEST = frozenset({"func", "command", "json", "format", "wide", "force"})


def emit(obj, as_json: bool, text: str) -> None:
    """obj as indented JSON when --json was given (numpy and paths as str), else text with one final newline."""
    if as_json:
        json.dump(obj, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text.rstrip() + "\n")


def request_of(args) -> dict:
    """The inputs of a command as given (flags left out are None or their default): what a JSON answer echoes
    so that it can be read, or rerun, on its own."""
    return {"command": getattr(args, "command", None),
            **{k: v for k, v in sorted(vars(args).items()) if k not in _NOT_REQUEST}}


def _closest_entry(c) -> dict | str:
    """A closest plan as a row of scalars (planner.app.rows), whatever the raiser attached."""
    if hasattr(c, "plan") and hasattr(c, "estimate"):
        from planner.app.rows import plan_row

        return plan_row(c.plan, c.estimate)
    return c if isinstance(c, dict) else str(c)


def error_object(e) -> dict:
    """{"error": {kind, message, closest, suggestions}} of a PlannerError (docs/guide/output.md), beside the
    keys of the command's own answer when the error carries one."""
    return {**(getattr(e, "answer", None) or {}), "error": {"kind": getattr(e, "kind", "bad_input"), "message": str(e),
                      "closest": [_closest_entry(c) for c in getattr(e, "closest", [])],
                      "suggestions": [str(s) for s in getattr(e, "suggestions", [])]}}
