"""Errors the CLI turns into one line on stderr and an exit status (DESIGN.md section 3).

Anything a user can get wrong raises BadInput (exit 2); a request that is well formed but cannot be
satisfied raises Infeasible (exit 1). Everything else is a bug and may show a traceback.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class PlannerError(Exception):
    """Base class: the message is the whole line the user sees."""

    exit_code = 2


class BadInput(PlannerError):
    """Malformed or unknown input: a missing file, broken YAML, an unknown name, a bad value."""

    exit_code = 2


class Infeasible(PlannerError):
    """A valid request that no plan can satisfy (e.g. it does not fit in memory)."""

    exit_code = 1


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest known names, or '' when none is close."""
    known = sorted(known)
    low = name.lower()
    close = [k for k in known if low and low in k.lower()][:3]
    close += [k for k in difflib.get_close_matches(name, known, n=3, cutoff=0.5) if k not in close]
    close = close[:3]
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
