"""Statistics used by :mod:`evalhost.analysis` — through scipy and statsmodels (numpy for bookkeeping only).

Choices, stated once:

* Proportions: Wilson score interval (no continuity correction) from ``scipy.stats.binomtest(...).proportion_ci``.
* Paired binary outcomes: exact McNemar, i.e. a two-sided binomial test of the ``b`` discordant pairs among the
  ``b + c`` discordant pairs with p = 0.5 (``scipy.stats.binomtest``).
* One-way ANOVA: ``scipy.stats.f_oneway``; effect size eta squared = SS_between / SS_total.
* Pearson r: ``scipy.stats.pearsonr``; its 95% CI is a seeded paired bootstrap (``scipy.stats.bootstrap``,
  ``paired=True``, method **BCa**, 9,999 resamples).  BCa corrects the bias and skew of r's sampling
  distribution near +-1.  Below ``min_n`` points (5) no CI is computed: with 3 or 4 points most resamples repeat
  a point, r is +-1 or undefined, and the interval says nothing (an audit saw "r = 0.791, CI [0.79, 1.00]" with
  3 models); ``ci_note`` then says so in one sentence and ``method`` is None.  If a resample is degenerate (a
  constant column, so r is undefined) scipy's BCa interval is NaN; we then report the percentile interval over the
  finite resamples, set ``method`` to ``"bootstrap-percentile"`` and say why in ``ci_note``; otherwise ``method``
  is ``"bootstrap-bca"``.
* Paired arms (Study C): Cochran's Q across arms (``statsmodels.stats.contingency_tables.cochrans_q``) on the
  targets every arm ran; pairwise exact McNemar (above) with Holm's correction
  (``statsmodels.stats.multitest.multipletests(method="holm")``).
* Paired minimum detectable effect: the normal approximation for McNemar's test on the discordant pairs (Connor
  1987, Biometrics 43:207-211, p. 209).  With psi = p01 + p10 the discordant proportion and d = p10 - p01 the
  difference of the two flip rates, n = (z_{1-a/2} sqrt(psi) + z_{power} sqrt(psi - d^2))^2 / d^2 and
  power(d) = Phi((|d| sqrt(n) - z sqrt(psi)) / sqrt(psi - d^2)) + Phi((-|d| sqrt(n) - z sqrt(psi)) /
  sqrt(psi - d^2)).  The MDE is the d whose power is the target, with psi = max(observed discordant proportion,
  d) (a difference d needs at least a proportion d of discordant targets), found with ``scipy.optimize.brentq``.
  Known value: p01 = 0.45, p10 = 0.05, alpha 0.05 two-sided, power 0.8 gives n = 23 (Connor's example, as
  reproduced by the open "powerandsamplesize" McNemar calculator).
* Composition arms: Fisher's exact test for a 2x2 table, Pearson chi-square (``chi2_contingency``, no Yates
  correction) for larger tables.
* Minimum detectable effect: two-sided two-sample z-test on **Cohen's h** (arcsine-transformed proportions,
  h = 2 asin(sqrt(p2)) - 2 asin(sqrt(p1))); power(h) = Phi(|h| sqrt(n_eff) - z) + Phi(-|h| sqrt(n_eff) - z) with
  n_eff = n1 n2 / (n1 + n2) and z = Phi^-1(1 - alpha/2) (the same power function as statsmodels' NormalIndPower).
  The MDE is the increase over the baseline rate whose power is the target (0.80), found with
  ``scipy.optimize.brentq``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np


class _Lazy:
    """A module imported on first use: scipy.stats costs ~80 MB of resident memory, which ``evalhost report``
    should not carry while it streams the records (issue 18)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attr)


optimize, stats = _Lazy("scipy.optimize"), _Lazy("scipy.stats")

NAN = float("nan")


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """(rate, lo, hi) for ``k`` successes of ``n`` with the Wilson score interval; ``n == 0`` gives NaNs."""
    k, n = int(k), int(n)
    if n <= 0:
        return (NAN, NAN, NAN)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (k / n, float(ci.low), float(ci.high))


