"""``report.html``: one self-contained page next to ``report.md`` to see why each output flipped.

The page holds the headline and breakdowns (rendered here, every value escaped), then every label flip and text
change as a row that opens to the solo and batched texts side by side with the part after their first difference
highlighted, the labels and scores, the logprob margin at the divergence (:mod:`evalhost.analysis_margins`) and the
group (peers, position). Filters: task, backend, dispatcher and kind (substantive flip / parse-failure flip / text
change only).

Safety: records are untrusted. Nothing from them is ever parsed as HTML: tables are built with ``html.escape``, and
the rows travel as JSON inside ``<script type="application/json">`` (``<``, ``>`` and ``&`` written as ``\\u003c``
... so no text can close the element), read with ``JSON.parse`` and put on the page with ``textContent`` only. The
page loads nothing: inline CSS and JS, no URL anywhere in the template, and a Content-Security-Policy that allows no
network request and only the page's own script (by its SHA-256).
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
from typing import Any, Mapping, Sequence

from .report_format import json_safe, rate_ci

REPORT_HTML = "report.html"
KINDS = {"substantive": "substantive flip", "parse_failure": "parse-failure flip", "text_change": "text change only"}

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#1b1b1b;background:#fff}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;
vertical-align:top}th{background:#eef2f7}
tr.row{cursor:pointer}tr.row:hover,tr.row:focus{background:#fff6d6;outline:none}
tr.row.open{background:#ffeeb0}.kind-substantive{color:#a40000;font-weight:600}
.kind-parse_failure{color:#8a5a00}.kind-text_change{color:#35539a}
.filters label{margin-right:1em}.count{font-weight:600}
.panes{display:flex;gap:1em}.pane{flex:1;min-width:0}
pre.text{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;border:1px solid #ddd;padding:.5em;margin:0}
mark.div{background:#ffd04d}dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}
dl.facts dt{font-weight:600}.tie{color:#a40000}.muted{color:#666}
"""

