"""Software stacks as profiles (issue 18, planner/core/stack.py, hardware_profiles/stacks/): every profile loads,
`--stack` on estimate / plan / sweep and in plan files and the API, what a stack changes in the estimate and its
explanation, and the error band."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cli_helpers import one_line, run  # noqa: E402

from planner import catalog, userdata  # noqa: E402
from planner.app import api  # noqa: E402
from planner.core.dims import SCHEDULES  # noqa: E402
from planner.core.errors import BadInput  # noqa: E402
from planner.core.plan import ParallelPlan, Workload  # noqa: E402
from planner.core.stack import DEFAULT_BAND, Stack  # noqa: E402
from planner.cost.estimate import estimate  # noqa: E402
from planner.importers import load_model  # noqa: E402

STACK_FILES = sorted((REPO_ROOT / "hardware_profiles" / "stacks").glob("*.yaml"))
# one fitting plan of llama3-8b on one DGX H100 node
EST = ["estimate", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1", "--tp", "2", "--sp", "--zero", "1",
       "--mbs", "1", "--gbs", "64", "--seq", "8192", "--recompute", "selective"]
PLAN_FIELDS = dict(tp=2, sp=True, zero=1, mbs=1, recompute="selective")


def test_every_stack_file_loads_with_known_schedules_and_sources():
    names = catalog.names("stacks")
    assert names == sorted(yaml.safe_load(p.read_text())["name"] for p in STACK_FILES)
    assert {"megatron-core", "megatron-lm-legacy", "megatron-deepspeed", "deepspeed", "torchtitan", "maxtext",
            "torch-eager"} <= set(names)
    for name in names:
        st = catalog.load_stack(name)
        assert st.schedules and set(st.schedules) <= set(SCHEDULES), name
        assert st.sources and all(len(s) > 10 for s in st.sources), name
        for device, fields in st.efficiency.items():  # priors name catalog devices, each with its source
            assert device in catalog.names("devices") and fields["source"], (name, device)


def test_aliases_resolve_and_name_one_stack_each():
    seen = {}
    for name in catalog.names("stacks"):
        for alias in catalog.find_stack(name).aliases:
            assert catalog.load_stack(alias).name == name
            assert seen.setdefault(alias, name) == name and alias not in catalog.names("stacks")
    assert catalog.load_stack("deepspeed-zero3").name == "deepspeed"  # the calibration table's own spelling


def test_a_profile_with_an_unknown_schedule_is_refused_in_one_line():
    doc = yaml.safe_load(STACK_FILES[0].read_text())
    with pytest.raises(BadInput, match="unknown pipeline schedule 'pipedream'") as e:
        catalog.parse_as(Stack, {**doc, "schedules": ["1f1b", "pipedream"]}, "stacks/x.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("stacks/x.yaml")
    with pytest.raises(BadInput, match="unknown efficiency field 'speed'"):
        catalog.parse_as(Stack, {**doc, "efficiency": {"h100-sxm-80gb": {"speed": 0.5, "source": "made up"}}}, "x")
    with pytest.raises(BadInput, match=r"efficiency.h100-sxm-80gb.attention: Input should be less than or equal to 1"):
        catalog.parse_as(Stack, {**doc, "efficiency": {"h100-sxm-80gb": {"attention": 1.5, "source": "typo"}}}, "x")


def test_unknown_stack_is_one_line_exit_2(capsys):
    rc, _, err = run(capsys, *EST, "--stack", "megatorn")
    line = one_line(rc, err, 2)
    assert "unknown stack 'megatorn'" in line and "megatron-core" in line and "torchtitan" in line
    for cmd in (["plan", "--model", "llama3-8b", "--cluster", "dgx-h100", "--gbs", "64", "--seq", "4096"],
                ["sweep", "--model", "llama3-8b", "--cluster", "dgx-h100", "--gbs", "64", "--seq", "4096"]):
        rc, _, err = run(capsys, *cmd, "--stack", "nope")
        assert "unknown stack 'nope'" in one_line(rc, err, 2)


def test_two_stacks_differ_on_the_same_plan_and_each_says_why(capsys):
    out = {}
    for name in ("torchtitan", "megatron-core"):
        rc, text, err = run(capsys, *EST, "--stack", name, "--json")
        assert rc == 0, err
        out[name] = json.loads(text)
        assert out[name]["stack"] == name and out[name]["fits"]
    titan, mcore = out["torchtitan"], out["megatron-core"]
    # megatron-core runs cuDNN / FA3-class attention faster than SDPA's FA2 and overlaps TP communication
    assert mcore["step_time_s"] < titan["step_time_s"]
    assert "on torchtitan: sdpa attention at 0.28 of peak on h100-sxm-80gb" in titan["why"]
    # the attention figure is the shipped fit's (or the stack's prior where the fit has none)
    assert re.search(r"on megatron-core: cudnn-fused attention at 0\.\d+ of peak on h100-sxm-80gb", mcore["why"])
    assert "TP comm overlapped" in mcore["why"]
    assert "TP comm overlapped" not in titan["why"]
    assert mcore["plan"]["overlap_tp_comm"] and not titan["plan"]["overlap_tp_comm"]
    assert mcore["breakdown"]["tp_comm_s"] < titan["breakdown"]["tp_comm_s"]


def test_no_stack_keeps_the_numbers_and_a_stack_changes_only_what_it_sets():
    model, w = load_model("llama3-8b"), Workload(global_batch=64, seq_len=8192)
    cluster = catalog.load_cluster("dgx-a100-80gb", 1)
    plan = ParallelPlan(dp=4, flash_attention=True, overlap_grad_reduce=True, **PLAN_FIELDS)
    bare = estimate(model, cluster, w, plan)
    # torchtitan sets nothing on an A100 (no prior, no fit) and this plan already has its plan fields
    stacked = estimate(model, catalog.apply_stack(cluster, "torchtitan"), w, plan)
    assert stacked.step_time_s == bare.step_time_s and stacked.peak_memory_bytes == bare.peak_memory_bytes
    assert stacked.why.startswith(bare.why) and "on torchtitan: sdpa attention at" in stacked.why
    assert "; on " not in bare.why  # no stack clause without a stack
    # without a stack the default band: wide, and named so where it is defined
    assert (bare.step_time_s_p10, bare.step_time_s_p90) == pytest.approx(
        (bare.step_time_s * DEFAULT_BAND.p10, bare.step_time_s * DEFAULT_BAND.p90))
    # the catalog cluster itself is untouched by with_stack
    assert cluster.stack is None and catalog.apply_stack(cluster, None) is cluster


def test_plan_files_round_trip_the_stack(capsys, tmp_path):
    path = tmp_path / "plan.json"
    rc, _, err = run(capsys, "plan", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1", "--gbs", "64",
                     "--seq", "4096", "--top", "1", "--stack", "megatron-core", "--save", path)
    assert rc == 0, err
    saved = json.loads(path.read_text())
    assert saved["stack"] == "megatron-core" and saved["plan"]["schedule"] in ("1f1b", "interleaved-1f1b")
    assert saved["plan"]["overlap_tp_comm"] is True  # the stack's plan defaults went into the search
    rc, text, err = run(capsys, "estimate", "--plan", path, "--json")
    again = json.loads(text)
    assert rc == 0 and again["stack"] == "megatron-core"
    assert again["step_time_s"] == pytest.approx(saved["estimate"]["step_time_s"], rel=1e-12)
    assert "on megatron-core" in again["why"]
    # the API reads and writes it too
    pf = api.load_plan(path)
    assert pf.stack == "megatron-core" and api.simulate(pf).estimate.step_time_s == pytest.approx(again["step_time_s"])
    # another stack on the same file: its plan fields and efficiencies
    rc, text, _ = run(capsys, "estimate", "--plan", path, "--stack", "torchtitan", "--json")
    other = json.loads(text)
    assert rc == 0 and other["stack"] == "torchtitan" and other["step_time_s"] > again["step_time_s"]
    # a stack the catalog does not know, in the file: one line naming the file and the field
    path.write_text(json.dumps({**saved, "stack": "bogus"}))
    rc, _, err = run(capsys, "estimate", "--plan", path)
    line = one_line(rc, err, 2)
    assert str(path) in line and "stack" in line and "unknown stack 'bogus'" in line


def test_plan_searches_only_the_stacks_schedules(capsys):
    args = ["plan", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "2", "--gbs", "64", "--seq", "4096",
            "--pp", "2", "--top", "4", "--json"]
    rc, text, _ = run(capsys, *args, "--stack", "megatron-core")
    plans = json.loads(text)["plans"]
    assert rc == 0 and plans and {p["schedule"] for p in plans} <= {"1f1b", "interleaved-1f1b"}
    rc, text, _ = run(capsys, *args, "--stack", "maxtext")
    assert rc == 0 and {p["schedule"] for p in json.loads(text)["plans"]} == {"gpipe"}
    rc, _, err = run(capsys, *args[:-1], "--stack", "megatron-core", "--schedule", "zb-h1")
    assert "stack megatron-core runs 1f1b, interleaved-1f1b" in one_line(rc, err, 2)


def test_profiles_list_json_has_the_stacks(capsys):
    rc, text, _ = run(capsys, "profiles", "list", "--json")
    stacks = json.loads(text)["stacks"]
    assert rc == 0 and [s["name"] for s in stacks] == catalog.names("stacks")
    mcore = next(s for s in stacks if s["name"] == "megatron-core")
    assert mcore["family"] == "megatron" and mcore["attention_kernel"] == "cudnn-fused"
    assert "TP comm overlapped" in mcore["features"]
    legacy = next(s for s in stacks if s["name"] == "megatron-lm-legacy")
    assert "unfused attention" in legacy["features"] and "TP comm overlapped" not in legacy["features"]


def _write_user_fit(doc: dict) -> None:
    path = userdata.fit_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    catalog._hardware_catalog.cache_clear()


@pytest.fixture
def user_fit(monkeypatch, tmp_path):
    """A user fit file (planner.userdata.fit_file) in a fresh data folder, written by the test."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    yield _write_user_fit
    catalog._hardware_catalog.cache_clear()


