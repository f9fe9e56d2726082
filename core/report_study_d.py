"""Study D (paired backend comparison) in the shape of the published addendum (``study-d-addendum.txt`` sections 1
and 8.1-8.9): the headline per mode, the primary label result, the paired discordance tables with the exact McNemar
test, the text-change result, breakdowns by model, domain, task, dispatch mode, phase and original direction with the
flips under both modes, and the score-pair distributions.

Here a *mode* is a backend and every row is a candidate row that ran under both modes."""
from __future__ import annotations

from typing import Any, Mapping

from .report_format import not_comparable_text, pct, pval, rate_ci, score, table

MODE_HEADERS = ["Mode", "Records", "OK", "Label flips", "Label-flip rate", "Text changes", "Text-change rate"]
# the addendum's order of its discovery directions (section 8.8); other values follow, in the analysis' order
DIRECTION_ORDER = ("refuse_to_comply", "comply_to_refuse", "safety_weakened", "safety_strengthened",
                   "incorrect_to_correct", "correct_to_incorrect")
BREAKDOWNS = (("model", "Model"), ("domain", "Domain"), ("task", "Task"), ("dispatcher", "Dispatch mode"),
              ("phase", "Phase"), ("original_direction", "Original direction"),
              ("direction", "Direction of the rerun's own flip"))


def mode_row(m: Mapping[str, Any]) -> list:
    return [m["mode"], m["records"], m["ok"], m["label_flips"]["k"], rate_ci(m["label_flips"]),
            m["text_changes"]["k"], rate_ci(m["text_changes"])]


def _wilson(prop: Mapping[str, Any]) -> str:
    return f"[{pct(prop['lo'])}, {pct(prop['hi'])}]" if prop.get("n") else "n/a"


def _result_table(cmp: Mapping[str, Any], key: str, yes: str, no: str) -> str:
    rows = [[m["mode"], m[key]["k"], m[key]["n"] - m[key]["k"], m[key]["n"], pct(m[key]["rate"]), _wilson(m[key])]
            for m in cmp["modes"]]
    return table(["Mode", yes, no, "Total", "Rate", "Wilson 95% CI"], rows)


def _paired(cmp: Mapping[str, Any], key: str, yes: str, no: str, noun: str) -> list[str]:
    a, b, d = cmp["a"], cmp["b"], cmp[key]
    discordant = d["a_only"] + d["b_only"]
    return [table(["Pair outcome", "Count"], [
        [f"{a} {yes}, {b} {yes}", d["both"]], [f"{a} {yes}, {b} {no}", d["a_only"]],
        [f"{a} {no}, {b} {yes}", d["b_only"]], [f"{a} {no}, {b} {no}", d["neither"]]]), "",
        f"Exact two-sided McNemar p = {pval(d['p'])} for {noun}: under the null that {a}-only and {b}-only "
        f"discordant rows are equally likely, the {discordant} discordant rows ({d['a_only']} {a}-only, "
        f"{d['b_only']} {b}-only) are Binomial({discordant}, 0.5)."]


def _breakdown(cmp: Mapping[str, Any], field: str, title: str) -> list[str]:
    rows = cmp["breakdowns"].get(field) or []
    if not rows or (field in ("original_direction", "phase") and all(r["value"] is None for r in rows)):
        return []
    if field == "direction" and any(r["value"] is not None for r in cmp["breakdowns"].get("original_direction") or []):
        return []  # the rerun's own direction is shown only when the original one is unknown
    if field == "original_direction":
        rows = sorted(rows, key=lambda r: DIRECTION_ORDER.index(r["value"]) if r["value"] in DIRECTION_ORDER
                      else len(DIRECTION_ORDER))
    a, b = cmp["a"], cmp["b"]
    nc = any(any((r.get("not_comparable") or {}).values()) for r in rows)
    headers = [title, "Candidate rows", f"{a} flips", f"{a} rate", f"{b} flips", f"{b} rate",
               f"{a} text changes", f"{b} text changes"] + (["Not comparable"] if nc else [])
    body = [[r["value"], r["rows"], r["a_flips"]["k"], pct(r["a_flips"]["rate"]), r["b_flips"]["k"],
             pct(r["b_flips"]["rate"]), r["a_text"]["k"], r["b_text"]["k"]]
            + ([not_comparable_text(r.get("not_comparable"))] if nc else []) for r in rows]
    return ["", f"#### By {title[0].lower()}{title[1:]}", "", table(headers, body)]


