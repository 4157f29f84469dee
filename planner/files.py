"""Files the planner writes: atomically (a temporary file beside the target, then os.replace), with the
mode an ordinary open() gives, and never over a file the user has without --force. One place for every
command that writes (plan --save, export, simulate, sweep, calibrate, the fit)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from planner.errors import BadInput


def write_atomic(path, data: str | bytes) -> None:
    """Write a file through a temporary file beside it and os.replace, so a reader never sees half of it,
    with the mode an ordinary open() would give (mkstemp's is 0600). BadInput when it cannot be written."""
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise BadInput(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise BadInput(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output(path, force: bool) -> None:
    """Refuse (BadInput) an output path that exists without force, or whose directory does not."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path} is a directory; give a file name")
    if path.exists() and not force:
        raise BadInput(f"{path} exists; use --force to overwrite it")
    if not path.parent.is_dir():
        raise BadInput(f"{path}: directory {path.parent} does not exist")
