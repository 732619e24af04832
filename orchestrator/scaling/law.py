"""Scaling-law fits: the loss a run reaches as a function of its compute, or of its size and data.

Two forms, both fitted in log space with a robust (Huber) loss from several starting points, as
Hoffmann et al. (2022, "Chinchilla", approach 3) do:

* ``L(C) = a * C**b + c`` (:class:`ComputeLaw`): the final losses of runs along one line of the
  size/data plane (the sweep keeps the target's tokens per parameter), ``c`` the irreducible loss.
* ``L(N, D) = E + A / N**alpha + B / D**beta`` (:class:`SizeDataLaw`): any points whose sizes and
  token counts vary independently (a sweep's intermediate evaluations give several ``D`` per ``N``).

:func:`bootstrap_fits` refits on runs drawn with replacement; :func:`interval` of their predictions
is the prediction's interval.
Degenerate input (too few runs, losses that do not fall with compute, a diverged run) raises
:class:`~orchestrator.errors.ConfigError` saying what to change.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.errors import ConfigError

# Huber's threshold on log-loss residuals (Chinchilla's 1e-3): residuals beyond it count linearly,
# so one odd run cannot drag the curve.
HUBER_DELTA = 1e-3
# Losses at or above this many nats per token did not learn (a byte model's uniform guess is ln 256).
DIVERGED_ABOVE = math.log(256)
# With fewer runs, too few draws of runs with replacement hold the 4 distinct ones a fit needs.
BOOTSTRAP_MIN_RUNS = 6
# A law that misses the sweep's own largest run, a few times past the others in compute, by more
# than the prediction's goal cannot meet that goal a hundred times further out, where the target is.
# Lower would flag noise: a law fitted to five runs with 0.3% noise can miss the sixth by 1.4%.
BACKTEST_TOLERANCE = 0.02


@dataclass(frozen=True)
class Point:
    """One measured loss: the run it came from, its size ``params`` (N), ``tokens`` trained (D) and
    ``compute`` (FLOPs)."""

    run: str
    params: float
    tokens: float
    compute: float
    loss: float


@dataclass(frozen=True)
class ComputeLaw:
    """``L(C) = a * C**b + c``."""

    a: float
    b: float
    c: float

    def __call__(self, compute: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.power(compute, self.b) + self.c

    def as_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "c": self.c}


@dataclass(frozen=True)
class SizeDataLaw:
    """``L(N, D) = E + A / N**alpha + B / D**beta``."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def __call__(self, params: float | np.ndarray, tokens: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

    def as_dict(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "B": self.B, "beta": self.beta}


@dataclass(frozen=True)
class Backtest:
    """``L(C)`` fitted without the sweep's largest run, checked against that run."""

    run: str
    compute: float
    predicted: float
    actual: float

    @property
    def relative_error(self) -> float:
        return (self.predicted - self.actual) / self.actual

    @property
    def passed(self) -> bool:
        return abs(self.relative_error) <= BACKTEST_TOLERANCE

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "relative_error": self.relative_error, "tolerance": BACKTEST_TOLERANCE,
                "passed": self.passed}