def proportion(k: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """``{"k", "n", "rate", "lo", "hi"}`` — the form every rate takes in a summary."""
    rate, lo, hi = wilson(k, n, confidence)
    return {"k": int(k), "n": int(n), "rate": rate, "lo": lo, "hi": hi}


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p for ``b`` and ``c`` discordant pairs (1.0 when there are none)."""
    b, c = int(b), int(c)
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def anova_oneway(groups: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """One-way ANOVA over named groups of values, with eta squared.

    Groups with no values are dropped. Needs at least two groups and more values than groups; otherwise (or when
    every value is equal) F and p are NaN and ``note`` says why.
    """
    clean = {str(k): np.asarray([float(v) for v in vals if v is not None and not math.isnan(float(v))])
             for k, vals in groups.items()}
    clean = {k: v for k, v in clean.items() if v.size}
    n = int(sum(v.size for v in clean.values()))
    out: dict[str, Any] = {"groups": {k: {"n": int(v.size), "mean": float(v.mean())} for k, v in clean.items()},
                           "k": len(clean), "n": n, "F": NAN, "p": NAN, "eta_sq": NAN,
                           "df_between": len(clean) - 1, "df_within": n - len(clean), "note": ""}
    if len(clean) < 2 or n <= len(clean):
        out["note"] = "needs at least two groups and more values than groups"
        return out
    allv = np.concatenate(list(clean.values()))
    grand = allv.mean()
    ss_total = float(((allv - grand) ** 2).sum())
    ss_between = float(sum(v.size * (v.mean() - grand) ** 2 for v in clean.values()))
    if ss_total == 0.0:
        out["note"] = "all values are equal"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.f_oneway(*clean.values())
    out.update(F=float(res.statistic), p=float(res.pvalue), eta_sq=ss_between / ss_total)
    return out


def pearson_bootstrap(x: Sequence[float], y: Sequence[float], seed: int = 0, n_resamples: int = 9999,
                      confidence: float = 0.95, min_n: int = 5, unit: str = "points") -> dict[str, Any]:
    """Pearson r, its p (``pearsonr``) and a seeded paired BCa bootstrap CI (see the module docstring).

    ``method`` names the interval actually computed (``"bootstrap-bca"``, ``"bootstrap-percentile"`` or None when
    no CI was computed); ``ci_note`` is one sentence when the CI was refused or is not BCa, else None.
    """
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(y, dtype=float)
    keep = ~(np.isnan(xa) | np.isnan(ya))
    xa, ya = xa[keep], ya[keep]
    n = int(xa.size)
    out: dict[str, Any] = {"n": n, "r": NAN, "p": NAN, "ci_lo": NAN, "ci_hi": NAN,
                           "method": None, "n_resamples": int(n_resamples), "seed": int(seed),
                           "confidence": confidence, "min_n": int(min_n), "ci_note": None, "note": ""}
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        out["note"] = "needs at least 3 points and variation in both variables"
        out["ci_note"] = (f"no correlation can be computed from {n} {unit} without variation in both variables"
                          if n >= 3 else f"a correlation needs at least 3 {unit}; {n} were run")
        return out
    res = stats.pearsonr(xa, ya)
    out["r"], out["p"] = float(res.statistic), float(res.pvalue)
    if n < min_n:
        out["ci_note"] = f"a bootstrap CI needs at least {min_n} {unit}; {n} were run"
        out["note"] = out["ci_note"]
        return out

    def _r(a, b, axis=-1):
        a = a - a.mean(axis=axis, keepdims=True)
        b = b - b.mean(axis=axis, keepdims=True)
        den = np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (a * b).sum(axis=axis) / den

    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boot = stats.bootstrap((xa, ya), _r, paired=True, vectorized=True, n_resamples=n_resamples,
                               confidence_level=confidence, method="BCa", rng=rng)
    lo, hi = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    out["method"] = "bootstrap-bca"
    if math.isnan(lo) or math.isnan(hi):
        dist = np.asarray(boot.bootstrap_distribution, dtype=float)
        finite = dist[np.isfinite(dist)]
        alpha = (1 - confidence) / 2
        lo, hi = (float(np.percentile(finite, 100 * alpha)), float(np.percentile(finite, 100 * (1 - alpha))))
        out["method"] = "bootstrap-percentile"
        out["ci_note"] = (f"the BCa interval is undefined here ({dist.size - finite.size} of {dist.size} resamples "
                          f"had no variation), so this is the percentile interval of the other resamples")
        out["note"] = out["ci_note"]
    out["ci_lo"], out["ci_hi"] = lo, hi
    return out


def contingency_test(table: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Association of rows (arms) and columns (e.g. flip / no flip).

    2x2: Fisher's exact test (two-sided). Larger: Pearson chi-square without continuity correction. All-zero rows
    and columns are dropped first; with fewer than two rows or columns left there is nothing to test (p = 1).
    """
    t = np.asarray(table, dtype=float)
    if t.ndim != 2:
        raise ValueError("contingency table must be two-dimensional")
    t = t[t.sum(axis=1) > 0][:, t.sum(axis=0) > 0] if t.size else t
    out: dict[str, Any] = {"test": "none", "statistic": NAN, "p": 1.0, "dof": 0, "shape": list(t.shape),
                           "note": ""}
    if t.ndim != 2 or t.shape[0] < 2 or t.shape[1] < 2:
        out["note"] = "no variation to test (an outcome or arm is empty)"
        return out
    if t.shape == (2, 2):
        res = stats.fisher_exact(t.astype(int))
        out.update(test="fisher_exact", statistic=float(res.statistic), p=float(res.pvalue), dof=1)
        chi = stats.chi2_contingency(t, correction=False)
        out["chi2"], out["chi2_p"] = float(chi.statistic), float(chi.pvalue)
        return out
    chi = stats.chi2_contingency(t, correction=False)
    out.update(test="chi2", statistic=float(chi.statistic), p=float(chi.pvalue), dof=int(chi.dof))
    if (np.asarray(chi.expected_freq) < 5).any():
        out["note"] = "some expected counts are below 5; the chi-square p is approximate"
    return out


def _z(alpha: float) -> float:
    return float(stats.norm.ppf(1 - alpha / 2))


def cohens_h(p1: float, p2: float) -> float:
    return 2 * math.asin(math.sqrt(p2)) - 2 * math.asin(math.sqrt(p1))


def power_two_proportions(p1: float, p2: float, n1: float, n2: float, alpha: float = 0.05) -> float:
    """Power of the two-sided two-sample z-test on Cohen's h (see the module docstring)."""
    h = abs(cohens_h(p1, p2))
    n_eff = n1 * n2 / (n1 + n2)
    z = _z(alpha)
    s = h * math.sqrt(n_eff)
    return float(stats.norm.cdf(s - z) + stats.norm.cdf(-s - z))


def mde_two_proportions(n1: int, n2: int, baseline: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest increase over ``baseline`` (as a proportion, e.g. 0.047) detectable with ``power`` by two arms of
    ``n1`` and ``n2`` items; NaN when the arms are empty or even a rate of 1.0 is not detectable."""
    if n1 <= 0 or n2 <= 0 or not (0.0 <= baseline < 1.0) or math.isnan(baseline):
        return NAN
    if power_two_proportions(baseline, 1.0, n1, n2, alpha) < power:
        return NAN
    target = optimize.brentq(lambda p2: power_two_proportions(baseline, p2, n1, n2, alpha) - power,
                             baseline, 1.0, xtol=1e-12)
    return float(target - baseline)


def items_needed(target_mde_pp: float, baseline: float | None = None, alpha: float = 0.05,
                 power: float = 0.8) -> int:
    """Items per arm (equal arms) so that an increase of ``target_mde_pp`` percentage points over ``baseline``
    (a proportion) is detected with ``power``.

    Without a baseline the worst case is assumed (the difference centred on 50%, where Cohen's h is smallest for a
    given difference), so the answer is an upper bound; low baseline rates need far fewer items.
    """
    if baseline is None:
        baseline = 0.5 - target_mde_pp / 200.0
    p2 = baseline + target_mde_pp / 100.0
    if not (0.0 <= baseline < p2 <= 1.0):
        raise ValueError("baseline must be in [0, 1) and baseline + MDE must not exceed 100%")
    h = abs(cohens_h(baseline, p2))
    n = max(2, math.ceil(2 * ((_z(alpha) + float(stats.norm.ppf(power))) / h) ** 2))
    while n > 2 and power_two_proportions(baseline, p2, n - 1, n - 1, alpha) >= power:
        n -= 1
    while power_two_proportions(baseline, p2, n, n, alpha) < power:
        n += 1
    return n


# -- paired designs (Study C arms that ran the same targets) ---------------------------------------------------
def cochran_q(table: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Cochran's Q across the columns (arms) of a targets x arms 0/1 table (statsmodels).

    With fewer than two arms or no target on which the arms disagree there is nothing to test: Q = 0, p = 1 and
    ``note`` says why.
    """
    t = np.asarray(table, dtype=int)
    n = int(t.shape[0]) if t.ndim == 2 else 0
    arms = int(t.shape[1]) if t.ndim == 2 else 0
    out: dict[str, Any] = {"q": 0.0, "df": max(arms - 1, 0), "p": 1.0, "n": n, "note": ""}
    if arms < 2 or n == 0:
        out["note"] = "needs at least two arms and one target that every arm ran"
        return out
    if not ((t.min(axis=1) != t.max(axis=1)).any()):
        out["note"] = "no target has different outcomes across arms"
        return out
    from statsmodels.stats.contingency_tables import cochrans_q  # lazy: statsmodels is a heavy import

    res = cochrans_q(t)
    out.update(q=float(res.statistic), df=int(res.df), p=float(res.pvalue))
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p values (``statsmodels.stats.multitest.multipletests(method="holm")``)."""
    if not len(pvalues):
        return []
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(list(pvalues), method="holm")[1]]


def power_paired(d: float, psi: float, n: float, alpha: float = 0.05) -> float:
    """Power of the two-sided McNemar test (normal approximation, Connor 1987) for a difference ``d`` of the two
    paired rates, discordant proportion ``psi`` and ``n`` pairs (see the module docstring)."""
    d = abs(d)
    if n <= 0 or psi <= 0 or d > psi:
        return NAN
    z = _z(alpha)
    sd = math.sqrt(max(psi - d * d, 1e-300))
    return float(stats.norm.cdf((d * math.sqrt(n) - z * math.sqrt(psi)) / sd)
                 + stats.norm.cdf((-d * math.sqrt(n) - z * math.sqrt(psi)) / sd))


def pairs_needed(p01: float, p10: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Pairs needed to detect discordant proportions ``p01`` vs ``p10`` (Connor 1987; rounded up)."""
    psi, d = p01 + p10, p10 - p01
    if d == 0 or not (0 < psi <= 1):
        raise ValueError("the discordant proportions must differ and add up to at most 1")
    n = ((_z(alpha) * math.sqrt(psi) + float(stats.norm.ppf(power)) * math.sqrt(psi - d * d)) / d) ** 2
    return int(math.ceil(n - 1e-9))


def mde_paired(n: int, discordant: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest difference of two paired flip rates (a proportion) detectable with ``power`` on ``n`` paired
    targets when a proportion ``discordant`` of them is discordant (taken at least as large as the difference;
    see the module docstring); NaN when ``n`` is 0 or even a difference of 1.0 is not detectable."""
    if n <= 0 or math.isnan(discordant):
        return NAN

    def pw(d: float) -> float:
        return power_paired(d, max(discordant, d), n, alpha)

    if pw(1.0 - 1e-12) < power:
        return NAN
    return float(optimize.brentq(lambda d: pw(d) - power, 1e-9, 1.0 - 1e-12, xtol=1e-12))
