"""Shared test helpers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `import planner` from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(autouse=True, scope="session")
def _empty_user_data(tmp_path_factory):
    """Every test (and every CLI it starts) sees an empty user data folder (planner.userdata): never the
    real user's calibration or efficiency fit. Session-scoped, so hypothesis tests may use it too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("user-data")))
        yield


@pytest.fixture
def run_cli():
    """run_cli(*args) -> (rc, stdout, stderr) of `python cli.py args...`, run from the repo root."""

    def run(*args: str, timeout: float = 120) -> tuple[int, str, str]:
        proc = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    return run
