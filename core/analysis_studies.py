"""Study B (cross-model) and Study C (composition arms) statistics for :mod:`evalhost.analysis`.

Every rate is over comparable pairs (see :mod:`evalhost.analysis_pairs`) and counts the flip of ``flip_on``.

Study B is computed **per backend** and never pooled across backends (the standard and the invariant path of one
model are different measurements).  ``study_b(...)["backends"]`` holds one result per backend; the legacy
top-level keys (``models``, ``pooled``, ``anova_alignment``, ``pearson_text_vs_flip``, ...) repeat the FIRST
backend's result (named in ``legacy_backend``) so that older readers keep working.

Study C: arms are *paired* when they ran the same targets, a target being ``(model, backend, task, item_id,
batch_size, repeat)``.  When every arm has at least one comparable target in common with every other arm
(``paired``), Cochran's Q is computed across arms on the targets every arm ran, exact McNemar for each pair of
arms on the targets both ran (Holm-corrected over the pairs), and the paired MDE of each arm against the
reference (Connor's normal approximation, :func:`evalhost.stats.mde_paired`, with the observed discordant
proportion).  The independent-samples tests (Fisher / chi-square, Cohen's h MDE) are always given as well; they
are the analysis for arms that do not share targets.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from typing import Any, Iterable, Mapping, Sequence

from . import stats as st
from .analysis_pairs import RateCounts, pairs_for


# -- Study B: cross-model ---------------------------------------------------------------------------------------
class _ModelCounts:
    __slots__ = ("rates", "safety", "capability")

    def __init__(self) -> None:
        self.rates, self.safety, self.capability = RateCounts(), [0, 0], [0, 0]


class StudyB:
    """Study B's counts, one pair at a time (per backend, per model); :func:`study_b` is this over a list."""

    def __init__(self) -> None:
        self.by: dict[str, dict[str, _ModelCounts]] = defaultdict(lambda: defaultdict(_ModelCounts))

    def add(self, p: Mapping[str, Any]) -> None:
        m = self.by[str(p["backend"])][str(p["model"])]
        m.rates.add(p)
        if p["comparable"]:
            dom = p.get("domain")
            side = m.safety if dom == "safety" else m.capability if dom == "capability" else None
            if side is not None:
                side[0] += bool(p["flip"])
                side[1] += 1

    def result(self, align: Mapping[str, Any], flip_on: str, seed: int = 0, n_resamples: int = 9999
               ) -> dict[str, Any]:
        backends = [_study_b_one(b, self.by[b], align, seed, n_resamples) for b in sorted(self.by)]
        out: dict[str, Any] = {"flip_on": flip_on, "backends": backends,
                               "legacy_backend": backends[0]["backend"] if backends else None}
        if backends:
            out.update({k: v for k, v in backends[0].items() if k != "backend"})
        else:
            out.update(_study_b_one("", {}, align, seed, n_resamples))
            out.pop("backend")
        return out


def alignment_types(records: Iterable[Any]) -> dict[str, Any]:
    """Model -> its first ``alignment_type`` in the records."""
    align: dict[str, Any] = {}
    for r in records:
        if isinstance(r, Mapping) and r.get("alignment_type") is not None:
            align.setdefault(str(r.get("model")), r.get("alignment_type"))
    return align


