"""Fit efficiencies per (software stack, device) on tables of published runs, with error bands.

`python -m planner.eval.fit --runs calibration_runs_clean.csv --runs vtrain_single_node.csv` fits, per stack
and device, the efficiencies the rows identify, shrunk toward the device profile's own values
(planner.eval.fit_shrinkage); chooses the prior's strength by leave-one-source-out (planner.eval.fit_loso);
reports the backtest, leave-one-source-out by source and stack family, and the 80% bands with their coverage
(planner.eval.fit_bands), all judged by the backtest's own search of each row's unprinted settings.

`--write` writes the fit into the user's data folder (planner.userdata.fit_file()), which the catalog applies
over the shipped fit; `--write-shipped` (developers, in a checkout) updates the shipped
hardware_profiles/fitted_efficiency.yaml. Either replaces the entries of the stacks it fitted and the pooled
`band`, and keeps the rest: other stacks, and the top-level per-device section (the fit every cluster without
a stack gets).
"""
from __future__ import annotations

import datetime as _dt
import sys
import time
from pathlib import Path

import numpy as np

from planner.core.errors import BadInput
from planner.eval.fit_bands import Bands, coverage
from planner.eval.fit_cases import Case, backtest_at, family, load_cases  # noqa: F401 (load_cases: this module's API)
from planner.eval.fit_loso import LAMBDAS, Held, choose_lambda, leave_one_source_out, mape_by
from planner.eval.fit_shrinkage import PARAMS, PRIOR_SIGMA, cell_values, fit_all, parameter_count
from planner.files import write_atomic

FIT_ROWS = 400  # at most this many rows of one (stack, device) are fitted (seeded sample); the rest are checked
METHOD = ("MAP shrinkage toward the device profile: soft-L1 on log(predicted/measured) + lam * sum((log theta - "
          "log theta_device) / sigma)^2, lam by leave-one-source-out (planner.eval.fit_shrinkage)")


def fitted_subset(cases: list[Case], cap: int = FIT_ROWS, seed: int = 0) -> set[str]:
    """The keys of the rows fitted: all of a (stack, device) up to `cap`, else a seeded sample of `cap`."""
    rng = np.random.default_rng(seed)
    cells: dict[tuple[str, str], list[Case]] = {}
    for c in cases:
        cells.setdefault(c.cell, []).append(c)
    keep = set()
    for cs in cells.values():
        picked = cs if len(cs) <= cap else [cs[i] for i in sorted(rng.choice(len(cs), cap, replace=False))]
        keep |= {c.key for c in picked}
    return keep


def run_fit(tables: list[str], params=PARAMS, lam: float | None = None, cap: int = FIT_ROWS) -> dict:
    """Everything the command reports, and what it writes (under "stacks" and "band")."""
    t0 = time.time()
    cases = [c for t in tables for c in load_cases(t)]
    keys = fitted_subset(cases, cap)
    scores = {}
    if lam is None:
        lam, scores = choose_lambda(cases, params, fit_keys=keys)
    fits = fit_all([c for c in cases if c.key in keys], lam, params, progress=True)
    values = cell_values(fits)
    predicted = backtest_at(cases, values)
    held = leave_one_source_out(cases, lam, params, fit_keys=keys)
    first = Path(tables[0]).name
    bands = Bands([h for h in held if h.case.table == first])
    report = {"lam": lam, "lam_scores_mean_abs_log": scores, "prior_sigma": {p: PRIOR_SIGMA[p] for p in params},
              "parameters": parameter_count(fits), "rows_fitted": len(keys), "rows": len(cases),
              "stacks": {s: {"rows": f.rows, "fitted": [f"{d}.{p}" for d, p in f.moved], "devices": f.values}
                         for s, f in fits.items()},
              "backtest": {}, "leave_one_source_out": {}}
    for t in tables:
        name = Path(t).name
        mine = [c for c in cases if c.table == name]
        as_held = [Held(c, predicted[c.key], True, True) for c in mine]
        report["backtest"][name] = {"by_source": mape_by(as_held, lambda h: h.case.source),
                                    "by_family": mape_by(as_held, lambda h: h.case.family)}
        unfitted = [h for h in as_held if h.case.key not in keys]
        if unfitted:
            report["backtest"][name]["rows_not_fitted"] = {"rows": len(unfitted),
                                                           "mape": mape_by(unfitted, lambda h: "x")["overall"]}
        loso = [h for h in held if h.case.table == name]
        report["leave_one_source_out"][name] = {"by_source": mape_by(loso, lambda h: h.case.source),
                                                "by_family": mape_by(loso, lambda h: h.case.family),
                                                "fitted_in_fold": sum(h.fitted for h in loso)}
    mine = [h for h in held if h.case.table == first]
    report["coverage"] = {"table": first, "shipped_bands": coverage(mine),
                          "bands_without_own_source": coverage(mine, strict=True)}
    origin = {s: sorted({c.table for c in cases if c.stack == s}) for s in fits}
    report["written"] = _document_sections(fits, bands, origin, lam, params)
    report["rows_held_out"] = [
        {"table": h.case.table, "id": h.case.id, "source": h.case.source, "stack": h.case.stack,
         "device": h.case.device, "target": h.case.target, "measured": h.case.measured,
         "predicted": predicted[h.case.key], "predicted_leave_one_source_out": h.predicted,
         "fitted": h.case.key in keys, "fitted_in_fold": h.fitted, "stack_in_fold": h.stack_seen} for h in held]
    report["seconds"] = round(time.time() - t0, 1)
    return report


