"""The headline (one plain-language sentence and one table row per backend), the per-slice breakdowns and the
solo -> batch label matrices (one per scorer: refusal labels and multiple-choice labels never share a matrix)."""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

from .report_format import count_sentence, not_comparable_text, rate_ci, table
from .report_header import flip_on_sentence


def headline_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The analysis' headline rows; for a summary without them, the same shape from the backend breakdown."""
    if summary.get("headline") is not None:
        return list(summary["headline"])
    return [{"backend": r["value"], "pairs": r["pairs"], "not_comparable": r.get("not_comparable"),
             "label_flips": r["label_flips"], "text_changes": r["text_changes"]}
            for r in summary["breakdowns"]["backend"]]


def _k(prop: Mapping[str, Any] | None) -> Any:
    return None if prop is None else prop["k"]


def flip_words(flip_on: str) -> tuple[str, str]:
    """(column noun, verb) for the flip definition: ('Label flips', 'changed label')."""
    return ("Score flips", "changed score") if flip_on == "score" else ("Label flips", "changed label")


def rate_header(noun: str) -> str:
    """'Label flips' -> 'Label-flip rate'."""
    return noun[:-1].replace(" ", "-") + " rate"


def backend_sentence(row: Mapping[str, Any], flip_on: str) -> str:
    _, verb = flip_words(flip_on)
    flips, text = row["label_flips"], row["text_changes"]
    s = count_sentence(flips, "comparable pairs", verb)
    sub, parse = row.get("substantive_flips"), row.get("parse_failure_flips")
    if flips.get("k") and sub is not None and parse is not None:
        s += (f": {sub['k']} substantive, {parse['k']} parse failure{'s' if parse['k'] != 1 else ''} "
              f"(a side `unparsed` or empty)")
    s += f". {text['k']} of {text['n']} changed text"
    if row.get("truncated_changes") is not None:
        t = int(row["truncated_changes"])
        s += f", {t} of them with a side stopped at max_tokens"
    s += "."
    nct = not_comparable_text(row.get("not_comparable"))
    if nct not in ("0", "—"):
        s += f" Not comparable: {nct}."
    return f"- **{row['backend']}**: {s[0].upper()}{s[1:]}"


def headline(summary: Mapping[str, Any]) -> str:
    flip_on = summary.get("flip_on") or "label"
    noun, _ = flip_words(flip_on)
    rows = headline_rows(summary)
    split = any(r.get("substantive_flips") is not None for r in rows)
    trunc = any(r.get("truncated_changes") is not None for r in rows)
    headers = ["Backend", "Comparable pairs", "Not comparable", noun, rate_header(noun)]
    headers += ["Substantive flips", "Parse-failure flips"] if split else []
    headers += ["Text changes", "Text-change rate"] + (["Text changes at max_tokens"] if trunc else [])

    def line(name, r, nc, truncated):
        out = [name, r["label_flips"]["n"], not_comparable_text(nc), r["label_flips"]["k"], rate_ci(r["label_flips"])]
        out += [_k(r.get("substantive_flips")), _k(r.get("parse_failure_flips"))] if split else []
        out += [r["text_changes"]["k"], rate_ci(r["text_changes"])] + ([truncated] if trunc else [])
        return out

    body = [line(str(r["backend"]), r, r.get("not_comparable"), r.get("truncated_changes")) for r in rows]
    if len(rows) > 1:
        o = summary["overall"]
        t = sum(int(r.get("truncated_changes") or 0) for r in rows) if trunc else None
        body.append(line("All backends", o, summary["counts"].get("not_comparable"), t))
    return "\n".join(["## Headline: batch vs solo", "", flip_on_sentence(flip_on) + " A pair is a batch record and its "
                      "solo record (repeat 0); it is comparable when neither side errored, both are labelled, both "
                      "sent the same prompt and its key is not a duplicate. Rates are over comparable pairs, with "
                      "Wilson 95% CIs; a text change is a different output SHA-256." + cobatch_sentence(summary), ""]
                     + [backend_sentence(r, flip_on) for r in rows] + ["", table(headers, body)])


def cobatch_sentence(summary: Mapping[str, Any]) -> str:
    """' Co-batching: ...' - how many batch pairs had verified co-batching and which rule counted them ('' when no
    record carries a verdict, as in runs from before verdicts existed)."""
    cb = (summary.get("overall") or {}).get("cobatch")
    if not cb:
        return ""
    total = sum(int(cb.get(k) or 0) for k in ("verified", "serialized", "unverified", "not_recorded"))
    policy = cb.get("count_unverified")
    s = (f" Co-batching: {cb.get('verified', 0)} of {total} batch pairs come from groups with verified co-batching "
         f"(the engine reported the whole group running, or the backend runs a prompt list as one batch), "
         f"{cb.get('serialized', 0)} from groups the server ran one after another (serialized: never a batch), "
         f"{cb.get('unverified', 0)} from groups with no evidence either way (unverified)")
    if cb.get("not_recorded"):
        s += f", {cb['not_recorded']} from groups recorded without a verdict (counted)"
    if policy is True:
        s += (". Verified and unverified groups count as the batch condition (`[study] count_unverified = true`); "
              "serialized ones are not comparable")
    elif policy is False:
        s += (". Only verified groups count as the batch condition; serialized and unverified ones are not "
              "comparable (`[study] count_unverified = false`)")
    else:
        s += ". Records were written under different `count_unverified` settings"
    return s + "; the rules are in evalhost.cobatch and docs/engines.md."


def breakdown_table(rows: Sequence[Mapping[str, Any]], name: str, noun: str = "Label flips") -> str:
    nc = any("not_comparable" in r for r in rows)
    headers = [name, "Comparable pairs"] + (["Not comparable"] if nc else []) + [
        noun, rate_header(noun), "Text changes", "Text-change rate"]
    return table(headers, [[r["value"], r["pairs"]] + ([not_comparable_text(r.get("not_comparable"))] if nc else [])
                           + [r["label_flips"]["k"], rate_ci(r["label_flips"]), r["text_changes"]["k"],
                              rate_ci(r["text_changes"])] for r in rows])


def label_pairs_by_scorer(records: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]]
                          ) -> list[dict[str, Any]]:
    """Solo -> batch label counts over comparable pairs, one list per scorer (the pair's ``scorer``, the batch
    record's); ``records`` is not needed (kept for callers). The summary counts the same way
    (:func:`evalhost.analysis_acc.add_scorer_pair`)."""
    from .analysis_acc import add_scorer_pair, scorer_pair_rows

    by_scorer: dict[str, Counter] = {}
    for p in pairs:
        add_scorer_pair(by_scorer, p)
    return scorer_pair_rows(by_scorer)