def _study_b_one(backend: str, by_model: Mapping[str, _ModelCounts], align: Mapping[str, Any], seed: int,
                 n_resamples: int) -> dict[str, Any]:
    models = []
    pooled_s, pooled_c = [0, 0], [0, 0]
    for m in sorted(by_model):
        c = by_model[m]
        r = c.rates.result()
        for pooled, side in ((pooled_s, c.safety), (pooled_c, c.capability)):
            pooled[0] += side[0]
            pooled[1] += side[1]
        models.append({
            "model": m, "backend": backend, "alignment_type": align.get(m), "pairs": r["pairs"],
            "not_comparable": r["not_comparable"],
            "safety": st.proportion(*c.safety), "capability": st.proportion(*c.capability),
            "label_flips": r["label_flips"], "substantive_flips": r["substantive_flips"],
            "text_changes": r["text_changes"],
        })
    s = st.proportion(*pooled_s)
    c = st.proportion(*pooled_c)
    ratio = s["rate"] / c["rate"] if c["rate"] and c["rate"] == c["rate"] else float("nan")
    groups: dict[str, list[float]] = defaultdict(list)
    for row in models:
        if row["alignment_type"] is not None and row["pairs"]:
            groups[str(row["alignment_type"])].append(row["label_flips"]["rate"])
    with_pairs = [r for r in models if r["pairs"]]
    return {
        "backend": backend, "models": models,
        "pooled": {"safety": s, "capability": c, "safety_capability_ratio": ratio},
        "anova_alignment": st.anova_oneway(groups),
        "models_without_alignment_type": [r["model"] for r in models if r["alignment_type"] is None],
        "pearson_text_vs_flip": st.pearson_bootstrap([r["text_changes"]["rate"] for r in with_pairs],
                                                     [r["label_flips"]["rate"] for r in with_pairs],
                                                     seed=seed, n_resamples=n_resamples, unit="models"),
    }


def study_b(records: Sequence[Mapping[str, Any]], seed: int = 0, n_resamples: int = 9999,
            pairs: Sequence[Mapping[str, Any]] | None = None, flip_on: str | None = None) -> dict[str, Any]:
    """Per backend: per-model safety / capability flip rates, the safety/capability ratio over that backend's
    models, a one-way ANOVA of per-model flip rate by alignment type (eta squared), and Pearson r between
    per-model text-change rate and flip rate with a seeded bootstrap CI (none below 5 models; ``method`` and
    ``ci_note`` say what was computed).  See the module docstring for the legacy top-level keys."""
    pairs, mode = pairs_for(records, pairs, flip_on)
    acc = StudyB()
    for p in pairs:
        acc.add(p)
    return acc.result(alignment_types(records), mode, seed, n_resamples)


# -- Study C: composition arms ----------------------------------------------------------------------------------
REFERENCE_ARM_NAMES = ("control", "baseline", "reference", "benign", "homogeneous", "neutral")


def _target(p: Mapping[str, Any]) -> tuple:
    return (p.get("model"), p.get("backend"), p.get("task"), p.get("item_id"), p.get("batch_size"), p.get("repeat"))


class _ArmCounts:
    __slots__ = ("rates", "labels", "targets", "dup_targets")

    def __init__(self) -> None:
        self.rates, self.labels, self.targets, self.dup_targets = RateCounts(), Counter(), {}, 0


