"""The user's own data: what `calibrate --backend torch` measured on this machine, and a device-efficiency
fit the user made (`python -m planner.eval.fit --write`). It lives in the user's data folder, never in the
installed package or the checkout: a wheel's site-packages may be read-only or shared between users, and
a checkout must stay what git says it is.

The folder is platformdirs.user_data_dir("parallel-planner"): $XDG_DATA_HOME/parallel-planner, else
~/.local/share/parallel-planner on Linux (~/Library/Application Support/parallel-planner on macOS,
%LOCALAPPDATA%\\parallel-planner on Windows).
"""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from planner.core.errors import BadInput

APP_NAME = "parallel-planner"
# The names calibrate gives what it measures; `--cluster local` resolves them from the user's calibration.
LOCAL_NODE = "local"
LOCAL_DEVICES = ("local-cpu", "local-gpu")
LOCAL_LINK = "local-gloo"
LOCAL_NAMES = (LOCAL_NODE, *LOCAL_DEVICES, LOCAL_LINK)
CALIBRATION_RECORD = "calibration.json"
SECTIONS = ("devices", "links", "nodes")
QUICK_COMMAND = "planner calibrate --backend torch --quick"


def data_dir() -> Path:
    """The user's data folder for this tool (not created here)."""
    # appauthor=False: no vendor folder level on Windows; the same call on every platform.
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def calibration_dir() -> Path:
    """Where `calibrate --backend torch` writes by default: devices/, links/, nodes/ and calibration.json."""
    return data_dir() / "calibration"


def fit_file() -> Path:
    """Where `python -m planner.eval.fit --write` writes the user's fit (applied over the shipped one)."""
    return data_dir() / "fitted_efficiency.yaml"


def is_calibration_dir(path: Path) -> bool:
    """A folder laid out as calibrate writes one: a nodes/ folder holding at least one YAML file."""
    return path.is_dir() and any((path / "nodes").glob("*.yaml"))


def make_dir(path: Path, flag: str) -> Path:
    """Create a folder to write into (and its parents), or BadInput naming the flag: a path that is a
    file, or a folder the OS refuses."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise BadInput(f"{flag} {path}: is a file, not a folder; give a folder (it is created if missing)")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise BadInput(f"{flag} {path}: {blocking} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{flag} {path}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInput(f"{flag} {path}: the folder is not writable; give another one")
    return path


def no_calibration_message(name: str) -> str:
    return (f"'{name}' is this machine's own calibration, and there is none in {calibration_dir()}: run "
            f"`{QUICK_COMMAND}` first (about 2 minutes), or give --cluster a calibration folder")
