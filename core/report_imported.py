"""The report section of a run imported from two lm-eval or inspect_ai result files (``evalhost import --from
lm-eval|inspect SOLO BATCH``, :mod:`evalhost.import_bridge`): the paired accuracy test that the import computed and
stored in the manifest (``imported.paired``), shown in ``report.md`` (:func:`section`) and ``report.html``
(:func:`html_section`).

The test is read from the manifest, not computed again: each side's share of ``correct`` labels with its Wilson 95%
CI, the discordant pairs (correct only solo, correct only batch) and the exact McNemar p, all over the comparable
pairs. A manifest without ``imported.paired`` (a run evalhost made, or evalhost's own import format) gets no section;
a hand-edited block of the wrong shape gets none either (the report never fails on it).
"""
from __future__ import annotations

import html
from typing import Any, Mapping

from .report_format import pval, rate_ci, table

TITLE = "Paired accuracy test (imported pair)"


def _prop(x: Any) -> bool:
    return isinstance(x, Mapping) and all(isinstance(x.get(k), (int, float)) and not isinstance(x.get(k), bool)
                                          for k in ("k", "n", "rate", "lo", "hi"))


def facts(imported: Any) -> dict[str, Any] | None:
    """What the section shows, or None when ``imported`` (the manifest's block) holds no paired test."""
    if not isinstance(imported, Mapping) or not isinstance(imported.get("paired"), Mapping):
        return None
    p = imported["paired"]
    only = [len(imported.get(k)) if isinstance(imported.get(k), list) else 0 for k in ("only_solo", "only_batch")]
    out = {"format": str(imported.get("format") or "?"), "solo_file": str(imported.get("solo_file") or "?"),
           "batch_file": str(imported.get("batch_file") or "?"), "label": imported.get("label"),
           "pairs": p.get("pairs"), "only_solo": only[0], "only_batch": only[1], "note": p.get("note"),
           "test": None}
    if _prop(p.get("solo_correct")) and _prop(p.get("batch_correct")) and isinstance(p.get("mcnemar_p"), (int, float)):
        out["test"] = {"solo": p["solo_correct"], "batch": p["batch_correct"], "solo_only": p.get("solo_only"),
                       "batch_only": p.get("batch_only"), "mcnemar_p": p["mcnemar_p"]}
    return out


def _rows(f: Mapping[str, Any]) -> list[list[Any]]:
    t = f["test"]
    return [[side, f[f"{side}_file"], f"{t[side]['k']}/{t[side]['n']}", rate_ci(t[side])] for side in ("solo", "batch")]


def _sentences(f: Mapping[str, Any]) -> tuple[str, str | None, str | None]:
    intro = (f"Imported from {f['format']}: the solo side is {f['solo_file']}, the batch side {f['batch_file']}"
             + (f"; label = {f['label']}" if f.get("label") else "") + ".")
    t = f["test"]
    test = None if t is None else (
        f"Over the {f['pairs']} comparable pairs, {t['solo_only']} are correct only solo and {t['batch_only']} only "
        f"batched: exact McNemar p = {pval(t['mcnemar_p'])} (two-sided binomial test of the discordant pairs).")
    missing = None
    if f["only_solo"] or f["only_batch"]:
        missing = (f"Not in both files: {f['only_solo']} samples only in {f['solo_file']}, {f['only_batch']} only in "
                   f"{f['batch_file']} (not comparable, reason `missing`; ids in the manifest's `imported.only_solo` "
                   f"/ `imported.only_batch`).")
    return intro, test, missing


def section(imported: Any) -> str | None:
    """Markdown for report.md, or None when the run is no imported lm-eval / inspect pair."""
    f = facts(imported)
    if f is None:
        return None
    intro, test, missing = _sentences(f)
    out = [f"## {TITLE}", "", intro, ""]
    if f["test"] is None:
        out.append(f"{f.get('note') or 'no paired accuracy test'}.")
    else:
        out += [table(["Side", "File", "Correct", "Share correct [95% CI]"], _rows(f)), "", test]
    if missing:
        out += ["", missing]
    return "\n".join(out)


def html_section(imported: Any) -> str:
    """The same for report.html (every value escaped), or "" when there is none."""
    f = facts(imported)
    if f is None:
        return ""
    e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    intro, test, missing = _sentences(f)
    out = [f"<h2>{e(TITLE)}</h2>", f"<p>{e(intro)}</p>"]
    if f["test"] is None:
        out.append(f"<p>{e(f.get('note') or 'no paired accuracy test')}.</p>")
    else:
        head = "".join(f"<th>{e(h)}</th>" for h in ("Side", "File", "Correct", "Share correct [95% CI]"))
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in _rows(f))
        out += [f"<table id=\"imported-paired\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
                f"<p>{e(test)}</p>"]
    if missing:
        out.append(f"<p>{e(missing)}</p>")
    return "\n".join(out)