_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("flip-data").textContent);
  var rows = data.rows, kinds = data.kinds, body = document.getElementById("flip-rows");
  var FILTERS = ["task", "backend", "dispatcher", "kind"];
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) { return "\u2014"; }
    return typeof v === "object" ? JSON.stringify(v) : String(v);
  }
  function cut(a, b) {
    var x = Array.from(a || ""), y = Array.from(b || ""), i = 0;
    while (i < x.length && i < y.length && x[i] === y[i]) { i++; }
    return i;
  }
  function pane(title, text, at) {
    var d = el("div", "pane"), pre = el("pre", "text"), cps = Array.from(text || "");
    d.appendChild(el("h4", null, title));
    pre.appendChild(document.createTextNode(cps.slice(0, at).join("")));
    pre.appendChild(el("mark", "div", cps.slice(at).join("")));
    d.appendChild(pre);
    return d;
  }
  function topText(top) {
    if (!top) { return null; }
    return top.map(function (e) { return fmt(e[0]) + " (" + Number(e[1]).toFixed(4) + ")"; }).join(", ");
  }
  function detail(r) {
    var box = el("div", "detail-box"), at = cut(r.solo_text, r.batch_text);
    var panes = el("div", "panes");
    panes.appendChild(pane("Solo", r.solo_text, at));
    var where = "Batch (" + fmt(r.dispatcher) + ", batch size " + fmt(r.batch_size) + ")";
    panes.appendChild(pane(where, r.batch_text, at));
    box.appendChild(panes);
    var dl = el("dl", "facts");
    var margin = r.margin === null ? "unknown" + (r.margin_reason ? " (" + r.margin_reason + ")" : "")
      : r.margin.toFixed(4) + " nats: " + (r.margin_class === "tie" ? "tie flip" : "non-tie flip")
        + " (threshold " + data.threshold + ")";
    [["Item", r.item_id], ["Labels (solo \u2192 batch)", fmt(r.solo_label) + " \u2192 " + fmt(r.batch_label)],
     ["Scores (solo \u2192 batch)", fmt(r.solo_score) + " \u2192 " + fmt(r.batch_score)],
     ["Direction", r.direction], ["Kind", kinds[r.kind] || r.kind],
     ["Texts part at", "character " + at + ", output token " + fmt(r.first_divergent_token)],
     ["Margin at the divergence", margin],
     ["Solo top-k there (token (logprob))", topText(r.solo_top)],
     ["Batch token's rank in solo top-k", r.batch_rank],
     ["Group", fmt(r.group_id) + ", position " + fmt(r.position)],
     ["Peers", r.peers && r.peers.length ? r.peers.join(", ") : "none"],
     ["Stopped at max_tokens", r.truncated ? "yes (a side)" : "no"]].forEach(function (f) {
      dl.appendChild(el("dt", null, f[0]));
      dl.appendChild(el("dd", null, fmt(f[1])));
    });
    box.appendChild(dl);
    return box;
  }
  function toggle(tr, dtr, r) {
    var open = dtr.hidden;
    if (open && !dtr.firstChild.firstChild) { dtr.firstChild.appendChild(detail(r)); }
    dtr.hidden = !open;
    tr.classList.toggle("open", open);
    tr.setAttribute("aria-expanded", String(open));
  }
  var trs = rows.map(function (r, i) {
    var tr = el("tr", "row"), dtr = el("tr", "detail"), td = el("td");
    tr.tabIndex = 0;
    tr.setAttribute("aria-expanded", "false");
    tr.dataset.index = String(i);
    [r.task, r.backend, r.dispatcher, r.batch_size, r.item_id].forEach(function (v) {
      tr.appendChild(el("td", null, fmt(v)));
    });
    tr.appendChild(el("td", "kind-" + r.kind, kinds[r.kind] || r.kind));
    tr.appendChild(el("td", null, fmt(r.solo_label) + " \u2192 " + fmt(r.batch_label)));
    tr.appendChild(el("td", r.margin_class === "tie" ? "tie" : null,
                      r.margin === null ? "\u2014" : r.margin.toFixed(4) + (r.margin_class === "tie" ? " tie" : "")));
    tr.appendChild(el("td", null, fmt(r.first_divergent_token)));
    td.colSpan = 9;
    dtr.appendChild(td);
    dtr.hidden = true;
    tr.addEventListener("click", function () { toggle(tr, dtr, r); });
    tr.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); toggle(tr, dtr, r); }
    });
    body.appendChild(tr);
    body.appendChild(dtr);
    return [tr, dtr, r];
  });
  function apply() {
    var want = {}, shown = 0;
    FILTERS.forEach(function (f) { want[f] = document.getElementById("f-" + f).value; });
    trs.forEach(function (t) {
      var ok = FILTERS.every(function (f) { return want[f] === "" || fmt(t[2][f]) === want[f]; });
      t[0].hidden = !ok;
      if (!ok) { t[1].hidden = true; t[0].classList.remove("open"); t[0].setAttribute("aria-expanded", "false"); }
      if (ok) { shown++; }
    });
    document.getElementById("shown").textContent = String(shown);
  }
  FILTERS.forEach(function (f) {
    var sel = document.getElementById("f-" + f), seen = {};
    rows.forEach(function (r) { seen[fmt(r[f])] = 1; });
    Object.keys(seen).sort().forEach(function (v) {
      var o = el("option", null, f === "kind" ? (kinds[v] || v) : v);
      o.value = v;
      sel.appendChild(o);
    });
    sel.addEventListener("change", apply);
  });
  document.getElementById("total").textContent = String(rows.length);
  apply();
}());
"""


def _e(value: Any) -> str:
    return html.escape("—" if value is None else str(value), quote=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline(summary: Mapping[str, Any]) -> str:
    rows = [[h["backend"], h["pairs"], h["label_flips"]["k"], rate_ci(h["label_flips"]),
             (h.get("substantive_flips") or {}).get("k"), (h.get("parse_failure_flips") or {}).get("k"),
             h["text_changes"]["k"], rate_ci(h["text_changes"])] for h in summary.get("headline") or []]
    noun = "Score flips" if summary.get("flip_on") == "score" else "Label flips"
    return _table(["Backend", "Comparable pairs", noun, "Rate [95% CI]", "Substantive", "Parse failure",
                   "Text changes", "Rate [95% CI]"], rows)


def _breakdowns(summary: Mapping[str, Any]) -> str:
    out = []
    for field in ("task", "dispatcher", "batch_size", "domain", "model"):
        rows = (summary.get("breakdowns") or {}).get(field) or []
        if len(rows) < 2 and field not in ("task",):
            continue
        out.append(f"<h3>By {_e(field.replace('_', ' '))}</h3>")
        out.append(_table([field.replace("_", " ").capitalize(), "Comparable pairs", "Flips", "Rate [95% CI]",
                           "Text changes", "Rate [95% CI]"],
                          [[r["value"], r["pairs"], r["label_flips"]["k"], rate_ci(r["label_flips"]),
                            r["text_changes"]["k"], rate_ci(r["text_changes"])] for r in rows]))
    return "\n".join(out)


def _margins(m: Mapping[str, Any] | None) -> str:
    if not m or not m.get("recorded"):
        return ("<p class=\"muted\">Top-k logprobs were not recorded, so margins are unknown; set "
                "<code>[sampling] top_logprobs = 5</code> in the study to record them.</p>")
    rows = [[b["backend"], b["changes"], b["tie"], b["non_tie"], rate_ci(b["tie_share"]),
             "n/a" if b["median_margin"] is None else f"{b['median_margin']:.4g}", b["unknown"]]
            for b in m["by_backend"]]
    thr = m["threshold"]
    return (f"<p>Margin = the solo output's top-1 minus top-2 logprob at the first divergent token. Tie flip: "
            f"margin of at most {_e(f'{thr:g}')} nats ({_e(m.get('threshold_basis'))}).</p>"
            + _table(["Backend", "Text changes", "Tie flips", "Non-tie flips", "Tie share [95% CI]", "Median margin",
                      "Unknown"], rows)
            + _table(["Backend"] + list(m.get("bin_labels") or []),
                     [[b["backend"]] + list(b["histogram"]) for b in m["by_backend"]]))


# The explorer shows at most this many changes: a page with tens of thousands of rows is neither readable nor cheap
# to build (a 1,000,000-record run with 5 % of pairs changed needed 150 MiB more for them; bench/README.md). The
# rows kept are the substantive flips first, then parse-failure flips, then text changes only; the page says so.
EXPLORER_MAX_ROWS = 2000
_KIND_ORDER = {"substantive": 0, "parse_failure": 1, "text_change": 2}


def _kind(p: Mapping[str, Any]) -> str:
    return (p.get("flip_kind") or "substantive") if p.get("flip") else "text_change"


def explorer_pairs(pairs: Sequence[Mapping[str, Any]], limit: int | None = None) -> tuple[list[Mapping[str, Any]], int]:
    """The changed comparable pairs the explorer shows (at most ``limit``, substantive flips first) and how many
    there are in all."""
    limit = EXPLORER_MAX_ROWS if limit is None else limit
    changed = [p for p in pairs if p.get("comparable") and (p.get("flip") or p.get("text_change"))]
    if len(changed) <= limit:
        return changed, len(changed)
    order = sorted(range(len(changed)), key=lambda i: (_KIND_ORDER.get(_kind(changed[i]), 3), i))
    return [changed[i] for i in sorted(order[:limit])], len(changed)


def explorer_rows(records: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]],
                  margins: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One row per given comparable pair that flipped or changed text, with both texts and its margin."""
    from .analysis_pairs import prepare

    by_key: dict[Any, Mapping[str, Any]] = {}
    for r in prepare(records)[0]:  # cleaned: keys hashable, the first record per key
        by_key.setdefault(r.get("key"), r)
    marg = {m["key"]: m for m in (margins or {}).get("rows") or []}
    out = []
    for p in pairs:
        if not p.get("comparable") or not (p.get("flip") or p.get("text_change")):
            continue
        solo, batch = by_key.get(p.get("solo_key"), {}), by_key.get(p.get("key"), {})
        m = marg.get(p.get("key"), {})
        out.append({
            "key": p.get("key"), "task": p.get("task"), "backend": p.get("backend"),
            "dispatcher": p.get("dispatcher"), "batch_size": p.get("batch_size"), "item_id": p.get("item_id"),
            "kind": _kind(p), "direction": p.get("direction"),
            "solo_label": p.get("solo_label"), "batch_label": p.get("batch_label"),
            "solo_score": p.get("solo_score"), "batch_score": p.get("batch_score"),
            "solo_text": solo.get("output_text") if isinstance(solo.get("output_text"), str) else None,
            "batch_text": batch.get("output_text") if isinstance(batch.get("output_text"), str) else None,
            "first_divergent_token": p.get("first_divergent_token"), "truncated": p.get("truncated"),
            "margin": m.get("margin"), "margin_class": m.get("class"), "margin_reason": m.get("reason"),
            "batch_rank": m.get("batch_rank"), "solo_top": m.get("solo_top"),
            "group_id": p.get("group_id"), "position": p.get("position"), "peers": p.get("peers") or [],
        })
    return out


