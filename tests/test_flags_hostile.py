"""Hostile flags and paths on plan / estimate / sweep (issue 16): every cap of planner.core.limits refused just past it
in one line naming the flag and the cap, accepted at it where that is cheap; fixed degrees against their
--max-*; flags the mixed, island and phone planners do not apply; infeasible is exit 1; unusable paths."""
from __future__ import annotations

import json
import os

import pytest

from planner.core import limits
from tests.cli_helpers import one_line, run

TINY = ["--model", "tiny-llama-20m", "--cluster", "dgx-h100"]
EST = ["estimate", *TINY, "--mbs", "1"]


def _refused(capsys, *args, words=(), rc=2) -> str:
    line = one_line(*run(capsys, *args)[::2], rc)
    for w in words:
        assert w in line, line
    return line


# --- caps ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, cap", [("--seq", limits.MAX_SEQ_LEN), ("--gbs", limits.MAX_GLOBAL_BATCH),
                                       ("--tp", limits.MAX_DEVICES), ("--pp", limits.MAX_DEVICES),
                                       ("--cp", limits.MAX_DEVICES), ("--ep", limits.MAX_DEVICES),
                                       ("--dp", limits.MAX_DEVICES), ("--vpp", limits.MAX_DEVICES),
                                       ("--mbs", limits.MAX_GLOBAL_BATCH)])
def test_estimate_flag_just_past_its_cap(capsys, flag, cap):
    base = {"--gbs": "32", "--seq": "512"}
    base[flag] = str(cap + 1)
    args = ["estimate", *TINY, *(x for kv in base.items() for x in kv)]
    if flag != "--mbs":
        args += ["--mbs", "1"]
    _refused(capsys, *args, words=(flag, f"{cap:,}"))


@pytest.mark.parametrize("flag, value, cap", [
    ("--nodes", limits.MAX_DEVICES + 1, limits.MAX_DEVICES), ("--max-tp", limits.MAX_DEVICES + 1, limits.MAX_DEVICES),
    ("--max-pp", limits.MAX_DEVICES + 1, limits.MAX_DEVICES), ("--max-cp", limits.MAX_DEVICES + 1, limits.MAX_DEVICES),
    ("--top", limits.MAX_TOP + 1, limits.MAX_TOP), ("--seq", 2**63, limits.MAX_SEQ_LEN),
    ("--gbs", 10**13, limits.MAX_GLOBAL_BATCH), ("--seq-chunks", limits.MAX_SEQ_LEN + 1, limits.MAX_SEQ_LEN)])
def test_plan_flag_past_its_cap(capsys, flag, value, cap):
    args = {"--gbs": "32", "--seq": "512", flag: str(value)}
    _refused(capsys, "plan", *TINY, *(x for kv in args.items() for x in kv), words=(flag, f"{cap:,}"))


@pytest.mark.parametrize("flag", ["--top", "--nodes", "--max-cp", "--gbs", "--seq"])
def test_plan_flag_zero_or_negative(capsys, flag):
    args = {"--gbs": "32", "--seq": "512"}
    for v in ("0", "-3"):
        args[flag] = v
        _refused(capsys, "plan", *TINY, *(x for kv in args.items() for x in kv), words=(flag, "positive"))


def test_devices_past_the_cap_refused_before_building(capsys):
    # 125,001 DGX nodes are 1,000,008 devices: refused from the preset's arithmetic, no objects built
    per_node = 8
    nodes = limits.MAX_DEVICES // per_node + 1
    line = _refused(capsys, "plan", *TINY, "--nodes", nodes, "--gbs", 32, "--seq", 512,
                    words=("--nodes", f"{limits.MAX_DEVICES:,}"))
    assert f"{nodes * per_node:,} devices" in line
    _refused(capsys, "plan", *TINY, "--nodes", 10**9, "--gbs", 32, "--seq", 512,
             words=("--nodes", f"{limits.MAX_DEVICES:,}"))


def test_cluster_file_past_the_device_cap(capsys, tmp_path):
    f = tmp_path / "huge.yaml"
    f.write_text("name: huge\nsource: test\ngroups:\n  - node: dgx-h100\n    count: 200000\n")
    _refused(capsys, "plan", "--model", "tiny-llama-20m", "--cluster", f, "--gbs", 32, "--seq", 512,
             words=("1,600,000 devices", "count"))


def test_sequence_at_the_cap_is_accepted(capsys):
    rc, out, err = run(capsys, *EST, "--tp", 8, "--gbs", 8, "--seq", limits.MAX_SEQ_LEN, "--json")
    assert rc == 0, err
    est = json.loads(out)
    # 8 sequences of 2^24 tokens: a finite, positive throughput (not the overflowed 0 of before)
    assert 0 < est["tokens_per_s"] < float("inf") and est["step_time_s"] > 0


