"""Calibrations belong to the user (issue 16): where they are written, how `local` and `--cluster DIR`
resolve, what calibrate refuses before measuring, its progress lines, and planner.eval.fit's write targets.
Every test points the user's data folder at its own temporary HOME / XDG_DATA_HOME, never the real one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cli_helpers import one_line, run

from planner import catalog, userdata
from planner.core.errors import BadInput

SHIPPED = catalog.profiles_dir()
# The committed developer-machine profile, renamed from `local` (issue 16); the fixtures copy it under the
# names calibrate writes and change one number, so a test can tell which copy was resolved.
EXAMPLE = {"devices": "epyc-2core-cpu", "links": "epyc-2core-gloo", "nodes": "epyc-2core"}
RENAMES = {"epyc-2core-cpu": "local-cpu", "epyc-2core-gloo": "local-gloo", "epyc-2core": "local"}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh HOME with no XDG_DATA_HOME: the user data folder is HOME/.local/share/parallel-planner."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    (tmp_path / "home").mkdir()
    yield tmp_path / "home"
    catalog._EXTRA_ROOTS.clear()  # a test's --cluster DIR stays out of the next test's catalog
    catalog._hardware_catalog.cache_clear()


def write_calibration(folder: Path, peak_tflops: float, quick: bool = False) -> Path:
    """A calibration folder as calibrate writes it: the shipped example under the `local` names, with
    peak fp32 TFLOP/s set to peak_tflops."""
    for section in userdata.SECTIONS:
        doc = yaml.safe_load((SHIPPED / section / "epyc-2core.yaml").read_text())
        text = yaml.safe_dump(doc)
        for old, new in sorted(RENAMES.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(f": {old}\n", f": {new}\n")
        doc = yaml.safe_load(text)
        if section == "devices":
            doc["peak_tflops"] = {"fp32": peak_tflops}
        (folder / section).mkdir(parents=True, exist_ok=True)
        (folder / section / "local.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (folder / userdata.CALIBRATION_RECORD).write_text(json.dumps({"date": "2026-01-01", "quick": quick}))
    catalog._hardware_catalog.cache_clear()
    return folder


def peak_of(cluster) -> float:
    return cluster.devices[0].device.peak_tflops["fp32"]


def test_the_data_folder_follows_xdg_and_home(home, monkeypatch, tmp_path):
    assert userdata.calibration_dir() == home / ".local/share/parallel-planner/calibration"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert userdata.calibration_dir() == tmp_path / "xdg/parallel-planner/calibration"
    assert userdata.fit_file() == tmp_path / "xdg/parallel-planner/fitted_efficiency.yaml"


def test_no_shipped_profile_answers_for_local(home):
    for section in ("devices", "links", "nodes", "clusters"):
        assert not set(catalog.names(section)) & set(userdata.LOCAL_NAMES), section
    # the developer machine's measurement is still there, under its own name
    assert catalog.load_cluster("epyc-2core").devices[0].device.name == "epyc-2core-cpu"


def test_local_without_a_calibration_is_one_line_naming_the_quick_calibration(home, capsys):
    rc, _, err = run(capsys, "plan", "--model", "tiny-llama-20m", "--cluster", "local", "--gbs", "8", "--seq", "64")
    line = one_line(rc, err, 2)
    assert "planner calibrate --backend torch --quick" in line
    assert str(userdata.calibration_dir()) in line
    rc, _, err = run(capsys, "profiles", "show", "local")
    assert "planner calibrate --backend torch --quick" in one_line(rc, err, 2)
    for name in userdata.LOCAL_NAMES[1:]:
        with pytest.raises(BadInput, match="calibrate --backend torch --quick"):
            catalog.device(name) if name.endswith(("cpu", "gpu")) else catalog.link(name)


def test_resolution_order_user_calibration_then_explicit_folder(home, tmp_path, capsys):
    write_calibration(userdata.calibration_dir(), peak_tflops=0.5)
    assert peak_of(catalog.load_cluster("local")) == 0.5
    assert catalog.device("local-cpu").peak_tflops["fp32"] == 0.5
    rc, out, err = run(capsys, "plan", "--model", "tiny-llama-20m", "--cluster", "local", "--gbs", "8",
                       "--seq", "64", "--json")
    assert rc == 0, err
    # the same machine as the shipped epyc-2core but 6.7x the GEMM peak: the plan uses the user's numbers
    rc, shipped, err = run(capsys, "plan", "--model", "tiny-llama-20m", "--cluster", "epyc-2core", "--gbs", "8",
                           "--seq", "64", "--json")
    assert rc == 0, err
    step_s = [json.loads(o)["plans"][0]["estimate"]["step_time_s"] for o in (out, shipped)]
    assert step_s[0] < step_s[1]
    # an explicit calibration folder comes before the user's: the folder, its record, or a profile file in it
    other = write_calibration(tmp_path / "elsewhere", peak_tflops=0.25)
    for given in (other, other / "calibration.json", other / "nodes" / "local.yaml"):
        assert peak_of(catalog.load_cluster(str(given))) == 0.25, given


def test_a_user_profile_replaces_a_shipped_one_of_the_same_name(home):
    shipped_peak = catalog.device("epyc-2core-cpu").peak_tflops["fp32"]
    folder = userdata.calibration_dir()
    (folder / "devices").mkdir(parents=True)
    doc = yaml.safe_load((SHIPPED / "devices" / "epyc-2core.yaml").read_text())
    doc["peak_tflops"] = {"fp32": shipped_peak * 2}
    (folder / "devices" / "mine.yaml").write_text(yaml.safe_dump(doc))
    catalog._hardware_catalog.cache_clear()
    assert catalog.device("epyc-2core-cpu").peak_tflops["fp32"] == pytest.approx(shipped_peak * 2)


def test_a_folder_that_is_not_a_calibration_is_refused_in_one_line(home, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "plan", "--model", "tiny-llama-20m", "--cluster", tmp_path / "empty", "--gbs", "8",
                     "--seq", "64")
    assert "not a calibration folder" in one_line(rc, err, 2)


# ---------------------------------------------------------------------------------------------------
# calibrate: where it writes, what it refuses, all before measuring anything


class Measured(Exception):
    """Raised in place of the first measurement: everything before it (the folder checks) has run."""


@pytest.fixture
def no_measuring(monkeypatch):
    from planner.backends.torch import calibrate as cal

    def stop():
        raise Measured
    monkeypatch.setattr(cal, "machine_description", stop)


def test_calibrate_writes_to_the_user_folder_by_default(home, no_measuring):
    from planner.backends.torch.calibrate import calibrate

    with pytest.raises(Measured):
        calibrate(nproc=2, quick=True)
    assert userdata.calibration_dir().is_dir()
    assert str(userdata.calibration_dir()).startswith(str(home))


def test_out_dir_is_created_with_its_parents(home, tmp_path, no_measuring):
    from planner.backends.torch.calibrate import calibrate

    target = tmp_path / "a" / "b" / "c"
    with pytest.raises(Measured):
        calibrate(nproc=2, quick=True, out_dir=str(target))
    assert target.is_dir() and not any(target.iterdir())


def test_out_dir_that_is_a_file_or_inside_the_package_is_refused(home, tmp_path, capsys, no_measuring):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = run(capsys, "calibrate", "--backend", "torch", "--out-dir", afile)
    assert "is a file" in one_line(rc, err, 2) and afile.read_text() == "x"
    rc, _, err = run(capsys, "calibrate", "--backend", "torch", "--out-dir", afile / "sub")
    assert "a file" in one_line(rc, err, 2)
    rc, _, err = run(capsys, "calibrate", "--backend", "torch", "--out-dir", SHIPPED)
    assert "planner's own files" in one_line(rc, err, 2)
    assert not (SHIPPED / "devices" / "local.yaml").exists()


def test_a_quick_calibration_is_replaced_without_force_a_full_one_is_not(home, tmp_path, capsys, no_measuring):
    from planner.backends.torch.calibrate import calibrate

    quick = write_calibration(tmp_path / "quick", 0.5, quick=True)
    with pytest.raises(Measured):  # went on to measure
        calibrate(nproc=2, out_dir=str(quick))
    full = write_calibration(tmp_path / "full", 0.5, quick=False)
    rc, _, err = run(capsys, "calibrate", "--backend", "torch", "--out-dir", full)
    assert "--force" in one_line(rc, err, 2)


def test_nproc_has_an_upper_bound(home, capsys):
    rc, _, err = run(capsys, "calibrate", "--backend", "torch", "--nproc", "100000")
    assert "at most" in one_line(rc, err, 2)


def test_progress_says_step_i_of_n_and_scales_the_time_left(capsys, monkeypatch):
    from planner.backends.torch import calibrate_progress as cp

    steps = cp.steps(cuda=False)
    done = sum(q for _, q, _ in steps[:3])
    left = sum(q for _, q, _ in steps[3:])
    now = 1_000_000.0
    monkeypatch.setattr(cp.time, "time", lambda: now)
    cp.tick(3, quick=True, cuda=False, t0=now - 2 * done)  # the first three steps took twice as long
    err = capsys.readouterr().err
    assert f"[4/{len(steps)}] {steps[3][0]}" in err
    assert f"about {cp._minutes(2 * left)} left" in err
    cp.announce(quick=False, cuda=True, nproc=2)
    err = capsys.readouterr().err
    assert cp._minutes(cp.expected_s(False, True)) in err and "--quick" in err
    assert len(cp.steps(cuda=True)) == len(steps) - cp.CPU_ONLY


# ---------------------------------------------------------------------------------------------------
# planner.eval.fit: the user's fit goes to the data folder and is applied over the shipped one


def test_a_user_fit_is_applied_over_the_shipped_fit(home):
    shipped = yaml.safe_load((SHIPPED / catalog.FITTED_EFFICIENCY_FILE).read_text())["devices"]
    name, values = sorted(shipped.items())[0]
    field = sorted(values)[0]
    other = next((n, v) for n, v in sorted(shipped.items()) if n != name)
    before_other = catalog.device(other[0]).efficiency
    userdata.fit_file().parent.mkdir(parents=True)
    userdata.fit_file().write_text(yaml.safe_dump({"fitted_on": "mine.csv", "rows": 3, "date": "2026-01-01",
                                                   "devices": {name: {field: 0.123}}}))
    catalog._hardware_catalog.cache_clear()
    assert getattr(catalog.device(name).efficiency, field) == 0.123
    assert "mine.csv" in catalog.device(name).efficiency.source
    assert catalog.device(other[0]).efficiency == before_other  # the shipped fit stays for the rest


def test_fit_write_targets(home, tmp_path):
    from planner.eval import fit

    with pytest.raises(BadInput, match="choose one"):
        fit._main(["--runs", str(tmp_path / "none.csv"), "--write", "--write-shipped"])
    userdata.make_dir(userdata.fit_file().parent, "--write")
    fit.write_fit({"a100-sxm-80gb": {"matmul": 0.5}}, userdata.fit_file(), "runs.csv", 1)
    assert yaml.safe_load(userdata.fit_file().read_text())["devices"] == {"a100-sxm-80gb": {"matmul": 0.5}}


def test_a_shipped_local_profile_is_ignored(home, tmp_path, monkeypatch):
    # a stale build/ folder once put the old hardware_profiles/*/local.yaml into a wheel: never the answer
    shipped = tmp_path / "shipped"
    shutil.copytree(SHIPPED, shipped)
    write_calibration(shipped, peak_tflops=0.5)
    monkeypatch.setattr(catalog, "profiles_dir", lambda: shipped)
    catalog._hardware_catalog.cache_clear()
    with pytest.raises(BadInput, match="calibrate --backend torch --quick"):
        catalog.load_cluster("local")
    write_calibration(userdata.calibration_dir(), peak_tflops=0.25)
    assert peak_of(catalog.load_cluster("local")) == 0.25