def check_points(points: Sequence[Point], minimum: int) -> None:
    """Refuse input no law can be fitted to, naming the run or what to change."""
    for p in points:
        if not math.isfinite(p.loss) or p.loss >= DIVERGED_ABOVE:
            raise ConfigError(
                f"run {p.run} diverged (held-out loss {p.loss:g} at {p.tokens:.3g} tokens, a uniform guess is "
                f"{DIVERGED_ABOVE:.3f}): re-run it with a lower train.lr, or leave it out with --exclude {p.run}"
            )
        if p.compute <= 0 or p.params <= 0 or p.tokens <= 0:
            raise ConfigError(f"run {p.run}: compute, params and tokens must be positive (got {p})")
    distinct = len({p.compute for p in points})
    if distinct < minimum:
        raise ConfigError(
            f"{distinct} distinct compute value(s) in the sweep; a fit of a*C^b+c needs at least {minimum}: "
            f"finish more runs (orchestrator scaling run PLAN) or plan more (--runs)"
        )
    by_compute = sorted(points, key=lambda p: p.compute)
    losses = np.array([p.loss for p in by_compute])
    low, high = losses[: max(1, len(losses) // 3)].mean(), losses[-max(1, len(losses) // 3):].mean()
    if high >= low * (1 - 0.01):
        raise ConfigError(
            f"the sweep's losses do not fall with compute (mean {low:.4f} for the smallest third, {high:.4f} for the "
            f"largest): its runs are too small or too short to learn; plan a larger sweep (--sweep-compute-fraction) "
            f"or more steps"
        )


def fit_compute_law(points: Sequence[Point], start: ComputeLaw | None = None) -> ComputeLaw:
    """Fit ``L(C) = a * C**b + c`` to ``points`` (final losses, one per run): from a grid of starting
    points, or from ``start`` alone (a bootstrap refit starts from the full fit)."""
    from scipy.special import expit

    check_points(points, minimum=4)
    compute = np.array([p.compute for p in points], dtype=float)
    loss = np.array([p.loss for p in points], dtype=float)
    scale = compute.max()  # fit in units of the largest run's compute: a stays near the loss scale
    x = compute / scale
    floor = loss.min()

    # a = exp(u) > 0, b = -exp(v) < 0, 0 < c = floor * sigmoid(w) < every observed loss.
    def unpack(theta: np.ndarray) -> tuple[float, float, float]:
        u, v, w = theta
        return float(np.exp(u)), -float(np.exp(v)), floor * float(expit(w))

    def residuals(theta: np.ndarray) -> np.ndarray:
        a, b, c = unpack(theta)
        return np.log(a * np.power(x, b) + c) - np.log(loss)

    if start is not None:
        ratio = min(max(start.c / floor, 1e-6), 1 - 1e-6)
        starts = [(math.log(start.a * scale**start.b), math.log(-start.b), math.log(ratio / (1 - ratio)))]
    else:
        starts = list(itertools.product(
            (math.log(max(loss.max() - floor, 1e-3)), 0.0),  # a
            (math.log(0.05), math.log(0.15), math.log(0.4)),  # -b
            (-3.0, 0.0, 2.0, 4.0),  # c: 5%, 50%, 88%, 98% of the lowest loss
        ))
    theta = _best_fit(residuals, [np.array(s) for s in starts])
    a, b, c = unpack(theta)
    return ComputeLaw(a=a / scale**b, b=b, c=c)


def fit_size_data_law(points: Sequence[Point], start: SizeDataLaw | None = None) -> SizeDataLaw:
    """Fit ``L(N, D) = E + A/N**alpha + B/D**beta``; ``points`` must vary N and D independently.
    From a grid of starting points, or from ``start`` alone."""
    check_points(points, minimum=5)
    sizes = {p.params for p in points}
    if len(sizes) < 2 or all(len({p.tokens for p in points if p.params == n}) < 2 for n in sizes):
        raise ConfigError("L(N, D) needs several sizes, each measured at several token counts "
                          "(evaluation.interval_steps > 0 in the sweep)")
    n = np.array([p.params for p in points], dtype=float)
    d = np.array([p.tokens for p in points], dtype=float)
    loss = np.array([p.loss for p in points], dtype=float)
    n_scale, d_scale = n.max(), d.max()
    x, y = n / n_scale, d / d_scale

    def unpack(theta: np.ndarray) -> tuple[float, float, float, float, float]:
        e, a, alpha, b, beta = np.exp(theta)
        return float(e), float(a), float(alpha), float(b), float(beta)

    def residuals(theta: np.ndarray) -> np.ndarray:
        E, A, alpha, B, beta = unpack(theta)
        return np.log(E + A / np.power(x, alpha) + B / np.power(y, beta)) - np.log(loss)

    low = math.log(loss.min())
    if start is not None:
        starts = [(math.log(start.E), math.log(start.A / n_scale**start.alpha), math.log(start.alpha),
                   math.log(start.B / d_scale**start.beta), math.log(start.beta))]
    else:
        starts = list(itertools.product(
            (low + math.log(0.5), low + math.log(0.9)),  # E
            (low + math.log(0.1), low + math.log(0.5)),  # A
            (math.log(0.15), math.log(0.5)),  # alpha
            (low + math.log(0.1), low + math.log(0.5)),  # B
            (math.log(0.15), math.log(0.5)),  # beta
        ))
    theta = _best_fit(residuals, [np.array(s) for s in starts])
    E, A, alpha, B, beta = unpack(theta)
    return SizeDataLaw(E=E, A=A * n_scale**alpha, alpha=alpha, B=B * d_scale**beta, beta=beta)


def backtest_compute_law(finals: Sequence[Point]) -> Backtest:
    """How well the sweep's trend extrapolates: ``L(C)`` fitted to every final loss but the largest
    run's, then asked for that run. A sweep whose losses still bend (small models in a regime the
    target has left) misses here first, before the target's compute is spent."""
    ordered = sorted(finals, key=lambda p: p.compute)
    largest = ordered[-1]
    fitted = fit_compute_law(ordered[:-1])
    return Backtest(run=largest.run, compute=largest.compute, predicted=float(fitted(largest.compute)),
                    actual=largest.loss)


def bootstrap_fits(
    points: Sequence[Point], fit: Callable[[Sequence[Point]], Any], *, samples: int = 200, seed: int = 0,
) -> list[Any]:
    """``fit`` applied to ``samples`` draws of runs with replacement: runs, not points, are drawn (a
    run's intermediate evaluations go together); a draw that cannot be fitted is skipped. Warm-start
    ``fit`` from the full fit (``functools.partial(fit_compute_law, start=full)``): one start each."""
    rng = np.random.default_rng(seed)
    runs = sorted({p.run for p in points})
    if len(runs) < BOOTSTRAP_MIN_RUNS:
        raise ConfigError(f"{len(runs)} runs: an interval needs at least {BOOTSTRAP_MIN_RUNS} (a draw of fewer runs "
                          f"repeats some and cannot be fitted); plan more (--runs) or leave fewer out (--exclude)")
    by_run = {r: [p for p in points if p.run == r] for r in runs}
    fits = []
    for _ in range(samples):
        drawn = rng.choice(len(runs), size=len(runs), replace=True)
        try:
            fits.append(fit([p for i in drawn for p in by_run[runs[i]]]))
        except (ConfigError, ArithmeticError, ValueError):
            continue
    if len(fits) < samples // 2:
        raise ConfigError(f"only {len(fits)} of {samples} bootstrap draws could be fitted: the sweep has too few "
                          f"distinct runs for an interval; plan more (--runs)")
    return fits


def interval(values: Sequence[float], level: float) -> tuple[float, float]:
    """The central ``level`` interval of ``values``."""
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def _best_fit(residuals: Callable[[np.ndarray], np.ndarray], starts: list[np.ndarray]) -> np.ndarray:
    """The lowest-cost robust least-squares solution over ``starts``."""
    from scipy.optimize import least_squares

    best = None
    for start in starts:
        try:
            result = least_squares(residuals, start, loss="huber", f_scale=HUBER_DELTA, method="trf", max_nfev=2000)
        except (ValueError, ArithmeticError):
            continue
        if np.all(np.isfinite(result.fun)) and (best is None or result.cost < best.cost):
            best = result
    if best is None:
        raise ConfigError("no starting point gave a finite fit: check the sweep's losses (orchestrator scaling fit)")
    return best.x
