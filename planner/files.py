"""Files the planner writes: atomically (a temporary file beside the target, then os.replace), with the
mode an ordinary open() gives, and never over a file the user has without --force. One place for every
command that writes (plan --save, export, simulate, sweep, calibrate, the fit)."""
from __future__ import annotations

import os
import stat
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


# The largest input file read (model, cluster, plan, runs table): far above any real one (the biggest
# HF config is a few kB, the published-runs tables well under 1 MB), small enough that /dev/zero or a
# mistaken multi-GB file is refused at once instead of read until memory runs out.
MAX_INPUT_BYTES = 16 * 2**20


def read_input(path, what: str = "file", max_bytes: int = MAX_INPUT_BYTES) -> str:
    """The text of an input file the user named, or BadInput (one line) for every way that can fail:
    missing, a directory, a FIFO / socket / device (reading one can block forever or never end), no
    permission, over max_bytes, not UTF-8, or a name the OS refuses (too long)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{path}: is a directory, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{path}: not a regular file (a pipe, socket or device); give a {what}")
    if st.st_size > max_bytes:
        raise BadInput(f"{path}: {st.st_size:,} bytes, larger than any {what} this tool reads "
                       f"({max_bytes:,} bytes at most)")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, open() does not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BadInput(f"{path}: not a regular file (a pipe, socket or device); give a {what}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadInput(f"{path}: larger than any {what} this tool reads ({max_bytes:,} bytes at most)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not a text file (not UTF-8 at byte {e.start})") from None