def test_the_band_brackets_the_step_time_device_band_first(user_fit):
    user_fit({"fitted_on": "test.csv", "rows": 40, "date": "2026-12-08", "method": "leave-one-source-out",
              "band": {"p10": 0.8, "p90": 1.4, "rows": 40},
              "stacks": {"torchtitan": {"fitted_on": "test.csv", "rows": 18, "date": "2026-12-08",
                                        "devices": {"h100-sxm-80gb": {"matmul": 0.7}},
                                        "band": {"p10": 0.9, "p90": 1.3, "rows": 18},
                                        "device_bands": {"h100-sxm-80gb": {"p10": 0.95, "p90": 1.2, "rows": 6}}}}})
    titan = catalog.load_stack("torchtitan")
    assert (titan.band_for("h100-sxm-80gb").p10, titan.band_for("h100-sxm-80gb").p90) == (0.95, 1.2)
    assert (titan.band_for("a100-sxm-80gb").p10, titan.band_for("a100-sxm-80gb").p90) == (0.9, 1.3)
    assert titan.band_for("a100-sxm-80gb").rows == 18 and "test.csv" in titan.band_for("a100-sxm-80gb").source
    # a stack without a band of its own (no rows in any fit) takes the fit's pooled one
    eager = catalog.load_stack("torch-eager").error_band
    assert (eager.p10, eager.p90) == (0.8, 1.4)
    # the fitted value wins over the prior (matmul), the prior stays where the fit has none (attention)
    assert titan.efficiency["h100-sxm-80gb"]["matmul"] == 0.7 and titan.efficiency["h100-sxm-80gb"]["attention"] == 0.28
    assert titan.fitted_fields["h100-sxm-80gb"] == ["matmul"]  # (the shipped fit adds its own devices)
    est = api.estimate("llama3-8b", "dgx-h100", 1, gbs=64, seq=8192, stack="torchtitan", **PLAN_FIELDS)
    assert est.step_time_s_p10 == pytest.approx(0.95 * est.step_time_s)
    assert est.step_time_s_p10 <= est.step_time_s <= est.step_time_s_p90
    assert "matmul 0.7 (fitted)" in est.why and "attention at 0.28 of peak on h100-sxm-80gb (prior)" in est.why


