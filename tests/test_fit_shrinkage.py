"""planner.eval.fit (issue 18): efficiencies per (stack, device) shrunk toward the device, leave-one-source-out,
and the 80% bands. Fast: a few small vTrain rows (2-8 GPUs), their measured times replaced by the model's own
predictions at known efficiencies, so that what the fit should find is known."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from planner import catalog
from planner.core.errors import BadInput
from planner.eval import backtest, fit, fit_bands, fit_cases, fit_loso, fit_shrinkage

DATA = Path(__file__).parent / "data"
STACK = "megatron-deepspeed"
DEVICE = "a100-sxm-80gb"


@pytest.fixture(scope="module", autouse=True)
def _profile_values():
    """The fit's world: devices at their profile values, not the shipped per-device fit."""
    catalog.use_device_fit(False)
    yield
    catalog.use_device_fit(True)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[fit_cases.Case]:
    """16 vTrain rows (every 90th, so sizes and degrees vary) as two sources of one stack."""
    with open(DATA / "vtrain_single_node.csv", newline="") as f:
        rows = list(csv.DictReader(f))[::90][:16]
    for i, r in enumerate(rows):
        r["source_code"] = "SYN-A" if i % 2 == 0 else "SYN-B"
        r["stack"] = STACK
    path = tmp_path_factory.mktemp("fit") / "rows.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return fit_cases.load_cases(path)


def truth(matmul: float) -> dict:
    return {**fit_shrinkage.prior_values(STACK, DEVICE), "matmul": matmul}


def measured_at(cases, eff: dict) -> list[fit_cases.Case]:
    """The cases with their measured value replaced by the model's prediction at `eff`."""
    import copy

    out = []
    for c in cases:
        c2 = copy.copy(c)
        c2.measured = c.predict(eff)
        out.append(c2)
    return out


def test_soft_l1_residual_squares_to_the_loss():
    import numpy as np

    r = np.array([-2.0, -0.01, 0.0, 0.01, 0.5])
    psi = fit_shrinkage.soft_l1(r, 0.15)
    assert np.allclose(psi**2, 2 * 0.15**2 * (np.sqrt(1 + (r / 0.15) ** 2) - 1))
    assert np.sign(psi).tolist() == np.sign(r).tolist()
    assert psi[3] == pytest.approx(0.01, rel=1e-3) and abs(psi[0]) < 2 * 0.5  # linear near 0, damped far out


def test_measured_fields_reads_the_profile_source():
    assert fit_shrinkage.measured_fields("measured 2026-11-23, benchmarks/gpu/...") == set(fit_shrinkage.FRACTIONS)
    assert fit_shrinkage.measured_fields("matmul: MAMF BF16 1745 = 77.6%; memory: default (not measured)") == {"matmul"}
    assert fit_shrinkage.measured_fields("default: median of measured fractions") == set()


def test_prior_is_the_device_with_the_stack_profile_laid_over():
    values, sd = fit_shrinkage.prior("megatron-core", "h100-sxm-80gb")
    device = catalog.device("h100-sxm-80gb").efficiency
    stack = catalog.find_stack("megatron-core").efficiency_for("h100-sxm-80gb")
    assert values["matmul"] == device.matmul and values["attention"] == stack["attention"] != device.attention
    # a generic default is a wider prior than a measured value
    _, sd_default = fit_shrinkage.prior("maxtext", "tpu-v5e")
    assert sd_default["matmul"] == pytest.approx(math.sqrt(2) * sd["matmul"])


def test_the_fit_recovers_a_known_efficiency_and_shrinks_with_few_rows(cases):
    known = measured_at(cases, truth(0.6))
    weak = fit_shrinkage.fit_stack(known, lam=1e-4)
    many = fit_shrinkage.fit_stack(known, lam=0.01)
    few = fit_shrinkage.fit_stack(known[:2], lam=0.01, params=("matmul",))
    strong = fit_shrinkage.fit_stack(known, lam=1.0)
    prior = fit_shrinkage.prior(STACK, DEVICE)[0]["matmul"]
    got = {k: f.values[DEVICE]["matmul"] for k, f in (("weak", weak), ("many", many), ("few", few),
                                                       ("strong", strong))}
    assert (DEVICE, "matmul") in weak.moved
    assert abs(got["weak"] - 0.6) < 0.02 and max(abs(r) for r in weak.log_residuals.values()) < 0.02
    # MAP: the more rows and the weaker the prior, the nearer the rows' value; never past it
    assert 0.6 <= got["weak"] < got["many"] < got["strong"] < prior
    assert got["many"] < got["few"] < prior


