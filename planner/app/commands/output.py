"""What a command prints: its JSON (--json) or its text, on stdout. Shared by every command module, below
them all (with planner/app/cli.py above them, a helper there would put each command in an import cycle)."""
from __future__ import annotations

import json
import sys


def emit(obj, as_json: bool, text: str) -> None:
    """obj as indented JSON when --json was given (numpy and paths as str), else text with one final newline."""
    if as_json:
        json.dump(obj, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text.rstrip() + "\n")
