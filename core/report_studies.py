"""Study B (cross-model, one block per backend: rates of different backends are never pooled) and Study C
(composition arms; paired tests when the arms ran the same targets)."""
from __future__ import annotations

from typing import Any, Mapping

from .report_format import _nan, num, pct, pval, rate_ci, table
from .report_headline import flip_words, rate_header


METHODS = {"bootstrap-bca": "BCa bootstrap", "bootstrap-percentile": "percentile bootstrap", "BCa": "BCa bootstrap"}


def study_b_backends(b: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The per-backend blocks; a summary from before the split is one block over every backend."""
    if "backends" in b:
        return list(b["backends"])
    return [{"backend": "all backends (pooled)", **b}]


def _pearson_line(pr: Mapping[str, Any]) -> str:
    head = f"- Pearson r between per-model text-change rate and flip rate ({pr['n']} models): "
    if _nan(pr.get("r")):
        return head + f"not computed ({pr.get('note')})."
    s = head + f"r = {num(pr['r'])}, p = {pval(pr['p'])}"
    method = pr.get("method")
    if method and not _nan(pr.get("ci_lo")):
        s += (f"; 95% CI [{num(pr['ci_lo'], '.2f')}, {num(pr['ci_hi'], '.2f')}] (interval method: "
              f"{METHODS.get(method, method)}, {pr.get('n_resamples')} paired resamples, seed {pr.get('seed')})")
    else:
        s += "; no confidence interval (interval method: none)"
    s += "."
    note = str(pr.get("ci_note") or "").strip()
    if note:
        s += f" {note[0].upper()}{note[1:]}" + ("" if note.endswith(".") else ".")
    return s


def _study_b_block(blk: Mapping[str, Any], plot: str | None, noun: str = "Label flips") -> list[str]:
    pooled, an_, pr = blk["pooled"], blk["anova_alignment"], blk["pearson_text_vs_flip"]
    rows = [[m["model"], m["alignment_type"], m["pairs"], m["safety"]["k"], rate_ci(m["safety"]),
             m["capability"]["k"], rate_ci(m["capability"]), rate_ci(m["label_flips"]), rate_ci(m["text_changes"])]
            for m in blk["models"]]
    out = [f"### Backend {blk['backend']}", "",
           table(["Model", "Alignment", "Comparable pairs", "Safety flips", "Safety rate", "Capability flips",
                  "Capability rate", rate_header(noun), "Text-change rate"], rows), "",
           f"- Safety flip rate over this backend's models {rate_ci(pooled['safety'])} vs capability "
           f"{rate_ci(pooled['capability'])}: safety/capability ratio "
           + (f"{num(pooled['safety_capability_ratio'], '.2f')}x." if not _nan(pooled["safety_capability_ratio"])
              else "undefined (no capability flips or no capability pairs)."),
           f"- One-way ANOVA of per-model flip rate by alignment type ({an_['k']} groups, {an_['n']} models): "
           + (f"F({an_['df_between']}, {an_['df_within']}) = {num(an_['F'])}, p = {pval(an_['p'])}, "
              f"eta² = {num(an_['eta_sq'])}." if not _nan(an_["F"]) else f"not computed ({an_['note']})."),
           _pearson_line(pr)]
    missing = blk.get("models_without_alignment_type")
    if missing:
        out.append(f"- Models without an alignment type (left out of the ANOVA): {', '.join(missing)}.")
    if plot:
        out += ["", f"![Output instability vs label flips, {blk['backend']}]({plot})"]
    return out


def study_b(b: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    blocks = study_b_backends(b)
    out = ["## Study B: cross-model", "",
           "Per backend: a model's rates under different backends are different measurements and are never "
           "averaged together."]
    for i, blk in enumerate(blocks):
        out += [""] + _study_b_block(blk, plots.get(f"study_b_{i}"), flip_words(b.get("flip_on") or "label")[0])
    return "\n".join(out)


def _test_line(name: str, t: Mapping[str, Any]) -> str:
    if t["test"] == "none":
        return f"- {name}: nothing to test ({t['note']})."
    stat = "Fisher's exact test, odds ratio" if t["test"] == "fisher_exact" else f"chi-square ({t['dof']} df)"
    return (f"- {name}: {stat} = {num(t['statistic'])}, p = {pval(t['p'])}"
            + (f" ({t['note']})" if t.get("note") else "") + ".")


def _paired_part(c: Mapping[str, Any]) -> list[str]:
    out = ["", "### Paired tests (the arms ran the same targets)", ""]
    q = c.get("cochran_q")
    if q:
        out.append(f"- Cochran's Q across the {len(c['arms'])} arms (flip per target): Q = {num(q.get('q'))}, "
                   f"df = {q.get('df')}, p = {pval(q.get('p'))}.")
    pw = c.get("pairwise") or []
    if pw:
        out += ["", "Pairwise exact McNemar tests, Holm-adjusted for the number of pairs:", "",
                table(["Arm A", "Arm B", "Shared targets", "Flips only under A", "Flips only under B",
                       "Exact McNemar p", "Holm-adjusted p"],
                      [[r["a"], r["b"], r.get("n"), r["a_only"], r["b_only"], pval(r["p"]), pval(r["p_holm"])]
                       for r in pw])]
    mp = c.get("mde_paired") or []
    if mp:
        out += ["", f"Minimum detectable change in flip rate against the reference arm on the same targets "
                    f"(two-sided alpha {c.get('alpha')}, power {c.get('power')}; "
                    f"{c.get('mde_paired_method') or 'paired design'}):", "",
                table(["Arm", "Reference arm", "Paired targets", "Reference flip rate", "Discordant share",
                       "MDE (pp)"],
                      [[m.get("arm"), m.get("reference"), m.get("n"), pct(m.get("baseline")), pct(m.get("discordant")),
                        num(m.get("mde_pp"), ".1f")] for m in mp])]
    return out


def study_c(c: Mapping[str, Any]) -> str:
    ft, tt, lt = c["flip_test"], c["text_test"], c["batch_labels"]["test"]
    paired = bool(c.get("paired"))
    noun = flip_words(c.get("flip_on") or "label")[0]
    out = ["## Study C: composition arms", "",
           f"Reference arm: **{c['reference']}**. "
           + ("The arms ran the same targets, so they are compared as paired samples." if paired
              else "The arms ran different targets, so they are compared as independent samples."), "",
           table(["Arm", "Comparable pairs", noun, rate_header(noun), "Text changes", "Text-change rate"],
                 [[r["arm"], r["pairs"], r["label_flips"]["k"], rate_ci(r["label_flips"]), r["text_changes"]["k"],
                   rate_ci(r["text_changes"])] for r in c["arms"]])]
    if paired:
        out += _paired_part(c) + [""]
    else:
        out += ["", _test_line("Label flips across arms", ft), _test_line("Text changes across arms", tt)]
    out.append(_test_line("Batch label distribution across arms", lt))
    if c["mde"] and not paired:
        out += ["", f"Minimum detectable increase in flip rate over the reference arm (two-sided alpha "
                    f"{c['alpha']}, power {c['power']}, Cohen's h normal approximation):", "",
                table(["Arm", "Reference items", "Arm items", "Baseline rate", "MDE (pp)"],
                      [[m["arm"], m["n_reference"], m["n_arm"], pct(m["baseline"]), num(m["mde_pp"], ".1f")]
                       for m in c["mde"]]), "",
                f"Sensitivity of this run: effects smaller than {num(c['sensitivity_pp'], '.1f')} percentage points "
                f"cannot be ruled out."]
    return "\n".join(out)
