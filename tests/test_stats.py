"""evalhost.stats against known values and independent hand computations (no scipy in the expectations where a
closed form exists)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from evalhost import stats as st


def _pct(x: float) -> float:
    return round(100 * x, 1)


@pytest.mark.parametrize("k,n,expected", [(22, 55, (40.0, 28.1, 53.2)), (25, 55, (45.5, 33.0, 58.5)),
                                          (0, 55, (0.0, 0.0, 6.5))])
def test_wilson_reproduces_addendum_values(k, n, expected):
    assert tuple(_pct(v) for v in st.wilson(k, n)) == expected


def test_wilson_matches_closed_form():
    z = 1.959963984540054
    for k, n in [(3, 17), (50, 50), (1, 1000)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        rate, lo, hi = st.wilson(k, n)
        assert rate == pytest.approx(p)
        assert lo == pytest.approx(max(0.0, centre - half), abs=1e-9)
        assert hi == pytest.approx(min(1.0, centre + half), abs=1e-9)


def test_wilson_empty_is_nan():
    assert all(math.isnan(v) for v in st.wilson(0, 0))
    assert st.proportion(0, 0)["n"] == 0


def test_mcnemar_reproduces_addendum_values():
    assert st.mcnemar_exact(22, 0) == pytest.approx(4.77e-07, rel=1e-3)
    assert st.mcnemar_exact(25, 0) == pytest.approx(5.96e-08, rel=1e-3)
    assert f"{st.mcnemar_exact(22, 0):.3g}" == "4.77e-07"


def test_mcnemar_matches_binomial_sum_and_is_symmetric():
    for b, c in [(7, 2), (10, 10), (1, 12)]:
        n = b + c
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
        assert st.mcnemar_exact(b, c) == pytest.approx(min(1.0, 2 * tail))
        assert st.mcnemar_exact(b, c) == st.mcnemar_exact(c, b)
    assert st.mcnemar_exact(0, 0) == 1.0


def test_anova_matches_explicit_formulas():
    groups = {"a": [0.1, 0.2, 0.15, 0.3], "b": [0.5, 0.4, 0.45], "c": [0.2, 0.25, 0.1, 0.05, 0.3]}
    vals = [np.array(v) for v in groups.values()]
    allv = np.concatenate(vals)
    ssb = sum(len(v) * (v.mean() - allv.mean()) ** 2 for v in vals)
    ssw = sum(((v - v.mean()) ** 2).sum() for v in vals)
    k, n = len(vals), len(allv)
    f = (ssb / (k - 1)) / (ssw / (n - k))
    res = st.anova_oneway(groups)
    assert res["F"] == pytest.approx(f)
    assert res["eta_sq"] == pytest.approx(ssb / (ssb + ssw))
    assert (res["df_between"], res["df_within"]) == (2, 9)
    from scipy.stats import f as fdist

    assert res["p"] == pytest.approx(fdist.sf(f, k - 1, n - k))


def test_anova_degenerate_inputs_give_nan_with_a_note():
    res = st.anova_oneway({"a": [0.1, 0.2]})
    assert math.isnan(res["F"]) and res["note"]
    res = st.anova_oneway({"a": [0.0, 0.0], "b": [0.0]})
    assert math.isnan(res["F"]) and res["note"] == "all values are equal"


def test_pearson_bootstrap_is_seeded_and_brackets_r():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, 15)
    y = 0.8 * x + rng.normal(0, 0.1, 15)
    res = st.pearson_bootstrap(x, y, seed=7, n_resamples=2000)
    assert res["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert res["ci_lo"] < res["r"] < res["ci_hi"] <= 1.0
    assert res["method"] == "bootstrap-bca" and res["ci_note"] is None
    again = st.pearson_bootstrap(x, y, seed=7, n_resamples=2000)
    assert (again["ci_lo"], again["ci_hi"]) == (res["ci_lo"], res["ci_hi"])
    other = st.pearson_bootstrap(x, y, seed=8, n_resamples=2000)
    assert (other["ci_lo"], other["ci_hi"]) != (res["ci_lo"], res["ci_hi"])


def test_pearson_with_ties_falls_back_to_percentile_and_says_so():
    x = [0] * 10 + [1, 2, 3, 4, 5]
    y = [0] * 9 + [1, 1, 2, 2, 4, 5]
    res = st.pearson_bootstrap(x, y, seed=1, n_resamples=2000)
    assert not math.isnan(res["ci_lo"]) and res["ci_lo"] <= res["r"] <= res["ci_hi"]
    assert res["method"] == "bootstrap-percentile"
    assert "BCa interval is undefined" in res["ci_note"]


def test_fisher_2x2_matches_hypergeometric_sum():
    table = [[3, 17], [9, 11]]
    (a, b), (c, d) = table
    r1, c1, n = a + b, a + c, a + b + c + d

    def prob(x):
        return math.comb(c1, x) * math.comb(n - c1, r1 - x) / math.comb(n, r1)

    p_obs = prob(a)
    expected = sum(prob(x) for x in range(max(0, r1 + c1 - n), min(r1, c1) + 1) if prob(x) <= p_obs * (1 + 1e-7))
    res = st.contingency_test(table)
    assert res["test"] == "fisher_exact"
    assert res["p"] == pytest.approx(expected)


def test_chi_square_3x2_matches_explicit_formula():
    t = np.array([[5, 95], [12, 88], [8, 92]], dtype=float)
    exp = t.sum(1, keepdims=True) * t.sum(0, keepdims=True) / t.sum()
    chi = ((t - exp) ** 2 / exp).sum()
    res = st.contingency_test(t.tolist())
    assert res["test"] == "chi2" and res["dof"] == 2
    assert res["statistic"] == pytest.approx(chi)
    assert res["p"] == pytest.approx(math.exp(-chi / 2))  # chi-square with 2 df: sf(x) = exp(-x/2)


def test_contingency_without_variation():
    assert st.contingency_test([[0, 10], [0, 12]])["test"] == "none"


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _power(p1, p2, n1, n2):
    z = 1.959963984540054
    h = abs(2 * math.asin(math.sqrt(p2)) - 2 * math.asin(math.sqrt(p1)))
    s = h * math.sqrt(n1 * n2 / (n1 + n2))
    return _phi(s - z) + _phi(-s - z)


@pytest.mark.parametrize("n1,n2,base", [(500, 500, 0.02), (300, 900, 0.0), (55, 55, 0.1), (1500, 1500, 0.005)])
def test_mde_matches_cohens_h_closed_form_and_has_power_080(n1, n2, base):
    mde = st.mde_two_proportions(n1, n2, base)
    z_a, z_b = 1.959963984540054, 0.8416212335729143
    h = (z_a + z_b) / math.sqrt(n1 * n2 / (n1 + n2))
    p2 = math.sin(math.asin(math.sqrt(base)) + h / 2) ** 2
    assert mde == pytest.approx(p2 - base, abs=2e-5)  # closed form ignores the far tail (~1e-6 of power)
    assert _power(base, base + mde, n1, n2) == pytest.approx(0.80, abs=0.001)


def test_mde_undetectable_is_nan():
    assert math.isnan(st.mde_two_proportions(2, 2, 0.5))
    assert math.isnan(st.mde_two_proportions(0, 10, 0.1))


@pytest.mark.parametrize("mde_pp,base", [(4.7, 0.02), (10.0, 0.4), (1.0, 0.005)])
def test_items_needed_is_the_smallest_n_with_power_080(mde_pp, base):
    n = st.items_needed(mde_pp, base)
    p2 = base + mde_pp / 100
    assert _power(base, p2, n, n) >= 0.80
    assert _power(base, p2, n - 1, n - 1) < 0.80


def test_items_needed_without_baseline_is_the_worst_case():
    worst = st.items_needed(4.7)
    assert worst >= max(st.items_needed(4.7, b / 100) for b in range(0, 95, 5))
    assert _power(0.5 - 0.0235, 0.5 + 0.0235, worst, worst) >= 0.80


def test_items_needed_rejects_impossible_targets():
    with pytest.raises(ValueError):
        st.items_needed(60.0, 0.5)


# -- issue 17: CI refused below 5 points; paired designs (Cochran's Q, Holm, McNemar power) ----------------------
def test_pearson_refuses_a_bootstrap_ci_below_five_points_with_one_sentence():
    res = st.pearson_bootstrap([0.1, 0.3, 0.2], [0.2, 0.5, 0.1], seed=1, n_resamples=500, unit="models")
    assert res["r"] == pytest.approx(np.corrcoef([0.1, 0.3, 0.2], [0.2, 0.5, 0.1])[0, 1])
    assert math.isnan(res["ci_lo"]) and math.isnan(res["ci_hi"]) and res["method"] is None
    assert res["ci_note"] == "a bootstrap CI needs at least 5 models; 3 were run"
    five = st.pearson_bootstrap([0.1, 0.3, 0.2, 0.5, 0.4], [0.2, 0.5, 0.1, 0.6, 0.3], seed=1, n_resamples=500)
    assert five["method"] in ("bootstrap-bca", "bootstrap-percentile") and not math.isnan(five["ci_lo"])


def test_cochran_q_reproduces_the_published_drug_example():
    """Agresti (2002) three-drug data, as in SAS/STAT PROC FREQ's "Cochran's Q Test" example: Q = 8.4706, 2 df,
    p = 0.0145."""
    counts = {"FFF": 6, "UFF": 2, "FFU": 16, "UFU": 4, "FUF": 2, "UUF": 6, "FUU": 4, "UUU": 6}
    table = [[int(c == "F") for c in k] for k, n in counts.items() for _ in range(n)]
    res = st.cochran_q(table)
    assert (round(res["q"], 4), res["df"], round(res["p"], 4), res["n"]) == (8.4706, 2, 0.0145, 46)
    assert st.cochran_q([[1, 1, 1], [0, 0, 0]])["p"] == 1.0  # no discordant target: nothing to test


def test_holm_matches_the_step_down_by_hand():
    assert st.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert st.holm([]) == []


def test_pairs_needed_reproduces_connors_example():
    """Connor (1987) p. 209: p01 = 0.45, p10 = 0.05, alpha 0.05 two-sided, power 0.8 -> 23 pairs."""
    assert st.pairs_needed(0.45, 0.05) == 23
    psi, d = 0.5, 0.4
    n = ((1.959963984540054 * math.sqrt(psi) + 0.8416212335729143 * math.sqrt(psi - d * d)) / d) ** 2
    assert st.power_paired(d, psi, n) == pytest.approx(0.80, abs=1e-3)


@pytest.mark.parametrize("n,disc", [(46, 12 / 46), (200, 0.05), (200, 0.0), (55, 22 / 55)])
def test_mde_paired_has_power_080_under_connors_formula(n, disc):
    d = st.mde_paired(n, disc)
    psi = max(disc, d)
    z_a, z_b = 1.959963984540054, 0.8416212335729143
    n_needed = ((z_a * math.sqrt(psi) + z_b * math.sqrt(psi - d * d)) / d) ** 2
    assert n_needed == pytest.approx(n, rel=2e-3)  # the far tail adds ~nothing to the power
    assert math.isnan(st.mde_paired(0, 0.1))