def test_a_parameter_no_row_responds_to_is_not_fitted(cases):
    # vTrain's stack runs unfused attention, so attention cannot move a row's prediction; no row is FP8
    res = fit_shrinkage.fit_stack(measured_at(cases, truth(0.6)), lam=0.01)
    fields = {p for _, p in res.moved}
    assert "attention" not in fields and "matmul_fp8" not in fields
    assert res.values[DEVICE]["attention"] == fit_shrinkage.prior(STACK, DEVICE)[0]["attention"]


def test_few_rows_fit_few_parameters(cases):
    res = fit_shrinkage.fit_stack(measured_at(cases[:3], truth(0.6)), lam=0.01)
    per_device = [p for d, p in res.moved if d == DEVICE]
    assert len(per_device) == 1  # 3 rows < 2 x ROWS_PER_PARAM: only the most responsive parameter


def test_with_efficiency_prices_like_cluster_with_efficiency_after_an_estimate(cases):
    from planner.cost.estimate import estimate

    c = cases[0]
    estimate(c.model, c.cluster, c.workload, c.plan)  # a cluster that has cached cost contexts
    ours = estimate(c.model, fit_cases.with_efficiency(c.cluster, {"matmul": 0.4}), c.workload, c.plan)
    theirs = estimate(c.model, c.cluster.with_efficiency(matmul=0.4), c.workload, c.plan)
    at_prior = estimate(c.model, c.cluster, c.workload, c.plan)
    assert ours.step_time_s == pytest.approx(theirs.step_time_s, rel=1e-12)
    assert ours.step_time_s > at_prior.step_time_s


def test_stack_values_sets_what_the_backtest_uses_and_restores_it(cases):
    row = cases[0].row
    plain = backtest.backtest_row(row).predicted
    with fit_cases.stack_values({(STACK, DEVICE): {"matmul": 0.3}}):
        slow = backtest.backtest_row(row).predicted
    assert slow > 1.2 * plain and backtest.backtest_row(row).predicted == pytest.approx(plain)


def test_leave_one_source_out_never_fits_the_held_out_source(cases):
    # SYN-A ran at matmul 0.6, SYN-B at 0.45: each held out is predicted with the other's efficiency
    known = measured_at([c for c in cases if c.source == "SYN-A"], truth(0.6))
    known += measured_at([c for c in cases if c.source == "SYN-B"], truth(0.45))
    held = fit_loso.leave_one_source_out(known, lam=0.01)
    assert len(held) == len(known) and all(h.fitted and h.stack_seen for h in held)
    a = [h for h in held if h.case.source == "SYN-A"]
    # fitted on SYN-B's slower runs, SYN-A is predicted too slow: measured / predicted step time below 1
    assert sum(h.step_log_ratio < 0 for h in a) >= 0.75 * len(a)
    # a stack whose only source is held out is predicted at its prior
    alone = [c for c in known if c.source == "SYN-A"]
    held_alone = fit_loso.leave_one_source_out(alone, lam=0.01)
    at_prior = fit_cases.backtest_at(alone, {(STACK, DEVICE): fit_shrinkage.prior_values(STACK, DEVICE)})
    assert not any(h.fitted or h.stack_seen for h in held_alone)
    assert [h.predicted for h in held_alone] == pytest.approx([at_prior[c.key] for c in alone])


def _held(family: str, source: str, log_ratio: float, fitted: bool, stack_seen: bool | None = None):
    case = SimpleNamespace(family=family, source=source, measured=1.0, step_log_ratio=lambda p: math.log(1 / p))
    return fit_loso.Held(case, math.exp(-log_ratio), fitted, fitted if stack_seen is None else stack_seen)


