"""A non-editable install finds its catalogs (issue 16): build a wheel from a copy of the checkout, install
it outside the checkout, and run the console entry point from another folder with an empty HOME. Once, a
wheel shipped the catalogs where importlib.resources gave no usable path and `profiles list` printed four
empty sections with exit 0. (.ci/run does the same into a fresh venv; here the test venv's dependencies
serve, and `pip install --target` keeps it to seconds.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PLAN = ["plan", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1", "--gbs", "32", "--seq", "8192"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("install")
    # a copy without build outputs: a stale build/lib would put files the checkout no longer has in the wheel
    shutil.copytree(REPO, tmp / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # an isolated build, as a user's `pip wheel .` makes (a venv's own setuptools may predate >=77)
    subprocess.run([*pip, "wheel", "--no-deps", str(tmp / "src"), "-w", str(tmp / "wheel")],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "wheel").glob("*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    (tmp / "home").mkdir()
    (tmp / "cwd").mkdir()
    return {"tmp": tmp, "wheel": wheel, "site": tmp / "site"}


def planner_cli(installed: dict, *args: str) -> subprocess.CompletedProcess:
    """The installed console entry point (planner.app.cli:main) from an empty folder, with an empty HOME and
    only the installed copy of planner importable (not the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(installed["site"]), "HOME": str(installed["tmp"] / "home")}
    env.pop("XDG_DATA_HOME", None)
    code = "import sys, planner, planner.app.cli; assert planner.__file__.startswith(sys.argv[1]), planner.__file__; " \
           "sys.argv = ['planner', *sys.argv[2:]]; sys.exit(planner.app.cli.main())"
    return subprocess.run([sys.executable, "-c", code, str(installed["site"]), *args], cwd=installed["tmp"] / "cwd",
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_ships_the_catalogs_and_no_local_profile(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    shipped = {n for n in names if n.startswith("planner/profiles/")}
    assert "planner/profiles/devices/nvidia.yaml" in shipped
    assert "planner/profiles/nodes/epyc-2core.yaml" in shipped
    assert not [n for n in shipped if Path(n).name == "local.yaml"]
    models = [n for n in names if n.startswith("planner/model_catalog/") and n.endswith(".yaml")]
    assert models and "planner/model_catalog/hf/" in "".join(names)
    # the shipped files are the checkout's, one for one
    for section in ("devices", "links", "nodes", "clusters"):
        assert {Path(n).name for n in shipped if f"/{section}/" in n} == \
            {p.name for p in (REPO / "hardware_profiles" / section).glob("*.yaml")}, section


def test_installed_catalog_is_not_empty_and_plans(installed):
    proc = planner_cli(installed, "profiles", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    for section in ("devices", "links", "clusters", "models"):
        assert len(listed[section]) > 0, section
    assert "llama3-8b" in listed["models"] and "dgx-h100" in listed["clusters"]
    proc = planner_cli(installed, *PLAN)
    assert proc.returncode == 0, proc.stderr
    assert "llama3-8b on dgx-h100" in proc.stdout and "tokens/s" in proc.stdout


def test_installed_local_without_calibration_says_how_to_make_one(installed):
    proc = planner_cli(installed, "plan", "--model", "tiny-llama-20m", "--cluster", "local", "--gbs", "8",
                       "--seq", "64")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "planner calibrate --backend torch --quick" in proc.stderr


def test_an_emptied_install_is_an_error_never_exit_0(installed, tmp_path):
    broken = {**installed, "site": tmp_path / "site"}
    shutil.copytree(installed["site"], broken["site"])
    for f in (broken["site"] / "planner" / "profiles" / "devices").glob("*.yaml"):
        f.unlink()
    proc = planner_cli(broken, "profiles", "list")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, (proc.returncode, proc.stderr)
    assert "missing or empty" in proc.stderr and "reinstall" in proc.stderr
    assert str(broken["site"] / "planner" / "profiles") in proc.stderr