def _script_json(data: Any) -> str:
    text = json.dumps(json_safe(data), ensure_ascii=False, allow_nan=False, default=str)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
           pairs: Sequence[Mapping[str, Any]], imported: Any = None) -> str:
    """The whole page as one string; ``imported``: the manifest's ``imported`` block (the paired accuracy test of an
    imported lm-eval / inspect pair, :mod:`evalhost.report_imported`)."""
    from .report_imported import html_section

    margins = summary.get("margins")
    shown, total = explorer_pairs(pairs)
    rows = explorer_rows(records, shown, margins)
    capped = "" if total <= len(rows) else (
        f"<p class=\"cap\" id=\"cap\">This page shows {len(rows)} of the {total} changes: substantive flips first, then "
        f"parse-failure flips, then text changes only. Every change is in the run's records (and "
        f"<code>evalhost candidates --text-changes</code> exports them all).</p>")
    data = {"rows": rows, "kinds": KINDS, "threshold": (margins or {}).get("threshold")}
    digest = base64.b64encode(hashlib.sha256(_JS.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src 'none'; "
           f"connect-src 'none'; base-uri 'none'; form-action 'none'")
    run = summary.get("run") or {}
    title = f"Flip explorer: {run.get('study') or ''} {run.get('run_dir') or ''}".strip()
    counts = summary.get("counts") or {}
    flip_on = summary.get("flip_on") or "label"
    selects = "".join(
        f'<label>{_e(name)} <select id="f-{f}"><option value="">all</option></select></label>'
        for f, name in (("task", "Task"), ("backend", "Backend"), ("dispatcher", "Dispatcher"), ("kind", "Kind")))
    head = "".join(f"<th>{_e(h)}</th>" for h in ("Task", "Backend", "Dispatcher", "Batch size", "Item", "Kind",
                                                  "Labels (solo → batch)", "Margin", "First divergent token"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p>{_e(counts.get('records'))} records, {_e(counts.get('comparable_pairs'))} comparable solo/batch pairs; a flip is a
changed {_e(flip_on)}. Rates are over comparable pairs with Wilson 95% intervals. report.md has every table.</p>
<h2>Headline: batch vs solo</h2>
{_headline(summary)}
{html_section(imported)}
<h2>Breakdowns</h2>
{_breakdowns(summary)}
<h2>Logprob margins at the divergence</h2>
{_margins(margins)}
<h2>Flips and text changes</h2>
<p>Click a row (or press Enter on it) to see both texts; the highlighted part is where they differ.</p>
{capped}
<div class="filters">{selects}<span class="count">showing <span id="shown">0</span> of <span id="total">0</span>
rows</span></div>
<table id="flips"><thead><tr>{head}</tr></thead><tbody id="flip-rows"></tbody></table>
<script type="application/json" id="flip-data">{_script_json(data)}</script>
<script>{_JS}</script>
</body></html>
"""


def write_html(run_dir: Any, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
               pairs: Sequence[Mapping[str, Any]], imported: Any = None):
    """Write ``report.html`` into ``run_dir`` atomically (temp + rename, links refused); return its path."""
    from .rundir import RunDir

    return RunDir(run_dir).write_atomic(REPORT_HTML, render(summary, records, pairs, imported))
