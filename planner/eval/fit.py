"""Fit the physically meaningful efficiencies of each device on a table of published runs.

Per device we fit three numbers: the dense matmul efficiency, the FP8 matmul efficiency (where the table
has FP8 runs) and the FlashAttention core efficiency. Every other term of the cost model keeps its
datasheet or measured value. The fit minimises squared log error (so a 2x miss costs the same either way)
with scipy's bounded least squares. Leave-one-source-out refits without each source and predicts it, which
is the error to expect on a software stack the fit has not seen.

`--write` writes the result into the user's data folder (planner.userdata.fit_file(), e.g.
~/.local/share/parallel-planner/fitted_efficiency.yaml), which the catalog applies over the shipped fit;
`--write-shipped` (developers, in a checkout) updates the shipped hardware_profiles/fitted_efficiency.yaml.
"""
from __future__ import annotations

import datetime as _dt
import math
import sys
from pathlib import Path

import numpy as np

from planner.catalog import load_cluster, stack_efficiency
from planner.core.dtypes import train_dtype_or
from planner.core.errors import BadInput
from planner.core.plan import ParallelPlan, Workload
from planner.cost.estimate import estimate
from planner.eval.backtest import TARGETS, backtest_row, predicted_value, read_runs, row_model, stack_key
from planner.files import write_atomic

PARAMS = ("matmul", "matmul_fp8", "attention", "gemm_half_dim")
# Upper bounds are what a device can do at best, not fitting slack: the best measured dense matmul
# (MAMF) fractions are 70-87% BF16 and 70-76% FP8 (docs/formulas.md#efficiency-measured); GEMM tiles are
# 128-256 wide, so a shape curve that halves efficiency beyond a 512-wide GEMM is not a tile effect.
BOUNDS = {"dp_collective": (0.02, 1.0), "matmul": (0.2, 0.9), "matmul_fp8": (0.15, 0.8), "attention": (0.1, 0.9),
          "host_dispatch_us": (0.0, 300.0), "memory": (0.3, 0.95), "gemm_half_dim": (0.0, 512.0)}
# Fewer rows than this per fitted parameter and the fit keeps to the one main matmul efficiency.
ROWS_PER_PARAM = 4


