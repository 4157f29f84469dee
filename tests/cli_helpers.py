"""The CLI contract's test helpers: run `planner` in-process, and check that an error is one line."""
from __future__ import annotations

from planner.app.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `planner args...` run in this process."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc: int, err: str, expected: int = 2) -> str:
    """Assert the error contract (exit status `expected`, one non-empty line, no traceback); the line."""
    assert "Traceback" not in err, err
    assert rc == expected, (rc, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].strip(), err
    return lines[0]
