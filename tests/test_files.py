"""planner.files: atomic writes (fsync, clean-up, special files, modes) and the safe input reader."""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from planner import files
from planner.core.errors import BadInput
from planner.files import check_output, read_input, write_atomic


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_file_gets_open_mode(tmp_path, umask_022):
    path = tmp_path / "new.json"
    write_atomic(path, "{}\n")
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # 0666 & ~022, not mkstemp's 0600
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755])
def test_replacing_keeps_the_original_mode(tmp_path, umask_022, mode):
    path = tmp_path / "old.txt"
    path.write_text("old")
    path.chmod(mode)
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_fsync_before_rename_and_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src, dst):
        # the data must already be on disk when the name changes
        assert Path(src).read_text() == "payload"
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "f.txt", "payload")
    assert events == ["fsync-file", "replace", "fsync-dir"]


@pytest.mark.parametrize("where", ["fsync", "replace", "chmod"])
def test_temporary_file_removed_on_os_failure(tmp_path, monkeypatch, where):
    path = tmp_path / "keep.txt"
    path.write_text("original")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, where, boom)
    with pytest.raises(BadInput, match="No space left on device"):
        write_atomic(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "original"
    assert _leftovers(tmp_path) == []


def test_temporary_file_removed_on_interrupt(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "x.txt", "data")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def _fifo(tmp_path) -> Path:
    p = tmp_path / "pipe"
    os.mkfifo(p)
    return p


def test_force_never_replaces_a_fifo(tmp_path):
    fifo = _fifo(tmp_path)
    for call in (lambda: check_output(fifo, True), lambda: write_atomic(fifo, "x")):
        with pytest.raises(BadInput, match="not a regular file"):
            call()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert _leftovers(tmp_path) == []


def test_force_never_replaces_a_socket(tmp_path):
    path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        with pytest.raises(BadInput, match="not a regular file"):
            check_output(path, True)
        with pytest.raises(BadInput, match="not a regular file"):
            write_atomic(path, "x")
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        s.close()


def test_force_never_replaces_a_device():
    for call in (lambda: check_output("/dev/null", True), lambda: write_atomic("/dev/null", "x")):
        with pytest.raises(BadInput, match="not a regular file"):
            call()
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_check_output_refusals(tmp_path):
    existing = tmp_path / "there.json"
    existing.write_text("{}")
    cases = [
        (existing, False, "exists; use --force"),
        (tmp_path, True, "is a directory"),
        (tmp_path / "missing" / "x.json", True, "does not exist"),
        (existing / "x.json", True, "cannot write"),  # a parent that is a file
        ("", True, "empty"),
        ("   ", True, "empty"),
        (tmp_path / ("n" * 300 + ".json"), True, "too long|longer than"),
    ]
    for path, force, words in cases:
        with pytest.raises(BadInput, match=words):
            check_output(path, force, "--save")
    check_output(existing, True)  # an existing regular file with force is fine
    check_output(tmp_path / "fresh.json", False)


def test_unwritable_directory(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.geteuid() == 0:  # root writes anywhere: make the permission check answer as for a user
            monkeypatch.setattr(os, "access", lambda p, m: Path(p) != ro)
        with pytest.raises(BadInput, match="not writable"):
            check_output(ro / "x.json", False, "-o")
    finally:
        ro.chmod(0o700)


def test_write_atomic_missing_directory_is_one_line(tmp_path):
    with pytest.raises(BadInput) as e:
        write_atomic(tmp_path / "nope" / "x.txt", "x")
    assert "\n" not in str(e.value) and "nope" in str(e.value)


# --- read_input ----------------------------------------------------------------------------------------


def test_read_input_regular(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: x\n")
    assert read_input(p, "model file") == "name: x\n"


def test_read_input_refusals(tmp_path):
    fifo = _fifo(tmp_path)  # opening a FIFO for reading blocks until a writer comes: it must not be opened
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a" * 101)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00junk")
    cases = [
        (fifo, "not a regular file"),
        ("/dev/zero", "not a regular file"),
        (tmp_path, "is a directory"),
        (tmp_path / "absent.yaml", "no such file"),
        (tmp_path / ("n" * 300 + ".yaml"), "too long"),
        ("bad\x00name.yaml", "cannot read"),
        (big, "larger than"),
        (binary, "not UTF-8"),
    ]
    for path, words in cases:
        with pytest.raises(BadInput, match=words) as e:
            read_input(path, "model file", max_bytes=100)
        assert "\n" not in str(e.value)


def test_read_input_without_permission(tmp_path, monkeypatch):
    p = tmp_path / "secret.yaml"
    p.write_text("x: 1\n")
    p.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make open() answer as it does for a user
        real_open = os.open

        def denied(path, *a, **k):
            if Path(path) == p:
                raise PermissionError(13, "Permission denied")
            return real_open(path, *a, **k)

        monkeypatch.setattr(files.os, "open", denied)
    with pytest.raises(BadInput, match="Permission denied"):
        read_input(p, "model file")
