"""Leave one source out: refit without each source, predict its rows, and choose the prior's strength by it.

Stacks share no parameter, so leaving a source out changes only the fits of the stacks its rows ran on:
each fold refits those stacks on their other sources' rows and predicts the held-out rows with the backtest
itself (unprinted settings searched again at the fold's values). A held-out row whose (stack, device) has no
row left in the fold is predicted at the device's own values: what a user of an unfitted stack gets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planner.eval.fit_cases import Case, backtest_at
from planner.eval.fit_shrinkage import PARAMS, fit_stack, prior_values

LAMBDAS = (0.003, 0.01, 0.03, 0.1, 0.3)  # the grid lam is chosen from (in log-error units squared)


@dataclass
class Held:
    """One row predicted with its source left out of the fit."""

    case: Case
    predicted: float
    fitted: bool  # whether its (stack, device) had rows of other sources in the fold
    stack_seen: bool  # whether its stack had rows of other sources in the fold (on any device)

    @property
    def error_pct(self) -> float:
        return abs(self.predicted / self.case.measured - 1) * 100

    @property
    def step_log_ratio(self) -> float:
        """log(measured / predicted step time): what the bands are quantiles of."""
        return self.case.step_log_ratio(self.predicted)


def leave_one_source_out(cases: list[Case], lam: float, params=PARAMS, only_fitted: bool = False,
                         fit_keys: set[str] | None = None) -> list[Held]:
    """Every row (or, with only_fitted, only those whose stack and device keep rows in their fold: the others
    do not depend on lam) predicted by a fit that has not seen its source; the fits take only the rows named
    in fit_keys (all when None)."""
    from tqdm import tqdm

    out = []
    sources = sorted({c.source for c in cases})
    for src in tqdm(sources, desc=f"leave one source out (lam {lam:g})", unit="fold", disable=None, leave=False):
        test = [c for c in cases if c.source == src]
        values: dict[tuple[str, str], dict] = {}
        seen: set[tuple[str, str]] = set()
        stacks_seen: set[str] = set()
        for stack in sorted({c.stack for c in test}):
            train = [c for c in cases if c.stack == stack and c.source != src
                     and (fit_keys is None or c.key in fit_keys)]
            if train:
                stacks_seen.add(stack)
                fold = fit_stack(train, lam, params)
                values.update({(stack, d): v for d, v in fold.values.items()})
                seen |= {c.cell for c in train}
        for c in test:
            values.setdefault(c.cell, prior_values(c.stack, c.device))
        test = [c for c in test if c.cell in seen] if only_fitted else test
        preds = backtest_at(test, values)
        out += [Held(c, preds[c.key], c.cell in seen, c.stack in stacks_seen) for c in test]
    return out


def mean_abs_log(held: list[Held]) -> float:
    return float(np.mean([abs(h.step_log_ratio) for h in held])) if held else math.nan


def choose_lambda(cases: list[Case], params=PARAMS, grid=LAMBDAS,
                  fit_keys: set[str] | None = None) -> tuple[float, dict[float, float]]:
    """The lam of the grid with the least mean |log error| over the held-out rows whose stack and device were
    fitted in their fold (the others are predicted at the prior whatever lam is); the score of every lam.
    Without such rows (one source per stack) the middle of the grid."""
    scores = {lam: mean_abs_log(leave_one_source_out(cases, lam, params, only_fitted=True, fit_keys=fit_keys))
              for lam in grid}
    finite = {k: v for k, v in scores.items() if not math.isnan(v)}
    if not finite:
        return grid[len(grid) // 2], scores
    return min(finite, key=finite.get), scores


def mape_by(held: list[Held], key) -> dict[str, float]:
    """MAPE of the held-out predictions grouped by key(held) (e.g. source, family), and "overall"."""
    groups: dict[str, list[float]] = {}
    for h in held:
        groups.setdefault(key(h), []).append(h.error_pct)
    out = {k: float(np.mean(v)) for k, v in sorted(groups.items())}
    out["overall"] = float(np.mean([h.error_pct for h in held])) if held else math.nan
    return out