def test_bands_by_tier():
    import numpy as np

    rng = np.random.default_rng(0)
    fitted = [_held("megatron", f"S{i % 3}", x, True) for i, x in enumerate(rng.normal(0.05, 0.1, 60))]
    unfitted = [_held("xla", "X", x, False) for x in rng.normal(0.0, 0.1, 20)]
    unfitted += [_held("pytorch", "T", x, False) for x in rng.normal(0.5, 0.05, 20)]
    bands = fit_bands.Bands(fitted + unfitted)
    cell = bands.for_cell("megatron")
    inside = np.mean([cell["p10"] <= math.exp(h.step_log_ratio) <= cell["p90"] for h in fitted])
    assert 0.75 <= inside <= 0.85 and cell["p10"] < 1 < cell["p90"]
    # one source per family: the pooled unfitted band, symmetric, and wider than the fitted one
    assert bands.for_stack("pytorch") == bands.for_stack("xla") == bands.unfitted_pooled
    assert bands.unfitted_pooled["p10"] * bands.unfitted_pooled["p90"] == pytest.approx(1, rel=1e-3)
    assert bands.unfitted_pooled["p90"] > cell["p90"] and bands.new_stack["p90"] > bands.unfitted_pooled["p90"]
    # a family without fitted rows gets the pooled fitted band
    assert bands.for_cell("xla") == bands.fitted_pooled
    cov = fit_bands.coverage(fitted + unfitted)
    strict = fit_bands.coverage(fitted + unfitted, strict=True)
    assert 0.7 <= cov["overall"] <= 0.95 and strict["overall"] <= cov["overall"]


def test_write_document_keeps_the_device_fit_and_the_catalog_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "fitted_efficiency.yaml"
    path.write_text(yaml.safe_dump({"fitted_on": "old.csv", "rows": 3, "devices": {DEVICE: {"matmul": 0.7}},
                                    "stacks": {"other": {"devices": {}}, "torchtitan": {"devices": {}}}}))
    band = {"p10": 0.9, "p90": 1.2, "rows": 40, "method": "test"}
    sections = {"stacks": {"torchtitan": {"fitted_on": "t.csv", "rows": 18, "date": "2026-12-08", "method": "m",
                                          "devices": {"h100-sxm-80gb": {"matmul": 0.61, "attention": 0.2}},
                                          "band": {**band, "p10": 0.6, "p90": 1.7},
                                          "device_bands": {"h100-sxm-80gb": {"p10": 0.9, "p90": 1.2, "rows": 40}}}},
                "band": {**band, "p10": 0.5, "p90": 2.0}}
    fit.write_document(sections, path)
    doc = yaml.safe_load(path.read_text())
    assert doc["devices"] == {DEVICE: {"matmul": 0.7}} and set(doc["stacks"]) == {"other", "torchtitan"}
    assert doc["band"]["p90"] == 2.0 and doc["stacks"]["torchtitan"]["devices"]["h100-sxm-80gb"]["matmul"] == 0.61
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    from planner import userdata

    userdata.fit_file().parent.mkdir(parents=True)
    userdata.fit_file().write_text(path.read_text())
    catalog._hardware_catalog.cache_clear()
    try:
        titan = catalog.load_stack("torchtitan")
        assert titan.efficiency["h100-sxm-80gb"]["matmul"] == 0.61
        assert (titan.band_for("h100-sxm-80gb").p10, titan.band_for("h100-sxm-80gb").p90) == (0.9, 1.2)
        assert (titan.band_for("b200").p10, titan.band_for("b200").p90) == (0.6, 1.7)
    finally:
        catalog._hardware_catalog.cache_clear()


def test_the_shipped_fit_has_every_field_it_fits_and_a_band_per_device():
    doc = yaml.safe_load((catalog.profiles_dir() / catalog.FITTED_EFFICIENCY_FILE).read_text())
    assert doc["band"]["p10"] < 1 < doc["band"]["p90"]
    for name, entry in doc["stacks"].items():
        assert catalog.find_stack(name) is not None, name
        for dev, values in entry["devices"].items():
            # the fields the per-device fit also sets, so the stack's entry alone decides them
            assert set(fit_shrinkage.ALWAYS_WRITTEN) <= set(values), (name, dev)
            b = entry["device_bands"][dev]
            assert b["p10"] < b["p90"] and b["rows"] >= fit_bands.MIN_ROWS
        assert entry["band"]["p90"] >= entry["device_bands"][dev]["p90"]  # unfitted devices: wider


def test_bad_arguments_are_one_line():
    with pytest.raises(BadInput, match="unknown field"):
        fit._main(["--runs", "x.csv", "--params", "matmul,speed"])
    with pytest.raises(BadInput, match="--lam"):
        fit._main(["--runs", "x.csv", "--lam", "0"])
