"""`validate` and `calibrate` on the command line: the JSON contract, one-line errors, exit codes, and the
fits calibrate uses. Nothing here needs a calibrated `local` profile: validate runs against a catalog
cluster, calibrate's fits are checked on synthetic measurements, its refusal before measuring anything."""
from __future__ import annotations

import json

import pytest

from planner.core.plan import ParallelPlan, PlanFile, Workload

TINY = """name: tiny-cli
source: "test model for validate"
layers: 2
hidden: 64
heads: 4
kv_heads: 2
ffn_hidden: 128
vocab: 256
max_seq: 64
"""


def _plan_file(tmp_path, plan: ParallelPlan, **kw) -> str:
    model = tmp_path / "tiny.yaml"
    model.write_text(TINY)
    # jetson-orin: one device per node, so --nodes 2 gives the two devices a two-rank plan needs
    pf = PlanFile(model=str(model), cluster="jetson-orin", nodes=2,
                  workload=Workload(global_batch=4, seq_len=16, dtype="bf16"), plan=plan, **kw)
    path = tmp_path / "plan.json"
    path.write_text(pf.model_dump_json())
    return str(path)


def test_validate_json_has_the_contract_fields(tmp_path, run_cli):
    plan = _plan_file(tmp_path, ParallelPlan(pp=2, mbs=1, schedule="gpipe"))
    rc, out, err = run_cli("validate", plan, "--backend", "torch", "--steps", "3", "--warmup", "1", "--json",
                           timeout=300)
    assert rc == 0, err
    r = json.loads(out)
    for key in ("measured_step_time_s", "predicted_step_time_s", "error_pct", "measured_peak_memory_bytes",
                "predicted_peak_memory_bytes", "losses"):
        assert key in r, key
    assert len(r["losses"]) == 3 and r["measured_step_time_s"] > 0 and r["predicted_step_time_s"] > 0
    assert r["workload"]["dtype"] == "fp32"  # CPU runs and predictions are fp32, whatever the plan says
    assert r["error_pct"] == pytest.approx(
        100 * (r["predicted_step_time_s"] - r["measured_step_time_s"]) / r["measured_step_time_s"])


@pytest.mark.parametrize("args, code, match", [
    (["--backend", "jax"], 2, "unknown backend"),
    (["--nproc", "3"], 2, "--nproc 2"),
    (["--steps", "2", "--warmup", "2"], 2, "must exceed"),
    (["--nproc", "0"], 2, "positive"),
])
def test_validate_refusals_are_one_line(tmp_path, capsys, args, code, match):
    plan = _plan_file(tmp_path, ParallelPlan(dp=2, mbs=1))
    rc, err = _main(capsys, "validate", plan, *args)
    assert rc == code and match in err and len(err.strip().splitlines()) == 1, err


def _main(capsys, *args) -> tuple[int, str]:
    """The CLI in this process (refusals come before any process is spawned): (exit status, stderr)."""
    from planner.app.cli import main

    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_validate_refuses_what_the_backend_cannot_run(tmp_path, capsys):
    plan = _plan_file(tmp_path, ParallelPlan(pp=2, mbs=1, schedule="zb-h1"))
    rc, err = _main(capsys, "validate", plan)
    assert rc == 2 and "zb-h1" in err and len(err.strip().splitlines()) == 1


def test_validate_missing_and_unknown_version(tmp_path, capsys):
    rc, err = _main(capsys, "validate", str(tmp_path / "none.json"))
    assert rc == 2 and "no such file" in err
    p = tmp_path / "v9.json"
    p.write_text(json.dumps({"schema_version": 9}))
    rc, err = _main(capsys, "validate", str(p))
    assert rc == 2 and "schema_version 9" in err


def test_calibrate_refuses_to_overwrite_before_measuring(tmp_path, capsys):
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "local.yaml").write_text("name: mine\n")
    rc, err = _main(capsys, "calibrate", "--backend", "torch", "--out-dir", str(tmp_path))
    assert rc == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "devices" / "local.yaml").read_text() == "name: mine\n"
    rc, err = _main(capsys, "calibrate", "--nproc", "1")
    assert rc == 2 and "at least 2" in err


def test_gemm_fit_recovers_peak_and_half_dim():
    from planner.backends.torch.calibrate import fit_gemm

    peak, half = 50e9, 128.0
    rows = [{"m": d, "n": d, "k": d, "flops_per_s": peak * d / (d + half)} for d in (64, 128, 256, 512, 1024)]
    rows += [{"m": 4096, "n": 4096, "k": 4096, "flops_per_s": peak * 4096 / (4096 + half)}] * 3
    got_peak, got_half = fit_gemm(rows)
    assert got_peak == pytest.approx(peak * 4096 / (4096 + half))
    assert 90 < got_half < 180


def test_link_fit_reproduces_the_planners_own_formulas():
    from planner.backends.torch.calibrate import fit_link
    from planner.core.hardware import CollectiveLink
    from planner.cost import comm

    bw, lat = 2e9, 100e-6
    link = CollectiveLink(bus_bytes_per_s=bw, latency_s=lat, level="intra-node", ranks=2, nodes=1)
    rows = [{"bytes": s, "all_reduce_s": comm.all_reduce_time_s(s, link), "all_gather_s": comm.all_gather_time_s(s, link),
             "p2p_s": comm.p2p_time_s(s, bw, lat)} for s in (4096, 65536, 1 << 20, 1 << 24)]
    got_bw, got_lat, rms = fit_link(rows, 2)
    assert got_bw == pytest.approx(bw, rel=0.01) and got_lat == pytest.approx(lat, rel=0.01) and rms < 0.005


def test_link_fit_stays_in_range_when_bandwidth_is_not_identified():
    # --quick measures only small messages: every time is latency, so any large bandwidth fits; the fit
    # must stay within its search range rather than run off to infinity
    from planner.backends.torch.calibrate import fit_link
    from planner.core.hardware import CollectiveLink
    from planner.cost import comm

    bw, lat = 5e9, 1e-3
    link = CollectiveLink(bus_bytes_per_s=bw, latency_s=lat, level="intra-node", ranks=2, nodes=1)
    rows = [{"bytes": s, "all_reduce_s": comm.all_reduce_time_s(s, link), "all_gather_s": comm.all_gather_time_s(s, link),
             "p2p_s": comm.p2p_time_s(s, bw, lat)} for s in (4096, 8192)]
    got_bw, got_lat, _ = fit_link(rows, 2)
    assert 1e7 <= got_bw <= 10 ** 11.5 * 1.0001
    assert got_lat == pytest.approx(lat, rel=0.05)