def test_a_fit_file_without_bands_loads_and_a_broken_band_is_one_line(user_fit):
    user_fit({"stacks": {"torchtitan": {"devices": {"h100-sxm-80gb": {"attention": 0.3}}}}})
    st = catalog.load_stack("torchtitan")
    band = st.band_for("h100-sxm-80gb")  # the shipped fit's band, the user's file having none
    assert st.efficiency["h100-sxm-80gb"]["attention"] == 0.3 and band.p10 <= 1.0 <= band.p90
    assert DEFAULT_BAND.p10 < 1.0 < DEFAULT_BAND.p90
    user_fit({"stacks": {"torchtitan": {"band": {"p10": 1.5, "p90": 0.9}}}})
    with pytest.raises(BadInput, match="stacks.torchtitan.band") as e:
        catalog.load_stack("torchtitan")
    assert "p10 1.5 is above p90 0.9" in str(e.value) and "\n" not in str(e.value)


def test_api_takes_a_stack_and_passes_sweep_executor_keywords():
    est = api.estimate("llama3-8b", "dgx-h100", 1, gbs=64, seq=8192, stack="megatron-core", **PLAN_FIELDS)
    assert "on megatron-core" in est.why
    # a field given explicitly wins over the stack's default
    off = api.estimate("llama3-8b", "dgx-h100", 1, gbs=64, seq=8192, stack="megatron-core",
                       overlap_tp_comm=False, **PLAN_FIELDS)
    assert off.step_time_s > est.step_time_s and "TP comm overlapped" not in off.why
    top = api.plan("llama3-8b", "dgx-h100", 1, gbs=64, seq=4096, top=2, stack="maxtext")
    assert top.attrs["stack"] == "maxtext" and api.to_plan_file(top).stack == "maxtext"
    grid = api.sweep("llama3-8b", "dgx-h100", nodes=1, seqs=4096, gbs=64, stacks=["torchtitan", None],
                     executor="serial", workers=None, scheduler=None)
    assert list(grid["stack"]) == ["torchtitan", ""] and set(grid["status"]) == {"ok"}
    with pytest.raises(BadInput, match="--workers applies to the Dask executor"):
        api.sweep("llama3-8b", "dgx-h100", nodes=1, seqs=4096, gbs=64, workers=2)
