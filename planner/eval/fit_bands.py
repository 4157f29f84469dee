"""80% prediction intervals of the step time, from the leave-one-source-out residuals.

A band is [p10, p90] x the predicted step time (a rate target's band is the inverse), from the residuals
log(measured / predicted step time) of held-out rows. Three tiers, by what the fit knew of the row's stack and
device when it predicted it:
  - fitted (the stack's rows on that device, from other sources, were in the fit): `device_bands`, the 10th
    and 90th percentile of the fitted residuals of the stack's family (of all families where the family has
    fewer than MIN_ROWS from MIN_SOURCES sources);
  - the stack fitted, but not on this device: the stack's `band`, symmetric (see symmetric_band) from the
    residuals of rows whose device was not fitted, the family's or all families';
  - a stack with no rows: the top-level `band`, the same from all families, widened by sqrt(1 + 1/k) for k
    families seen (the prediction interval of a new group's offset).
"""
from __future__ import annotations

import math

import numpy as np

from planner.eval.fit_loso import Held

MIN_ROWS = 10  # fewer residuals than this and a 10th percentile is a single row: use the pooled band
MIN_SOURCES = 2  # a family's own band needs residuals from this many sources (one source is one setup's bias)


def band_of(logs, method: str) -> dict | None:
    """The 10th-90th percentile of log(measured / predicted): where the fit has seen the stack and device, the
    residuals' sign is the model's (a bias it keeps), so the band may sit off 1."""
    if len(logs) == 0:
        return None
    q10, q90 = np.quantile(np.asarray(logs, dtype=float), [0.1, 0.9])
    return {"p10": round(math.exp(q10), 4), "p90": round(math.exp(q90), 4), "rows": len(logs), "method": method}


def symmetric_band(logs, method: str, widen: float = 1.0) -> dict | None:
    """[1/m, m] with log m the 80th percentile of |log(measured / predicted)| (x widen): for a device the fit
    has not seen, the sign of the miss is whether that device's profile is optimistic, which the other devices'
    residuals do not tell; their size does."""
    if len(logs) == 0:
        return None
    q = widen * float(np.quantile(np.abs(np.asarray(logs, dtype=float)), 0.8))
    return {"p10": round(math.exp(-q), 4), "p90": round(math.exp(q), 4), "rows": len(logs), "method": method}


class Bands:
    """The bands of one set of held-out rows, and the band any (family, tier) gets."""

    def __init__(self, held: list[Held]):
        fitted = [h for h in held if h.fitted]
        unfitted = [h for h in held if not h.fitted]
        self.fitted = {f: band_of(v, f"LOSO residuals, stack and device fitted, family {f}")
                       for f, v in self._families(fitted).items()}
        self.unfitted = {f: symmetric_band(v, f"LOSO |residuals|, device not fitted, family {f}")
                         for f, v in self._families(unfitted).items()}
        self.fitted_pooled = band_of([h.step_log_ratio for h in fitted],
                                     "LOSO residuals, stack and device fitted, all families")
        logs = [h.step_log_ratio for h in unfitted]
        self.unfitted_pooled = symmetric_band(logs, "LOSO |residuals|, device not fitted, all families")
        k = len({h.case.family for h in unfitted})
        self.new_stack = symmetric_band(logs, f"LOSO |residuals|, device not fitted, all families, widened by "
                                        f"sqrt(1 + 1/{k}) for {k} families seen", math.sqrt(1 + 1 / k)) if k else None

    @staticmethod
    def _families(held: list[Held]) -> dict[str, list[float]]:
        """family -> its residuals, for the families with MIN_ROWS of them from MIN_SOURCES sources."""
        groups: dict[str, list[Held]] = {}
        for h in held:
            groups.setdefault(h.case.family, []).append(h)
        return {f: [h.step_log_ratio for h in hs] for f, hs in groups.items()
                if len(hs) >= MIN_ROWS and len({h.case.source for h in hs}) >= MIN_SOURCES}

    def for_cell(self, family: str) -> dict | None:
        """A (stack, device) that was fitted."""
        return self.fitted.get(family) or self.fitted_pooled or self.for_stack(family)

    def for_stack(self, family: str) -> dict | None:
        """A fitted stack on a device it was not fitted on."""
        return self.unfitted.get(family) or self.unfitted_pooled or self.fitted_pooled

    def for_held(self, h: Held) -> dict | None:
        if h.fitted:
            return self.for_cell(h.case.family)
        return self.for_stack(h.case.family) if h.stack_seen else (self.new_stack or self.for_stack(h.case.family))


def inside(h: Held, band: dict | None) -> bool:
    return band is not None and band["p10"] <= math.exp(h.step_log_ratio) <= band["p90"]


def coverage(held: list[Held], strict: bool = False) -> dict[str, float]:
    """The share of held-out rows whose measured step time lies inside their band, overall and by family.
    strict: each source's rows get bands made without that source's own residuals (the shipped bands are
    made from all of them)."""
    if not held:
        return {}
    shipped = Bands(held)
    hits: dict[str, list[bool]] = {}
    by_source = {}
    for h in held:
        if strict:
            if h.case.source not in by_source:
                by_source[h.case.source] = Bands([x for x in held if x.case.source != h.case.source])
            bands = by_source[h.case.source]
        else:
            bands = shipped
        hits.setdefault(h.case.family, []).append(inside(h, bands.for_held(h)))
    out = {f: float(np.mean(v)) for f, v in sorted(hits.items())}
    out["overall"] = float(np.mean([x for v in hits.values() for x in v]))
    return out