def _document_sections(fits, bands: Bands, origin: dict[str, list[str]], lam: float, params) -> dict:
    """The `stacks` and `band` sections of fitted_efficiency.yaml, in the format the catalog reads; origin: the
    tables each stack's rows came from."""
    today = _dt.date.today().isoformat()
    sigma = ", ".join(f"{p} {PRIOR_SIGMA[p]}" for p in params)
    stacks = {}
    for s, f in fits.items():
        cell_band = bands.for_cell(family(s)) or {}
        stack_band = bands.for_stack(family(s))
        stacks[s] = {
            "fitted_on": ", ".join(origin[s]), "rows": f.rows, "date": today,
            "method": f"{METHOD}; lam {lam:g}; sigma {sigma} (x sqrt 2 where the device value is a default); "
                      f"moved: {', '.join(f'{d}.{p}' for d, p in f.moved) or 'nothing'}"
                      + (f"; device_bands: {cell_band['method']}" if cell_band else ""),
            "devices": f.values,
            "band": dict(stack_band) if stack_band else None,  # copies: no YAML anchors between stacks
            "device_bands": {d: {k: cell_band[k] for k in ("p10", "p90", "rows")} for d in f.values}
            if cell_band else {},
        }
    return {"stacks": stacks, "band": bands.new_stack}


HEADER = "# Generated by `python -m planner.eval.fit`; do not edit by hand.\n"


def write_document(sections: dict, path: Path) -> None:
    """Replace the file's entries of the stacks fitted and its pooled `band`; keep the rest (other stacks, the
    top-level per-device fit and its provenance)."""
    import yaml

    from planner.files import read_input

    doc = yaml.safe_load(read_input(path, "fitted-efficiency file")) if path.exists() else {}
    doc = doc if isinstance(doc, dict) else {}
    kept = {k: v for k, v in (doc.get("stacks") or {}).items() if k not in sections["stacks"]}
    doc = {"stacks": {**kept, **sections["stacks"]}, "band": sections["band"],
           **{k: v for k, v in doc.items() if k not in ("stacks", "band")}}
    write_atomic(path, HEADER + yaml.safe_dump(doc, sort_keys=False))


def write_fit(fitted: dict[str, dict], path: Path, runs: str, n_rows: int) -> None:
    """Write a per-device fit (the top-level `devices` section, applied to every cluster) into a fitted-efficiency
    file, keeping its stacks: what a user's own device fit looks like."""
    import yaml

    from planner.files import read_input

    doc = yaml.safe_load(read_input(path, "fitted-efficiency file")) if path.exists() else {}
    doc = doc if isinstance(doc, dict) else {}
    doc.update({"fitted_on": Path(runs).name, "rows": n_rows, "date": _dt.date.today().isoformat(),
                "method": "per device (planner.eval.fit.write_fit)", "devices": fitted})
    write_atomic(path, HEADER + yaml.safe_dump(doc, sort_keys=False))


