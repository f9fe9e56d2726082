"""The top of ``report.md``: what was run, how many records and pairs, what could not be compared and why, the
flip definition, and the stack fingerprints as a table of the fields that differ between them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .report_format import differing_fields, flatten, list_middles, not_comparable_text, table

FLIP_ON_WORDS = {"label": "a change of label (solo label != batch label",
                 "score": "a change of score (solo score != batch score, e.g. a partial 0.5 vs a full 1.0"}


def flip_on_sentence(flip_on: str) -> str:
    return (f"A flip is {FLIP_ON_WORDS.get(flip_on, repr(flip_on) + ' (')}; study option `flip_on = \"{flip_on}\"`"
            + (", the default" if flip_on == "label" else "") + ").")


def duplicates_sentence(n: int, run_dir: Path) -> str:
    return (f"{n} duplicate record{'s' if n != 1 else ''} (a key already seen) {'were' if n != 1 else 'was'} "
            f"dropped: only the first record per key counts; run `evalhost validate {run_dir.name}` to list them.")


def _value(v: Any, limit: int = 200) -> str:
    s = str(v)
    return s if len(s) <= limit else f"{s[:limit]} … ({len(s)} characters)"


def fingerprints_section(fps: Mapping[str, Any], records: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """One column per fingerprint, one row per field whose value differs, then one line with the shared fields;
    every value whole (never cut)."""
    if not fps:
        return []
    used: dict[str, set] = {}
    for r in records:
        if r.get("fingerprint_id") is not None:
            used.setdefault(str(r["fingerprint_id"]), set()).add(str(r.get("backend")))
    names = sorted(fps, key=str)
    out = ["### Stack fingerprints", ""]
    if len(names) == 1:
        flat = flatten(fps[names[0]])
        out += [f"One stack fingerprint, `{names[0]}`"
                + (f" (used by {', '.join(sorted(used.get(names[0], ())))})" if used.get(names[0]) else "") + ":",
                "", table(["Field", "Value"], [[f, v] for f, v in flat.items()])]
        return out
    differ, shared = differing_fields({n: fps[n] for n in names})
    flats = {n: flatten(fps[n]) for n in names}
    raw = {n: flatten(fps[n], lists=True) for n in names}
    rows, around = [], []
    if used:
        rows.append(["used by (records)"] + [", ".join(sorted(used.get(n, ()))) or "—" for n in names])
    for f in differ:
        mid = list_middles([raw[n].get(f) for n in names])
        if mid:
            rows.append([f] + mid[0])
            around.append(f"{f} = {mid[1]}")
        else:
            rows.append([f] + [flats[n].get(f, "(absent)") for n in names])
    out += [f"{len(names)} stack fingerprints; the fields that differ between them:", "",
            table(["Field"] + [f"`{n}`" for n in names], rows), ""]
    if around:
        out += ["Where '…' stands in a row above, the part left out is the same in every fingerprint: "
                + "; ".join(f"`{a}`" for a in around) + ".", ""]
    out.append("Shared by all: " + ("; ".join(f"{f} = {v}" for f, v in shared.items()) or "nothing")
               + ".")
    return out


def evidence_section(ev: Mapping[str, Any]) -> list[str]:
    if not ev:
        return []
    rows = []
    for backend in sorted(ev, key=str):
        for f, v in flatten(ev[backend]).items():
            rows.append([backend, f, _value(v)])
    return ["### Backend evidence", "", table(["Backend", "Field", "Value"], rows)]


def header(run_dir: Path, manifest: Mapping[str, Any], summary: Mapping[str, Any],
           records: Sequence[Mapping[str, Any]] = ()) -> str:
    c = summary["counts"]
    study = manifest.get("study") or summary.get("run", {}).get("study") or "unknown"
    flip_on = summary.get("flip_on") or "label"
    rows = [["Run directory", run_dir.name], ["Study", study], ["Status", manifest.get("status", "unknown")]]
    if manifest.get("imported"):
        imp = manifest["imported"]
        src = imp.get("source") or imp.get("file") if isinstance(imp, Mapping) else None
        rows.append(["Imported", f"yes (from {src})" if src else "yes"])
    rows += [["Records", c["records"]], ["Solo / batch records", f"{c['solo']} / {c['batch']}"],
             ["Pairs (batch record with its solo)", c["pairs"]],
             ["Batch records without a solo", c["unpaired_batch"]]]
    if "comparable_pairs" in c:
        rows += [["Comparable pairs (the denominator of every rate)", c["comparable_pairs"]],
                 ["Not comparable (reason)", not_comparable_text(c.get("not_comparable"))],
                 ["Duplicate records dropped", c.get("duplicates_dropped", 0)]]
    else:
        rows.append(["Pairs OK (no error, both labelled)", c["ok_pairs"]])
    rows += [["Flip", f"{flip_on} change (`flip_on = \"{flip_on}\"`)"], ["Error records", c["errors"]],
             ["Retried / restarted records", f"{c['retried']} / {c['restarted']}"],
             ["Models", ", ".join(c["models"])], ["Backends", ", ".join(c["backends"])],
             ["Tasks", ", ".join(c["tasks"])]]
    lines = [f"# evalhost report: {study}", "", table(["Field", "Value"], rows)]
    if c.get("duplicates_dropped"):
        lines += ["", "**Duplicates:** " + duplicates_sentence(int(c["duplicates_dropped"]), run_dir)]
    fp = fingerprints_section(manifest.get("fingerprints") or {}, records)
    if fp:
        lines += [""] + fp
    ev = evidence_section(manifest.get("evidence") or {})
    if ev:
        lines += [""] + ev
    plugins = manifest.get("plugins")
    if plugins:
        items = plugins if isinstance(plugins, list) else [{"name": k, "version": v} for k, v in dict(plugins).items()]
        lines += ["", "Plugins: " + ", ".join(
            f"{p.get('name')} {p.get('version', '')}".strip() if isinstance(p, Mapping) else str(p) for p in items)]
    return "\n".join(lines)
