"""Scaling fits (METHODS.md, "Scaling fits"): per recipe and metric, the error E at budgets C (samples seen)
fitted by the saturating power law E = a (C + b)^-c + d, or, with fewer than MIN_SATURATING distinct budgets,
by a line in log-log space (E = a C^-c) through the per-budget best; 95% intervals by bootstrap; where two
recipes' curves cross, and in what share of the bootstrap fits they do.

Bootstrap: when every budget has several seeds, the seeds are resampled within each budget (the noise the
fit must respect is the seeds'); otherwise the fit's residuals are resampled onto its curve.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

MIN_SATURATING = 5  # distinct budgets below which the 4-parameter law is not identified: a log-log line


def saturating(c, a, b, k, d):
    return a * (c + b) ** (-k) + d


@dataclass
class Fit:
    kind: str  # "saturating" (a, b, c, d) or "loglog" (a, c)
    params: dict[str, float]
    boot: np.ndarray  # [B, P] the bootstrap fits' parameters, in params' order

    @property
    def intervals(self) -> dict[str, tuple[float, float]]:
        lo, hi = np.nanpercentile(self.boot, [2.5, 97.5], axis=0)
        return {k: (float(a), float(b)) for k, a, b in zip(self.params, lo, hi)}

    def predict(self, c, params=None) -> np.ndarray:
        p = list(self.params.values()) if params is None else list(params)
        c = np.asarray(c, dtype=float)
        if self.kind == "saturating":
            return saturating(c, *p)
        return p[0] * c ** (-p[1])

    def band(self, lo: float, hi: float, n: int = 60):
        """(budgets on a log grid, the fit, 2.5% and 97.5% of the bootstrap curves) between lo and hi."""
        xs = np.geomspace(lo, hi, n)
        curves = np.stack([self.predict(xs, p) for p in self.boot if np.all(np.isfinite(p))])
        return xs, self.predict(xs), np.percentile(curves, 2.5, axis=0), np.percentile(curves, 97.5, axis=0)


def _fit_saturating(c: np.ndarray, e: np.ndarray, start=None) -> list[float]:
    scale = c.min()  # fit on C / min(C): well-conditioned whatever the unit of the budget
    x = c / scale
    best, best_sse = None, np.inf
    starts = [start] if start is not None else \
        [[max(e.max() - 0.5 * e.min(), 1e-6), 0.0, k, 0.5 * e.min()] for k in (0.3, 0.7, 1.5)]
    for p0 in starts:
        if start is not None:  # given in the original unit
            p0 = [p0[0] * scale ** (-p0[2]), p0[1] / scale, p0[2], p0[3]]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                p, _ = curve_fit(saturating, x, e, p0=p0, bounds=([0, 0, 0, 0], [np.inf, x.max(), 5, e.max()]),
                                 maxfev=5000)
        except RuntimeError:  # no convergence from this start
            continue
        sse = float(np.sum((saturating(x, *p) - e) ** 2))
        if sse < best_sse:
            best, best_sse = p, sse
    if best is None:
        return [np.nan] * 4
    a, b, k, d = best
    return [a * scale ** k, b * scale, k, d]


def _fit_loglog(c: np.ndarray, e: np.ndarray) -> list[float]:
    """The per-budget best (lowest error), then log E = log a - c log C by least squares."""
    budgets = np.unique(c)
    best = np.array([e[c == b].min() for b in budgets])
    slope, intercept = np.polyfit(np.log(budgets), np.log(best), 1)
    return [float(np.exp(intercept)), float(-slope)]


def fit(c, e, n_boot: int = 200, seed: int = 0, kind: str | None = None) -> Fit:
    """Fit errors `e` (> 0) at budgets `c`; `kind` None chooses by the number of distinct budgets."""
    c, e = np.asarray(c, dtype=float), np.asarray(e, dtype=float)
    budgets = np.unique(c)
    if len(budgets) < 2:
        raise ValueError("a scaling fit needs at least two budgets")
    kind = kind or ("saturating" if len(budgets) >= MIN_SATURATING else "loglog")
    names = ["a", "b", "c", "d"] if kind == "saturating" else ["a", "c"]
    point = _fit_saturating(c, e) if kind == "saturating" else _fit_loglog(c, e)
    result = Fit(kind, dict(zip(names, map(float, point))), np.empty((0, len(names))))
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(c == b) for b in budgets]
    by_seed = all(len(g) > 1 for g in groups)
    residuals = e - result.predict(c)
    boot = []
    for _ in range(n_boot):
        if by_seed:
            idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
            cb, eb = c[idx], e[idx]
        else:
            cb, eb = c, np.clip(result.predict(c) + rng.choice(residuals, len(e)), 1e-12, None)
        boot.append(_fit_saturating(cb, eb, point) if kind == "saturating" else _fit_loglog(cb, eb))
    result.boot = np.array(boot, dtype=float)
    return result


@dataclass
class Crossing:
    at: float | None  # the budget where the fitted curves cross (the first sign change), None: no crossing
    share: float  # the share of bootstrap pairs whose curves cross between lo and hi
    interval: tuple[float, float] | None  # 2.5%-97.5% of the crossing budget among the bootstrap pairs that cross


def _first_cross(xs: np.ndarray, diff: np.ndarray) -> float | None:
    sign = np.sign(diff)
    change = np.flatnonzero(sign[:-1] * sign[1:] < 0)
    if not len(change):
        return None
    i = change[0]  # interpolate in log budget
    t = diff[i] / (diff[i] - diff[i + 1])
    return float(np.exp(np.log(xs[i]) + t * (np.log(xs[i + 1]) - np.log(xs[i]))))


def crossing(fa: Fit, fb: Fit, lo: float, hi: float, n: int = 200) -> Crossing:
    xs = np.geomspace(lo, hi, n)
    at = _first_cross(xs, fa.predict(xs) - fb.predict(xs))
    pairs = min(len(fa.boot), len(fb.boot))
    found = [_first_cross(xs, fa.predict(xs, fa.boot[i]) - fb.predict(xs, fb.boot[i])) for i in range(pairs)]
    crossed = [x for x in found if x is not None]
    interval = tuple(map(float, np.percentile(crossed, [2.5, 97.5]))) if crossed else None
    return Crossing(at, len(crossed) / pairs if pairs else 0.0, interval)


def describe(name_a: str, name_b: str, cross: Crossing, lo: float, hi: float, unit: str = "samples seen") -> str:
    fmt = (lambda x: f"{x:,.0f}") if unit == "samples seen" else (lambda x: f"{x:.3g}")
    word = "samples" if unit == "samples seen" else "FLOPs"
    span = f"between {fmt(lo)} and {fmt(hi)} {word}"
    if cross.at is None:
        return (f"{name_a} and {name_b} do not cross {span} "
                f"({100 * (1 - cross.share):.0f}% of bootstrap fits agree)")
    where = f" (95% interval {fmt(cross.interval[0])}-{fmt(cross.interval[1])})" if cross.interval else ""
    return (f"{name_a} and {name_b} cross at about {fmt(cross.at)} {word}{where}; "
            f"{100 * cross.share:.0f}% of bootstrap fits cross {span}")