class _Case:
    """One usable row with its plan fixed (the unprinted settings chosen once at default efficiencies)."""

    def __init__(self, row: dict, plan: ParallelPlan):
        self.row = row
        self.plan = plan
        self.model = row_model(row)
        n = int(row["device_count"])
        self.n = n
        per_node = int(row.get("gpus_per_node") or 8)
        self.cluster = load_cluster(str(row["cluster"]), nodes=max(1, n // per_node),
                                    devices=n if n < per_node else None)
        self.stack = stack_key(row)
        self.cluster = self.cluster.with_efficiency(**stack_efficiency(self.stack, str(row["device"])))
        precision = str(row.get("precision") or "bf16")
        self.workload = Workload(global_batch=int(row["global_batch"]), seq_len=int(row["seq_len"]),
                                 dtype=train_dtype_or(precision, "bf16"))
        self.measured = float(row[TARGETS[str(row["target"])]])
        self.device = str(row["device"])
        self.fp8 = self.workload.dtype == "fp8"

    def predict(self, eff: dict) -> float:
        cluster = self.cluster.with_efficiency(**eff)
        est = estimate(self.model, cluster, self.workload, self.plan)
        return predicted_value(str(self.row["target"]), est, self.row, self.n)


def load_cases(path: str | Path) -> list[_Case]:
    """The rows the backtest predicts, each with its parsed cells (planner.eval.backtest.parse_row) and plan;
    a row the backtest skips (a bad cell, a plan the cost model refuses) is left out of the fit."""
    records = read_runs(path)
    from tqdm import tqdm

    cases, skipped = [], []
    for row in tqdm(records, desc="plans per row", unit="row", disable=None, leave=False):
        res = backtest_row(row, return_plan=True)
        if res.status == "ok" and res.plan is not None and res.row is not None:
            cases.append(_Case(res.row, res.plan))
        elif not res.reason.startswith("unusable"):
            skipped.append(res)
    if not cases:
        first = f"; first: id {skipped[0].id!r}: {skipped[0].reason}" if skipped else ""
        raise BadInput(f"{path}: no row could be predicted, so there is nothing to fit{first}")
    return cases


# A device whose efficiencies were measured on the real part (benchmarks/gpu) is fitted only within a band
# around the measurement: sustained training clocks and kernel mixes differ from a microbenchmark by about
# that much, and a fit that strays further is compensating for something else in the model.
MEASURED_BAND = {"matmul": (0.9, 1.1), "matmul_fp8": (0.9, 1.1), "attention": (0.8, 1.2),
                 "memory": (0.9, 1.05), "gemm_half_dim": (0.5, 2.0)}


def _bounds(start: dict) -> dict[str, tuple[float, float]]:
    if not str(start.get("source", "")).startswith("measured"):
        return BOUNDS
    out = dict(BOUNDS)
    for p, (a, b) in MEASURED_BAND.items():
        if start.get(p):
            out[p] = (max(BOUNDS[p][0], a * start[p]), min(BOUNDS[p][1], b * start[p]))
    return out


def _fit_device(cases: list[_Case], start: dict, params=PARAMS) -> dict:
    from scipy.optimize import least_squares

    names = [p for p in params if p != "matmul_fp8" or any(c.fp8 for c in cases)]
    if len(cases) < ROWS_PER_PARAM * len(names):
        main = "matmul_fp8" if all(c.fp8 for c in cases) and "matmul_fp8" in names else names[0]
        names = [main]
    x0 = np.array([start.get(p) if start.get(p) is not None else 0.6 for p in names], dtype=float)
    box = _bounds(start)
    lo = np.array([box[p][0] for p in names])
    hi = np.array([box[p][1] for p in names])
    # start inside the box, away from a bound where a relative finite-difference step would vanish
    x0 = np.clip(x0, lo + 0.05 * (hi - lo), hi - 1e-3)

    def resid(x):
        eff = dict(zip(names, x))
        return np.array([math.log(c.predict(eff) / c.measured) for c in cases])

    # soft_l1: rows the model cannot explain (e.g. a stack's pathology) should not drag every other row.
    scale = np.maximum(hi - lo, 1e-9)
    sol = least_squares(resid, x0, bounds=(lo, hi), diff_step=1e-2, max_nfev=60, loss="soft_l1",
                        f_scale=0.15, x_scale=scale)
    # A parameter no row responds to (bf16 matmul where every run is fp8; FlashAttention where every
    # run is unfused) is not identified by these rows: keep the profile's value, report nothing.
    moved = np.abs(sol.jac).sum(axis=0) > 1e-9
    return {k: round(float(v), 4) for k, v, m in zip(names, sol.x, moved) if m}


def fit(cases: list[_Case], defaults: dict[str, dict], params=PARAMS) -> dict[str, dict]:
    by_device: dict[str, list[_Case]] = {}
    for c in cases:
        by_device.setdefault(c.device, []).append(c)
    return {dev: _fit_device(cs, defaults.get(dev, {}), params) for dev, cs in sorted(by_device.items())}


def mape(cases: list[_Case], params: dict[str, dict]) -> dict[str, float]:
    by_source: dict[str, list[float]] = {}
    for c in cases:
        pred = c.predict(params.get(c.device, {}))
        by_source.setdefault(str(c.row["source_code"]), []).append(abs(pred - c.measured) / c.measured * 100)
    out = {k: float(np.mean(v)) for k, v in sorted(by_source.items())}
    out["overall"] = float(np.mean([x for v in by_source.values() for x in v]))
    return out


def leave_one_source_out(cases: list[_Case], defaults: dict[str, dict], params=PARAMS) -> dict[str, float]:
    """Refit without each source and predict that source. A device seen only in the held-out source
    keeps its profile's values (what a user of an unseen stack would get)."""
    sources = sorted({str(c.row["source_code"]) for c in cases})
    out = {}
    from tqdm import tqdm

    for src in tqdm(sources, desc="leave one source out", unit="fit", disable=None):
        train = [c for c in cases if str(c.row["source_code"]) != src]
        test = [c for c in cases if str(c.row["source_code"]) == src]
        fitted = fit(train, defaults, params)
        out[src] = mape(test, fitted)[src]
    all_err = [out[s] * sum(1 for c in cases if str(c.row["source_code"]) == s) for s in sources]
    out["overall"] = float(sum(all_err) / len(cases))
    return out


def write_fit(fitted: dict[str, dict], path: Path, runs: str, n_rows: int, stack: str | None = None) -> None:
    """Merge a fit into the fitted-efficiency file: device-level (published runs) or under one
    software stack (a source whose stack differs, e.g. vTrain's Megatron-DeepSpeed)."""
    import yaml

    from planner.files import read_input

    doc = yaml.safe_load(read_input(path, "fitted-efficiency file")) if path.exists() else {}
    doc = doc if isinstance(doc, dict) else {}
    entry = {"fitted_on": Path(runs).name, "rows": n_rows, "date": _dt.date.today().isoformat(),
             "method": "scipy.optimize.least_squares, soft-L1 on log(predicted/measured) (planner.eval.fit)"}
    if stack is None:
        doc.update(entry)
        doc["devices"] = fitted
    else:
        doc.setdefault("stacks", {})[stack] = {**entry, "devices": fitted}
    write_atomic(path, "# Generated by `python -m planner.eval.fit`; do not edit by hand.\n" +
                 yaml.safe_dump(doc, sort_keys=False))


def _write_markdown(report: dict, path: Path, runs: str, command: str, marker: str = "fit-table") -> None:
    """The accuracy table: MAPE by source at profile defaults, after the fit, and held out (leave one
    source out, or a random held-out share of the rows)."""
    held = report.get("mape_leave_one_source_out") or report.get("mape_held_out") or {}
    held_name = ("leave-one-source-out" if "mape_leave_one_source_out" in report else
                 f"on {report.get('rows_held_out', 0)} held-out rows")
    lines = [f"| source | MAPE before this fit | MAPE fitted | MAPE {held_name} |",
             "|---|---:|---:|---:|"]
    for src in list(report["mape_after"]):
        lo = f"{held[src]:.1f}%" if src in held else "n/a"
        lines.append(f"| {src} | {report['mape_before'][src]:.1f}% | {report['mape_after'][src]:.1f}% | {lo} |")
    lines.append("")
    lines.append("Fitted efficiencies per device:")
    lines.append("")
    names = sorted({p for vals in report["params"].values() for p in vals})
    lines.append("| device | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for dev, vals in report["params"].items():
        lines.append(f"| {dev} | " + " | ".join(f"{vals[p]:.3f}" if p in vals else "-" for p in names) + " |")
    body = "\n".join(lines) + "\n"
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\nRows: {report['rows']} of {Path(runs).name}. Regenerate: `{command}`\n\n{body}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text + "\n" + block + "\n"
    write_atomic(path, text)


def main(argv=None) -> int:
    from planner.catalog import use_device_fit

    # start from the profiles' own values: the previous fit was made on these rows (catalog.use_device_fit)
    use_device_fit(False)
    try:
        return _main(argv)
    finally:
        use_device_fit(True)


def _main(argv) -> int:
    import argparse
    import json

    from planner import userdata
    from planner.catalog import FITTED_EFFICIENCY_FILE, REPO_ROOT, device, profiles_dir

    ap = argparse.ArgumentParser(description="fit device efficiencies on a published-runs table")
    ap.add_argument("--runs", required=True)
    ap.add_argument("--params", default=",".join(PARAMS),
                    help=f"comma-separated efficiency fields to fit (of {', '.join(BOUNDS)})")
    ap.add_argument("--stack", help="store the fit for this source's software stack, not the device")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="fraction of rows held out at random (seed 0) and reported separately")
    ap.add_argument("--write", action="store_true",
                    help="write the fit to your data folder (applied over the shipped fit): "
                         "<user data dir>/parallel-planner/fitted_efficiency.yaml")
    ap.add_argument("--write-shipped", action="store_true",
                    help="developers: update the shipped hardware_profiles/fitted_efficiency.yaml of this checkout")
    ap.add_argument("--loso", action="store_true", help="also report leave-one-source-out error")
    ap.add_argument("--markdown", help="also write the error table as Markdown to this file")
    args = ap.parse_args(argv)
    if args.write and args.write_shipped:
        raise BadInput("--write and --write-shipped: choose one (your data folder, or the checkout's shipped fit)")
    if args.write_shipped and profiles_dir() != REPO_ROOT / "hardware_profiles":
        raise BadInput(f"--write-shipped updates a checkout's hardware_profiles/, and this planner is installed "
                       f"({profiles_dir()}); use --write for your data folder, or run it from a checkout")
    params = tuple(p.strip() for p in args.params.split(",") if p.strip())
    unknown = [p for p in params if p not in BOUNDS]
    if unknown:
        ap.error(f"unknown parameter(s) {', '.join(unknown)}; choose from {', '.join(BOUNDS)}")
    cases = load_cases(args.runs)
    if args.stack and any(c.stack == args.stack for c in cases):
        # a stack within a table (e.g. NAR21/zero3) is fitted on its own rows only
        cases = [c for c in cases if c.stack == args.stack]
    defaults = {}
    for c in cases:
        e = device(c.device).efficiency
        defaults[c.device] = {**e.model_dump(), "matmul_fp8": e.matmul_fp8 or e.matmul * 0.88}
    train, test = cases, []
    if args.holdout:
        rng = np.random.default_rng(0)
        mask = rng.random(len(cases)) < args.holdout
        train = [c for c, m in zip(cases, mask) if not m]
        test = [c for c, m in zip(cases, mask) if m]
    before = mape(cases, {})
    fitted = fit(train, defaults, params)
    after = mape(cases, fitted)
    report = {"rows": len(cases), "params": fitted, "mape_before": before, "mape_after": after}
    if test:
        report["rows_held_out"] = len(test)
        report["mape_held_out"] = mape(test, fitted)
    if args.loso:
        report["mape_leave_one_source_out"] = leave_one_source_out(cases, defaults, params)
    if args.write:
        write_fit(fitted, userdata.make_dir(userdata.fit_file().parent, "--write") / userdata.fit_file().name,
                  args.runs, len(train), args.stack)
    if args.write_shipped:
        write_fit(fitted, profiles_dir() / FITTED_EFFICIENCY_FILE, args.runs, len(train), args.stack)
    if args.markdown:
        command = "python -m planner.eval.fit " + " ".join(argv if argv is not None else sys.argv[1:])
        _write_markdown(report, Path(args.markdown), args.runs, command,
                        marker=f"fit-table-{args.stack}" if args.stack else "fit-table")
    print(json.dumps(report, indent=2))
    return 0


def _main_one_line_errors() -> int:
    from planner.core.errors import PlannerError

    try:
        return main()
    except PlannerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(_main_one_line_errors())
