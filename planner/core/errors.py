"""Errors the CLI turns into one line on stderr and an exit status (docs/ARCHITECTURE.md#contracts).

Anything a user can get wrong raises BadInput (exit 2); a request that is well formed but cannot be
satisfied raises Infeasible (exit 1). Everything else is a bug and may show a traceback.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

# Everything str.splitlines() breaks a line at, shown escaped so that the message stays one line.
_LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


class PlannerError(Exception):
    """Base class: the message is the whole line the user sees.

    The line stays one line whatever went into it (a YAML key, a file name or an argument with a
    newline in it): line breaks are shown escaped, as repr() would.
    """

    exit_code = 2
    kind = "bad_input"  # the "kind" of the JSON error object (docs/guide/output.md)

    def __init__(self, *args, closest: list | None = None, suggestions: list[str] | None = None,
                 answer: dict | None = None):
        super().__init__(*args)
        # what `--json` prints besides the message: the nearest plans (any objects; the app layer turns them
        # into rows), flags checked to help, each a string such as "--nodes 2", and the command's own answer
        # when it has one in spite of the error (a backtest report), whose keys go beside "error"
        self.closest = list(closest or [])
        self.suggestions = list(suggestions or [])
        self.answer = answer

    def __str__(self) -> str:
        text = super().__str__()
        for ch in _LINE_BREAKS:
            text = text.replace(ch, repr(ch)[1:-1])
        return text or self.__class__.__name__


class BadInput(PlannerError):
    """Malformed or unknown input: a missing file, broken YAML, an unknown name, a bad value."""

    exit_code = 2


class Infeasible(PlannerError):
    """A valid request that no plan can satisfy (e.g. it does not fit in memory)."""

    exit_code = 1
    kind = "infeasible"


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