def test_microbatches_at_and_past_the_cap(capsys):
    # tp 4 x pp 2 on 8 GPUs: dp 1, mbs 1, so micro-batches = global batch
    cap = limits.MAX_MICROBATCHES
    rc, out, err = run(capsys, *EST, "--tp", 4, "--pp", 2, "--gbs", cap, "--seq", 512, "--json")
    assert rc == 0, err
    assert json.loads(out)["step_time_s"] > 0
    line = _refused(capsys, *EST, "--tp", 4, "--pp", 2, "--gbs", cap + 1, "--seq", 512, words=("--gbs", f"{cap:,}"))
    assert f"{cap + 1:,} micro-batches" in line


def test_plan_microbatches_past_the_cap(capsys):
    # 8 GPUs with micro-batches of at most 16: any plan has at least gbs / 128 micro-batches
    gbs = 128 * limits.MAX_MICROBATCHES + 128
    _refused(capsys, "plan", *TINY, "--gbs", gbs, "--seq", 512, words=("--gbs", "micro-batches",
                                                                       f"{limits.MAX_MICROBATCHES:,}"))


def test_top_at_the_cap_is_accepted(capsys):
    rc, out, err = run(capsys, "plan", *TINY, "--gbs", 32, "--seq", 512, "--top", limits.MAX_TOP, "--json")
    assert rc == 0, err
    plans = json.loads(out)["plans"]
    assert 5 < len(plans) <= limits.MAX_TOP
    times = [p["estimate"]["step_time_s"] for p in plans]
    assert times == sorted(times)


def test_documents_past_the_sequence_cap(capsys):
    _refused(capsys, "plan", *TINY, "--gbs", 32, "--seq", 512, "--documents", f"100:{limits.MAX_SEQ_LEN + 1}",
             words=("--documents", f"{limits.MAX_SEQ_LEN:,}"))


def test_sweep_caps(capsys):
    _refused(capsys, "sweep", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", 2**40, "--gbs", 32,
             words=("--seq", f"{limits.MAX_SEQ_LEN:,}"))
    _refused(capsys, "sweep", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--nodes", 10**7, "--seq", 512,
             "--gbs", 32, words=("--nodes", f"{limits.MAX_DEVICES:,}"))
    many = ",".join(str(i) for i in range(1, 102))  # 101 x 101 = 10,201 cells
    _refused(capsys, "sweep", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", many, "--gbs", many,
             words=("10,201 cells", f"{limits.MAX_SWEEP_CELLS:,}"))


def test_plan_file_held_to_the_caps(capsys, tmp_path):
    path = tmp_path / "p.json"
    rc, _, err = run(capsys, "plan", *TINY, "--gbs", 32, "--seq", 512, "--top", 1, "--save", path)
    assert rc == 0, err
    doc = json.loads(path.read_text())
    doc["workload"]["seq_len"] = limits.MAX_SEQ_LEN + 1
    path.write_text(json.dumps(doc))
    line = _refused(capsys, "estimate", "--plan", path)
    assert "seq_len" in line and f"{limits.MAX_SEQ_LEN:,}" in line.replace("16777216", "16,777,216")


def test_api_search_held_to_the_caps():
    from planner.app import api
    from planner.core.errors import BadInput

    with pytest.raises(BadInput, match="16,777,216"):
        api.plan("tiny-llama-20m", "dgx-h100", gbs=32, seq=limits.MAX_SEQ_LEN + 1)
    with pytest.raises(BadInput, match="--cp 4 is above --max-cp 2"):
        api.plan("tiny-llama-20m", "dgx-h100", gbs=32, seq=512, cp=4, max_cp=2)


# --- consistency ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deg", ["tp", "pp", "cp"])
def test_fixed_degree_above_its_max_refused_alike(capsys, deg):
    line = _refused(capsys, "plan", *TINY, "--gbs", 32, "--seq", 512, f"--{deg}", 4, f"--max-{deg}", 2)
    assert line == f"error: --{deg} 4 is above --max-{deg} 2; drop one of them or make them agree"


def test_fixed_degree_at_its_max_accepted(capsys):
    rc, out, err = run(capsys, "plan", *TINY, "--gbs", 32, "--seq", 512, "--cp", 2, "--max-cp", 2, "--top", 1,
                       "--json")
    assert rc == 0, err
    assert json.loads(out)["plans"][0]["cp"] == 2


@pytest.mark.parametrize("cluster, flags, kind", [
    ("mixed-a100-h100", ["--max-tp", "2"], "hetero"),
    ("mixed-a100-h100", ["--max-pp", "2", "--offload"], "hetero"),
    ("two-pods-25gbe", ["--mbs", "2"], "islands"),
    ("two-pods-25gbe", ["--seq-chunks", "1,2"], "islands"),
    ("phones-snapdragon-wifi6", ["--max-cp", "2"], "edge"),
    ("phones-snapdragon-wifi6", ["--documents", "128"], "edge"),
])
def test_routed_planners_refuse_flags_they_do_not_apply(capsys, cluster, flags, kind):
    line = _refused(capsys, "plan", "--model", "tiny-llama-20m", "--cluster", cluster, "--gbs", 32, "--seq", 512,
                    *flags, words=(kind, "does not apply"))
    for f in flags:
        if f.startswith("--"):
            assert f in line