class Composition:
    """Study C's counts, one pair at a time (per arm: rates, batch labels of comparable pairs, and each comparable
    target's flip for the paired design); :func:`composition` is this over a list."""

    def __init__(self) -> None:
        self.arms: dict[str, _ArmCounts] = defaultdict(_ArmCounts)

    def add(self, p: Mapping[str, Any]) -> None:
        if p.get("arm") is None:
            return
        a = self.arms[str(p["arm"])]
        a.rates.add(p)
        if p["comparable"]:
            a.labels[str(p["batch_label"])] += 1
            t = _target(p)
            if t in a.targets:
                a.dup_targets += 1
            else:
                a.targets[t] = bool(p["flip"])

    def result(self, flip_on: str, alpha: float = 0.05, power: float = 0.8) -> dict[str, Any]:
        arms = sorted(self.arms)
        if not arms:
            return {"arms": [], "reference": None, "paired": False, "flip_on": flip_on}
        ref = next((a for n in REFERENCE_ARM_NAMES for a in arms if n in a.lower()), arms[0])
        rows = [{"arm": a, **self.arms[a].rates.result()} for a in arms]
        flip_table = [[r["label_flips"]["k"], r["pairs"] - r["label_flips"]["k"]] for r in rows]
        text_table = [[r["text_changes"]["k"], r["pairs"] - r["text_changes"]["k"]] for r in rows]
        labels = sorted(set().union(*(self.arms[a].labels for a in arms)))
        label_table = [[self.arms[a].labels.get(lab, 0) for lab in labels] for a in arms]
        ref_row = next(r for r in rows if r["arm"] == ref)
        base = ref_row["label_flips"]["rate"]
        mdes = []
        for r in rows:
            if r["arm"] == ref:
                continue
            m = st.mde_two_proportions(ref_row["pairs"], r["pairs"], base, alpha, power)
            mdes.append({"arm": r["arm"], "n_reference": ref_row["pairs"], "n_arm": r["pairs"], "baseline": base,
                         "mde_pp": m * 100 if m == m else float("nan")})
        finite = [m["mde_pp"] for m in mdes if m["mde_pp"] == m["mde_pp"]]
        out = {
            "reference": ref, "arms": rows, "flip_on": flip_on,
            "flip_test": st.contingency_test(flip_table),
            "text_test": st.contingency_test(text_table),
            "batch_labels": {"labels": labels, "table": label_table, "test": st.contingency_test(label_table)},
            "mde": mdes, "sensitivity_pp": max(finite) if finite else float("nan"),
            "alpha": alpha, "power": power,
        }
        out.update(self._paired(arms, ref, alpha, power))
        out["design"] = "paired" if out["paired"] else "independent"
        return out

    def _paired(self, arms: Sequence[str], ref: str, alpha: float, power: float) -> dict[str, Any]:
        targets = {a: self.arms[a].targets for a in arms}
        dup_targets = sum(self.arms[a].dup_targets for a in arms)
        shares = {(x, y): set(targets[x]) & set(targets[y]) for x, y in combinations(arms, 2)}
        if len(arms) < 2 or not all(shares.values()):
            return {"paired": False}
        common = set.intersection(*(set(targets[a]) for a in arms))
        order = sorted(common, key=lambda k: tuple(str(x) for x in k))
        q = st.cochran_q([[int(targets[a][k]) for a in arms] for k in order])
        pairwise = []
        for (x, y), ks in shares.items():
            fx = [targets[x][k] for k in ks]
            fy = [targets[y][k] for k in ks]
            x_only = sum(1 for u, v in zip(fx, fy) if u and not v)
            y_only = sum(1 for u, v in zip(fx, fy) if v and not u)
            pairwise.append({"a": x, "b": y, "n": len(ks), "a_only": x_only, "b_only": y_only,
                             "both": sum(1 for u, v in zip(fx, fy) if u and v),
                             "neither": sum(1 for u, v in zip(fx, fy) if not u and not v),
                             "p": st.mcnemar_exact(x_only, y_only)})
        for row, adj in zip(pairwise, st.holm([r["p"] for r in pairwise])):
            row["p_holm"] = adj
        mdes = []
        for a in arms:
            if a == ref:
                continue
            ks = shares.get((ref, a)) or shares.get((a, ref)) or set()
            n = len(ks)
            base = sum(targets[ref][k] for k in ks) / n if n else float("nan")
            disc = sum(targets[ref][k] != targets[a][k] for k in ks) / n if n else float("nan")
            m = st.mde_paired(n, disc, alpha, power)
            mdes.append({"arm": a, "reference": ref, "n": n, "baseline": base, "discordant": disc,
                         "mde_pp": m * 100 if m == m else float("nan")})
        return {"paired": True, "paired_targets": len(common), "duplicate_targets": dup_targets,
                "cochran_q": q, "pairwise": pairwise, "mde_paired": mdes,
                "mde_paired_method": "McNemar normal approximation (Connor 1987) with the observed discordant "
                                     "proportion, at least the difference"}


def composition(records: Sequence[Mapping[str, Any]], alpha: float = 0.05, power: float = 0.8,
                pairs: Sequence[Mapping[str, Any]] | None = None, flip_on: str | None = None) -> dict[str, Any]:
    """Per-arm flip and text-change rates (comparable pairs), an association test across arms (Fisher 2x2 /
    chi-square), a test of the batch label distribution across arms, and the minimum detectable effect (percentage
    points, power 0.8, two-sided alpha 0.05, Cohen's h) of each arm against the reference arm; when the arms ran
    the same targets also the paired analysis (see the module docstring).

    The reference arm is the first arm whose name contains one of ``REFERENCE_ARM_NAMES`` (in that order of
    preference), else the first by name.
    """
    allp, mode = pairs_for(records, pairs, flip_on)
    acc = Composition()
    for p in allp:
        acc.add(p)
    return acc.result(mode, alpha, power)
