"""Efficiencies per (software stack, device), shrunk toward the device's own values: a MAP fit.

For each stack, minimise over its parameters x = log(theta / theta_device)

    sum over its rows of soft_l1( log(predicted / measured) )  +  lam * sum over parameters of (x / sigma)^2

where theta_device is the device profile's measured or datasheet-derived value (never a previous fit), with
the stack profile's own figure for that device where it has one (hardware_profiles/stacks/), and sigma says
how far a software stack moves that efficiency on the same silicon (PRIOR_SIGMA, stated below; wider where
the device value is a generic default).
A (stack, device) with few rows stays near the device; with many its rows decide. The per-(stack, device)
parameters are matmul, matmul_fp8, attention, memory and host_dispatch_us; dp_collective belongs to the stack
(its collectives' engine), shared by its devices. A parameter no row of the stack responds to is not fitted.
lam is chosen by leave-one-source-out cross-validation (planner.eval.fit_loso).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from planner.catalog import device
from planner.eval.fit_cases import Case

# How far (1 sd of log theta) a software stack moves an efficiency measured on the same device:
# - matmul 0.15: every stack here runs cuBLAS / XLA GEMMs; what differs is clocks under load and shapes (the
#   measured MAMF fractions of peak span 70-87% across devices, docs/formulas.md#efficiency-measured).
# - matmul_fp8 0.25: FP8 recipes differ in scaling (delayed, current, blockwise) and cast kernels.
# - attention 0.4: kernel families differ 1.5-2x on one device (FlashAttention-2 vs FlashAttention-3 / cuDNN
#   on H100, FlashAttention-3 paper).
# - memory 0.25: fused vs unfused elementwise ops reach different fractions of the bandwidth.
# - host_dispatch_us 1.0 and dp_collective 1.5: eager vs compiled dispatch, bucketed vs per-parameter
#   collectives differ by several x.
PRIOR_SIGMA = {"matmul": 0.15, "matmul_fp8": 0.25, "attention": 0.4, "memory": 0.25, "host_dispatch_us": 1.0,
               "dp_collective": 1.5}
STACK_LEVEL = ("dp_collective",)
PARAMS = ("matmul", "matmul_fp8", "attention", "host_dispatch_us", "dp_collective")
# Physical range of each value (a fit never leaves it; the prior keeps it well inside).
BOUNDS = {"matmul": (0.2, 0.95), "matmul_fp8": (0.15, 0.9), "attention": (0.08, 0.95), "memory": (0.2, 0.98),
          "host_dispatch_us": (1.0, 300.0), "dp_collective": (0.02, 1.0)}
# FP8 GEMMs reach a lower fraction of their doubled peak than BF16 ones: H100 MAMF 70.9% vs 80.3%
# (docs/formulas.md#efficiency-measured); the prior of a device profile that has no FP8 figure of its own.
FP8_OF_BF16 = 0.709 / 0.803
# Values the fit writes for every (stack, device) even when it does not move them, so that a stack's entry
# alone decides them (the shipped per-device fit sets these too).
ALWAYS_WRITTEN = ("matmul", "matmul_fp8", "attention", "gemm_half_dim")
SOFT_L1_SCALE = 0.15  # |log error| beyond which a row counts linearly, not squared (a 16% miss)
IDENTIFIED = 1e-3  # a parameter moved 10% must move some row's prediction by this (log) to be fitted
# Rows per parameter a (stack, device) needs: fewer, and it fits only its most responsive parameters (a cell of
# five rows, three of them MoE runs the model is known to price too fast, would otherwise move attention to
# absorb what the MoE terms miss).
ROWS_PER_PARAM = 4


# A prior value that is a generic default (no measurement on the device, no figure from the stack's profile) is
# itself uncertain by about as much as a stack moves a measured one: its sd is sqrt(2) x sigma (the two add in
# quadrature). Only the fractions of peak; host_dispatch_us and dp_collective already have wide priors.
UNMEASURED_WIDEN = math.sqrt(2)
FRACTIONS = ("matmul", "matmul_fp8", "attention", "memory")


def measured_fields(source: str) -> set[str]:
    """The efficiency fractions a device profile's source string says were measured or taken from a datasheet
    ("measured ..." for all; "matmul: MAMF ...; memory: default (not measured)" field by field)."""
    text = source.strip().lower()
    if text.startswith("measured"):
        return set(FRACTIONS)
    out = set()
    for part in text.split(";"):
        name, _, what = part.partition(":")
        if name.strip() in FRACTIONS and what.strip() and not what.strip().startswith("default"):
            out.add(name.strip())
    return out


def prior(stack: str, device_name: str) -> tuple[dict, dict]:
    """(values, sd of log value) a (stack, device) is shrunk toward: the device profile's own values (the
    catalog must have the per-device fit switched off: catalog.use_device_fit) with the stack profile's figures
    for that device laid over them."""
    from planner.catalog import find_stack

    e = device(device_name).efficiency
    values = {"matmul": e.matmul, "matmul_fp8": e.matmul_fp8 or FP8_OF_BF16 * e.matmul, "attention": e.attention,
              "gemm_half_dim": e.gemm_half_dim, "memory": e.memory,
              "host_dispatch_us": max(e.host_dispatch_us, BOUNDS["host_dispatch_us"][0]),
              "dp_collective": e.dp_collective}
    known = measured_fields(e.source)
    if e.matmul_fp8 is None:
        known.discard("matmul_fp8")
    profile = find_stack(stack)
    given = profile.efficiency_for(device_name) if profile is not None else {}
    values.update({k: v for k, v in given.items() if k in values})
    known |= set(given)
    sd = {k: s * (1 if k in known or k not in FRACTIONS else UNMEASURED_WIDEN) for k, s in PRIOR_SIGMA.items()}
    return values, sd


def prior_values(stack: str, dev: str) -> dict:
    """What a (stack, device) without rows gets: the values it would be shrunk toward."""
    p, _ = prior(stack, dev)
    return {k: p[k] for k in ALWAYS_WRITTEN}


@dataclass
class StackFit:
    stack: str
    values: dict[str, dict]  # device -> Efficiency fields
    moved: list[tuple[str, str]]  # (device or "*" for the stack, field) fitted
    rows: int
    cost: float = 0.0
    log_residuals: dict[str, float] = field(default_factory=dict)  # case key -> log(predicted / measured)


def soft_l1(r: np.ndarray, scale: float = SOFT_L1_SCALE) -> np.ndarray:
    """A residual whose square is the soft-L1 loss of r: r near 0, growing like sqrt(|r|) far out."""
    rho = 2 * scale**2 * (np.sqrt(1 + (r / scale) ** 2) - 1)
    return np.sign(r) * np.sqrt(rho)


def identified(cases: list[Case], slots: list[tuple[str, str]], log_err) -> list[tuple[str, str]]:
    """The slots the rows respond to (a 10% step at the prior moves some row by IDENTIFIED), at most one per
    ROWS_PER_PARAM rows of their device (of the stack, for a stack-level one), the most responsive first."""
    base = log_err(np.zeros(len(slots)), slots)
    moved = []
    for j in range(len(slots)):
        x = np.zeros(len(slots))
        x[j] = 0.1
        moved.append(np.abs(log_err(x, slots) - base))
    rows = {d: [i for i, c in enumerate(cases) if d in ("*", c.device)] for d in {d for d, _ in slots}}
    order = sorted(range(len(slots)), key=lambda j: -float(np.mean(moved[j][rows[slots[j][0]]])))
    taken: dict[str, int] = {}
    use = []
    for j in order:
        d = slots[j][0]
        cap = max(1, len(rows[d]) // ROWS_PER_PARAM)
        if np.max(moved[j]) > IDENTIFIED and taken.get(d, 0) < cap:
            taken[d] = taken.get(d, 0) + 1
            use.append(slots[j])
    return [s for s in slots if s in use]


def fit_stack(cases: list[Case], lam: float, params=PARAMS, max_nfev: int = 40) -> StackFit:
    """The MAP fit of one stack's parameters on its rows (all of one stack)."""
    from scipy.optimize import least_squares

    stack = cases[0].stack
    devices = sorted({c.device for c in cases})
    priors = {d: prior(stack, d)[0] for d in devices}
    sds = {d: prior(stack, d)[1] for d in devices}
    slots = [("*", p) for p in params if p in STACK_LEVEL]
    slots += [(d, p) for d in devices for p in params if p not in STACK_LEVEL
              if p != "matmul_fp8" or any(c.fp8 and c.device == d for c in cases)]

    def effs(x: np.ndarray, use: list[tuple[str, str]]) -> dict[str, dict]:
        out = {d: {k: priors[d][k] for k in ALWAYS_WRITTEN} for d in devices}
        for (d, p), xi in zip(use, x):
            for dev in (devices if d == "*" else [d]):
                out[dev][p] = priors[dev][p] * math.exp(xi)
        return out

    def log_err(x: np.ndarray, use) -> np.ndarray:
        e = effs(x, use)
        return np.array([math.log(c.predict(e[c.device]) / c.measured) for c in cases])

    use = identified(cases, slots, log_err)
    sigma = np.array([PRIOR_SIGMA[p] if d == "*" else sds[d][p] for d, p in use])
    lo = np.array([math.log(BOUNDS[p][0] / priors[devices[0] if d == "*" else d][p]) for d, p in use])
    hi = np.array([math.log(BOUNDS[p][1] / priors[devices[0] if d == "*" else d][p]) for d, p in use])
    lo, hi = np.minimum(lo, -1e-6), np.maximum(hi, 1e-6)  # the prior itself is always allowed

    def resid(x):
        return np.concatenate([soft_l1(log_err(x, use)), math.sqrt(lam) * x / sigma])

    if use:
        sol = least_squares(resid, np.zeros(len(use)), bounds=(lo, hi), diff_step=1e-3, x_scale=sigma,
                            max_nfev=max_nfev, xtol=1e-3, ftol=1e-4)
        x, cost = sol.x, float(2 * sol.cost)
    else:
        x = np.zeros(0)
        cost = float(np.sum(soft_l1(log_err(x, use)) ** 2))
    values = effs(x, use)
    final = log_err(x, use)
    return StackFit(stack=stack, values={d: {k: round(v, 4) for k, v in vals.items()} for d, vals in values.items()},
                    moved=use, rows=len(cases), cost=cost,
                    log_residuals={c.key: float(r) for c, r in zip(cases, final)})


def fit_all(cases: list[Case], lam: float, params=PARAMS, progress: bool = False) -> dict[str, StackFit]:
    """Every stack of `cases` fitted on its own rows (stacks share nothing but lam and the priors)."""
    from tqdm import tqdm

    by_stack: dict[str, list[Case]] = {}
    for c in cases:
        by_stack.setdefault(c.stack, []).append(c)
    return {s: fit_stack(cs, lam, params)
            for s, cs in tqdm(sorted(by_stack.items()), desc="fit per stack", unit="stack",
                              disable=None if progress else True, leave=False)}


def cell_values(fits: dict[str, StackFit]) -> dict[tuple[str, str], dict]:
    """(stack, device) -> Efficiency fields, as the backtest takes them (fit_cases.stack_values)."""
    return {(s, d): v for s, f in fits.items() for d, v in f.values.items()}


def parameter_count(fits: dict[str, StackFit]) -> int:
    return sum(len(f.moved) for f in fits.values())