def test_hetero_applies_mbs(capsys):
    rc, out, err = run(capsys, "plan", "--model", "tiny-llama-20m", "--cluster", "mixed-a100-h100", "--gbs", 64,
                       "--seq", 512, "--mbs", 2, "--json", "--top", 3)
    assert rc == 0, err
    plans = json.loads(out)["plans"]
    for p in plans:
        mbs = p["plan"]["mbs"] if "plan" in p else {g["plan"]["mbs"] for g in p["groups"]}.pop()
        assert mbs == 2, p["label"]


def test_edge_applies_mbs(capsys):
    args = ["plan", "--model", "tiny-llama-20m", "--cluster", "phones-snapdragon-wifi6", "--gbs", 16, "--seq", 256,
            "--json"]
    rc1, out1, err1 = run(capsys, *args)
    rc2, out2, err2 = run(capsys, *args, "--mbs", 4)
    assert rc1 == rc2 == 0, (err1, err2)
    # 16 sequences as 16 micro-batches of 1 or 4 of 4: different pipelines, different step times
    assert json.loads(out1)["plans"][0]["step_time_s"] != json.loads(out2)["plans"][0]["step_time_s"]


def test_phone_cluster_infeasible_is_exit_1_with_the_closest(capsys):
    line = _refused(capsys, "plan", "--model", "llama3-70b", "--cluster", "phones-snapdragon-wifi6", "--gbs", 8,
                    "--seq", 512, rc=1)
    assert "no plan fits" in line and "closest" in line and "GB" in line


def test_empty_output_names_refused(capsys):
    _refused(capsys, "plan", *TINY, "--gbs", 32, "--seq", 512, "--save", "", words=("--save", "empty"))
    _refused(capsys, "sweep", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", 512, "--gbs", 32,
             "-o", "", words=("-o", "empty"))


def test_json_with_plan_estimate_and_sweep(capsys, tmp_path):
    for args in (["plan", *TINY, "--gbs", 32, "--seq", 512, "--top", 2],
                 [*EST, "--gbs", 32, "--seq", 512],
                 ["sweep", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", 512, "--gbs", "32,64"],
                 ["sweep", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", 512, "--gbs", 32,
                  "-o", tmp_path / "s.csv"]):
        rc, out, err = run(capsys, *args, "--json")
        assert rc == 0, err
        doc = json.loads(out)
        assert doc
    rows = json.loads(run(capsys, "sweep", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", 512,
                          "--gbs", "32,64", "--json")[1])
    assert [r["gbs"] for r in rows] == [32, 64] and all(r["status"] == "ok" for r in rows)


# --- paths ------------------------------------------------------------------------------------------------


def _fifo(tmp_path):
    p = tmp_path / "fifo.yaml"
    os.mkfifo(p)
    return p


@pytest.fixture
def bad_inputs(tmp_path):
    d = tmp_path / "adir.yaml"
    d.mkdir()
    return {"fifo": (_fifo(tmp_path), "not a regular file"), "device": ("/dev/zero", "not a regular file"),
            "directory": (d, "directory"), "long name": (tmp_path / ("x" * 300 + ".yaml"), "too long")}


@pytest.mark.parametrize("which", ["fifo", "device", "directory", "long name"])
def test_unusable_inputs(capsys, bad_inputs, which):
    path, words = bad_inputs[which]
    _refused(capsys, "plan", "--model", path, "--cluster", "dgx-h100", "--gbs", 32, "--seq", 512, words=(words,))
    _refused(capsys, "plan", "--model", "tiny-llama-20m", "--cluster", path, "--gbs", 32, "--seq", 512,
             words=(words,))
    _refused(capsys, "estimate", "--plan", path, words=(words,))


@pytest.mark.parametrize("which", ["fifo", "device", "directory", "long name", "missing dir", "parent is a file"])
def test_unusable_outputs(capsys, tmp_path, which):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    path, words = {"fifo": (_fifo(tmp_path), "not a regular file"),
                   "device": ("/dev/null", "not a regular file"), "directory": (tmp_path, "directory"),
                   "long name": (tmp_path / ("x" * 300 + ".json"), "too long"),
                   "missing dir": (tmp_path / "no" / "p.json", "does not exist"),
                   "parent is a file": (plain / "p.json", "cannot write")}[which]
    _refused(capsys, "plan", *TINY, "--gbs", 32, "--seq", 512, "--save", path, "--force", words=(words,))
    _refused(capsys, "sweep", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--seq", 512, "--gbs", 32,
             "-o", path, "--force", words=(words,))
    if which == "fifo":
        assert os.path.exists(path) and not os.path.isfile(path)