def study_d(cmp: Mapping[str, Any], plot: str | None, detail: bool, flip_on: str = "label") -> str:
    a, b = cmp["a"], cmp["b"]
    unmatched = cmp.get("unmatched") or {}
    flip_word = ("score changes (`flip_on = \"score\"`), as in the addendum" if flip_on == "score"
                 else "label changes (`flip_on = \"label\"`)")
    out = [f"### {a} vs {b}", "",
           f"{cmp['rows']} candidate rows ran under both modes (matched by model, task, item, dispatcher, batch size, "
           f"peers, repeat)" + (f"; unmatched rows: {a}: {unmatched.get(a, 0)}, {b}: {unmatched.get(b, 0)}"
                                if any(unmatched.values()) else "") + ". Each mode is a backend; Records counts its "
           f"candidate rows, OK those comparable (no error, both labelled, same prompt). Label flips here are "
           f"{flip_word}.", "",
           table(MODE_HEADERS, [mode_row(m) for m in cmp["modes"]])]
    kinds = [f"{m['mode']}: {m['label_flips']['k']} flips, {m['substantive_flips']['k']} substantive and "
             f"{m['parse_failure_flips']['k']} parse failures (a side `unparsed` or empty); {m['text_changes']['k']} "
             f"text changes, {m['truncated_changes']} with a side stopped at max_tokens"
             for m in cmp["modes"] if m.get("substantive_flips") is not None and m.get("parse_failure_flips")]
    if kinds:
        out += ["", "Flip kinds: " + "; ".join(kinds) + "."]
    nc = [(m["mode"], m.get("not_comparable")) for m in cmp["modes"] if any((m.get("not_comparable") or {}).values())]
    left = cmp.get("not_comparable") or {}
    if nc or any(left.values()):
        n_left = sum(left.values())
        out += ["", f"Left out of both modes' rates: {n_left} candidate row{'s' if n_left != 1 else ''} that a mode "
                    f"cannot compare ({not_comparable_text(left).split(' ', 1)[-1].strip('()')}). Not comparable by "
                    f"mode: " + "; ".join(f"{name} {not_comparable_text(v)}" for name, v in nc) + "."]
    if not detail:
        for key, noun in (("label", "Label flips"), ("text", "Text changes")):
            d = cmp[key]
            out += ["", f"{noun}, paired: {d['both']} under both, {d['a_only']} only under {a}, {d['b_only']} only "
                        f"under {b}, {d['neither']} under neither; exact two-sided McNemar p = {pval(d['p'])}."]
        return "\n".join(out + (["", f"![{a} vs {b}]({plot})"] if plot else []))
    out += ["", "#### Primary label result", "", _result_table(cmp, "label_flips", "Label flips", "Non-flips"),
            "", "#### Primary paired test", ""] + _paired(cmp, "label", "flip", "non-flip", "label flips")
    out += ["", "#### Text-change result", "",
            _result_table(cmp, "text_changes", "Text changes", "Text-identical rows"), "",
            "Paired text changes:", ""] + _paired(cmp, "text", "text change", "text identical", "text changes")
    if plot:
        out += ["", f"![{a} vs {b}]({plot})"]
    for field, title in BREAKDOWNS:
        out += _breakdown(cmp, field, title)
    out += ["", "#### Score-pair distribution"]
    for mode in (a, b):
        out += ["", f"{mode} score pairs:", "",
                table(["Solo score", "Batched score", "Rows"],
                      [[score(p["solo"]), score(p["batch"]), p["count"]] for p in cmp["score_pairs"][mode]])]
    return "\n".join(out)


def section(comparisons: list[Mapping[str, Any]], plots: Mapping[str, str], flip_on: str = "label") -> list[str]:
    if not comparisons:
        return []
    detail = len(comparisons) <= 3
    parts = ["## Study D: paired backend comparison\n\nThe same candidate rows under two backends (modes); each row's "
             "flip / text change is paired across the modes and tested with the exact McNemar test."
             + ("" if detail else f" With {len(comparisons)} comparisons each is shown in short (no per-mode result "
                                  f"tables, breakdowns or score pairs); summary.json holds them all.")]
    parts += [study_d(c, plots.get(f"study_d_{i}"), detail, flip_on) for i, c in enumerate(comparisons)]
    return parts