def markdown(report: dict, command: str) -> str:
    """The accuracy tables: backtest and leave-one-source-out by source and by family, bands, coverage."""
    out = [f"Regenerate: `{command}` ({report['seconds']:.0f} s on the 2-core box). "
           f"{report['parameters']} parameters on {report['rows_fitted']} fitted rows "
           f"({report['rows']} rows in all); lam {report['lam']:g}.", ""]
    for name, bt in report["backtest"].items():
        loso = report["leave_one_source_out"][name]
        out += [f"**{name}**", "", "| source or family | backtest MAPE | leave-one-source-out MAPE |",
                "|---|---:|---:|"]
        for group in ("by_source", "by_family"):
            for k, v in bt[group].items():
                if k != "overall":
                    out.append(f"| {k} | {v:.1f}% | {loso[group].get(k, float('nan')):.1f}% |")
        out.append(f"| **overall** | **{bt['by_source']['overall']:.1f}%** | "
                   f"**{loso['by_source']['overall']:.1f}%** |")
        if "rows_not_fitted" in bt:
            nf = bt["rows_not_fitted"]
            out.append(f"\n{nf['rows']} rows were not fitted (a seeded sample of {FIT_ROWS} per stack and device "
                       f"was): backtest MAPE on them {nf['mape']:.1f}%.")
        out.append("")
    out += ["| stack | rows | fitted | device values | band (p10-p90 x step time) |", "|---|---:|---|---|---|"]
    for s, entry in report["written"]["stacks"].items():
        vals = "; ".join(f"{d}: " + ", ".join(f"{k} {v:g}" for k, v in fields.items())
                         for d, fields in entry["devices"].items())
        b = next(iter(entry["device_bands"].values()), None)
        band = f"{b['p10']:.2f}-{b['p90']:.2f}" if b else "-"
        out.append(f"| {s} | {entry['rows']} | {', '.join(report['stacks'][s]['fitted']) or '-'} | {vals} | {band} |")
    nb = report["written"]["band"]
    cov = report["coverage"]
    out += ["", f"A stack with no rows: band {nb['p10']:.2f}-{nb['p90']:.2f} ({nb['method']})." if nb else "",
            f"Coverage of the 80% bands on the leave-one-source-out predictions of {cov['table']}: "
            + ", ".join(f"{k} {v:.0%}" for k, v in cov["shipped_bands"].items())
            + "; with each source's bands made without its own rows: "
            + ", ".join(f"{k} {v:.0%}" for k, v in cov["bands_without_own_source"].items()) + "."]
    return "\n".join(out) + "\n"


def write_markdown(text: str, path: Path, marker: str = "fit-stacks") -> None:
    """Replace the marked block of the file (or append it)."""
    old = path.read_text() if path.exists() else ""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{text}{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old + "\n" + block + "\n"
    write_atomic(path, new)


def main(argv=None) -> int:
    from planner.catalog import use_device_fit

    # start from the profiles' own values: the shipped per-device fit was made on these rows
    use_device_fit(False)
    try:
        return _main(argv)
    finally:
        use_device_fit(True)


def _main(argv) -> int:
    import argparse
    import json

    from planner import userdata
    from planner.catalog import FITTED_EFFICIENCY_FILE, REPO_ROOT, profiles_dir

    ap = argparse.ArgumentParser(description="fit efficiencies per (software stack, device) on published runs")
    ap.add_argument("--runs", required=True, action="append",
                    help="a runs table (repeat for several); the bands come from the first")
    ap.add_argument("--params", default=",".join(PARAMS),
                    help=f"comma-separated efficiency fields the fit may move (of {', '.join(PRIOR_SIGMA)})")
    ap.add_argument("--lam", type=float, help=f"the prior's strength (default: chosen from {LAMBDAS} by "
                                              "leave-one-source-out)")
    ap.add_argument("--fit-rows", type=int, default=FIT_ROWS,
                    help="fit at most this many rows per stack and device (a seeded sample); the rest are checked")
    ap.add_argument("--loso", action="store_true", help="accepted for old command lines: always done")
    ap.add_argument("--write", action="store_true",
                    help="write the fit to your data folder (applied over the shipped fit): "
                         "<user data dir>/parallel-planner/fitted_efficiency.yaml")
    ap.add_argument("--write-shipped", action="store_true",
                    help="developers: update the shipped hardware_profiles/fitted_efficiency.yaml of this checkout")
    ap.add_argument("--markdown", help="also write the accuracy tables into this Markdown file (a marked block)")
    args = ap.parse_args(argv)
    if args.write and args.write_shipped:
        raise BadInput("--write and --write-shipped: choose one (your data folder, or the checkout's shipped fit)")
    if args.write_shipped and profiles_dir() != REPO_ROOT / "hardware_profiles":
        raise BadInput(f"--write-shipped updates a checkout's hardware_profiles/, and this planner is installed "
                       f"({profiles_dir()}); use --write for your data folder, or run it from a checkout")
    params = tuple(p.strip() for p in args.params.split(",") if p.strip())
    unknown = [p for p in params if p not in PRIOR_SIGMA]
    if unknown:
        raise BadInput(f"--params: unknown field(s) {', '.join(unknown)}; choose from {', '.join(PRIOR_SIGMA)}")
    if args.lam is not None and not args.lam > 0:
        raise BadInput(f"--lam {args.lam}: give a positive number (e.g. 0.01)")
    if args.fit_rows < 1:
        raise BadInput(f"--fit-rows {args.fit_rows}: give a positive number of rows")
    report = run_fit(args.runs, params, args.lam, args.fit_rows)
    if args.write:
        target = userdata.make_dir(userdata.fit_file().parent, "--write") / userdata.fit_file().name
        write_document(report["written"], target)
    if args.write_shipped:
        write_document(report["written"], profiles_dir() / FITTED_EFFICIENCY_FILE)
    if args.markdown:
        command = "python -m planner.eval.fit " + " ".join(argv if argv is not None else sys.argv[1:])
        write_markdown(markdown(report, command), Path(args.markdown))
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
