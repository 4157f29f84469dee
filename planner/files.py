"""Files the planner writes: atomically (a temporary file beside the target, then os.replace), with the
mode an ordinary open() gives, and never over a file the user has without --force. One place for every
command that writes (plan --save, export, simulate, sweep, calibrate, the fit)."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from planner.core.errors import BadInput


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _existing(path: Path):
    """os.stat of an output path (None when there is nothing there), or BadInput for a name the OS refuses
    (too long, a NUL byte, a parent that is a file, no permission to look)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: cannot write ({getattr(e, 'strerror', None) or e})") from None


def _refuse_special(path: Path, st) -> None:
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{path} is a directory; give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        # replacing a FIFO, socket or device node would break whatever uses it: never, even with --force
        raise BadInput(f"{path} is not a regular file (a pipe, socket or device); give another file name "
                       "(--force does not replace these)")


def write_atomic(path, data: str | bytes) -> None:
    """Write a file through a temporary file beside it and os.replace, so a reader never sees half of it.

    The temporary file is fsynced before the rename and the directory after it (best effort), so a crash
    leaves the old file or the new one, never an empty one (the ext4 rename-without-fsync case). A file
    replaced keeps its mode; a new one gets the mode an ordinary open() gives (mkstemp's is 0600). A FIFO,
    socket, device or directory at `path` is refused. BadInput (one line) when it cannot be written; the
    temporary file is removed on every failure."""
    path = Path(path)
    if not str(path).strip():
        raise BadInput("empty output file name; give a file name")
    st = _existing(path)
    _refuse_special(path, st)
    mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask()
    payload = data.encode() if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: cannot write ({getattr(e, 'strerror', None) or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise BadInput(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX: the directory entry lives in the directory); best effort, since some
    file systems and platforms (Windows) cannot open or fsync a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output(path, force: bool, flag: str | None = None) -> None:
    """Refuse (BadInput, one line, before any work) an output path that cannot be written: an empty name, a
    name the OS refuses (too long), a directory, a FIFO / socket / device (even with force), an existing file
    without force, a missing or unwritable directory. `flag` (e.g. "--save") names the option in the message."""
    where = f"{flag} " if flag else ""
    if not str(path).strip():
        raise BadInput(f"{where}needs a file name, got an empty one")
    path = Path(path)
    st = _existing(path)
    _refuse_special(path, st)
    if st is not None and not force:
        raise BadInput(f"{path} exists; use --force to overwrite it")
    parent = path.parent
    if not parent.is_dir():
        raise BadInput(f"{path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{path}: directory {parent} is not writable; choose another {where or 'output '}path")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255  # POSIX NAME_MAX on ext4, xfs, btrfs, tmpfs
    if len(os.fsencode(path.name)) > name_max:
        raise BadInput(f"{path.name[:40]}...: file name of {len(os.fsencode(path.name))} bytes, longer than the "
                       f"{name_max} this file system takes; give a shorter {where or 'output '}name")


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
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name (from a plan file, say)
        raise BadInput(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
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
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:  # e.g. /proc/self/mem: a regular file by stat whose read fails (EIO)
            raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise BadInput(f"{path}: larger than any {what} this tool reads ({max_bytes:,} bytes at most)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not a text file (not UTF-8 at byte {e.start})") from None


def path_exists(path) -> bool:
    """Path.exists() that answers False for a name the OS cannot even look up (too long, a NUL byte):
    on Python 3.11 those raise instead, and a user-typed name must never become a traceback."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False
