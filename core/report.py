"""``report.md`` + ``summary.json`` + ``plots/*.png`` for a run directory. Reads records only (no torch).

Tables reuse the shapes of the Study D addendum (``Mode | Records | OK | Label flips | Label-flip rate | Text changes
| Text-change rate``, paired discordance tables, per-slice breakdowns, score-pair distributions).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import analysis as an
from .errors import UserError

VERDICTS = ("genuine", "artifact", "skip")


# -- inputs -----------------------------------------------------------------------------------------------------
def _read_records(run_dir: Path) -> list[dict[str, Any]]:
    from .records import find_records, read_records

    return read_records(find_records(run_dir))


def _read_adjudications(run_dir: Path) -> dict[str, str]:
    try:
        from .adjudicate import load_adjudications
    except ImportError:
        load_adjudications = None
    if load_adjudications is not None:
        raw = load_adjudications(run_dir) or {}
        out = {}
        for k, v in dict(raw).items():
            verdict = v.get("verdict") if isinstance(v, Mapping) else v
            if verdict in VERDICTS:
                out[str(k)] = str(verdict)
        return out
    path = run_dir / "adjudications.jsonl"
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("key") and obj.get("verdict") in VERDICTS:
            out[str(obj["key"])] = obj["verdict"]  # the last answer per key wins
    return out


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); restore it or delete it "
                        f"to report without the run header") from None
    return data if isinstance(data, dict) else {}


# -- formatting -------------------------------------------------------------------------------------------------
def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x: Any) -> str:
    return "n/a" if _nan(x) else f"{100 * float(x):.1f}%"


def rate_ci(prop: Mapping[str, Any]) -> str:
    if not prop or not prop.get("n"):
        return "n/a"
    return f"{pct(prop['rate'])} [{pct(prop['lo'])}, {pct(prop['hi'])}]"


def pval(p: Any) -> str:
    return "n/a" if _nan(p) else f"{float(p):.3g}"


def num(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if _nan(x) else format(float(x), fmt)


def _cell(x: Any) -> str:
    if x is None:
        return "—"
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return None if (math.isnan(x) or math.isinf(x)) else x
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_json_safe(v) for v in x]
    try:  # numpy scalars
        import numpy as np

        if isinstance(x, np.generic):
            return _json_safe(x.item())
    except ImportError:
        pass
    return str(x)


def _compact(obj: Any, limit: int = 240) -> str:
    s = json.dumps(obj, sort_keys=True, default=str)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# -- sections ---------------------------------------------------------------------------------------------------
MODE_HEADERS = ["Mode", "Records", "OK", "Label flips", "Label-flip rate", "Text changes", "Text-change rate"]


def _mode_row(name: str, records: int, ok: int, flips: Mapping[str, Any], text: Mapping[str, Any]) -> list:
    return [name, records, ok, flips["k"], rate_ci(flips), text["k"], rate_ci(text)]


def _header(run_dir: Path, manifest: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    c = summary["counts"]
    study = manifest.get("study") or summary.get("run", {}).get("study") or "unknown"
    lines = [f"# evalhost report: {study}", "",
             table(["Field", "Value"], [
                 ["Run directory", run_dir.name], ["Study", study], ["Status", manifest.get("status", "unknown")],
                 ["Records", c["records"]], ["Solo / batch records", f"{c['solo']} / {c['batch']}"],
                 ["Pairs (batch with its solo)", c["pairs"]], ["Batch records without a solo", c["unpaired_batch"]],
                 ["Pairs OK (no error, both labelled)", c["ok_pairs"]], ["Error records", c["errors"]],
                 ["Retried / restarted records", f"{c['retried']} / {c['restarted']}"],
                 ["Models", ", ".join(c["models"])], ["Backends", ", ".join(c["backends"])],
                 ["Tasks", ", ".join(c["tasks"])],
             ])]
    fps = manifest.get("fingerprints") or {}
    if fps:
        lines += ["", "### Stack fingerprints", "",
                  table(["Fingerprint", "Contents"], [[k, _compact(v, 400)] for k, v in sorted(fps.items())])]
    ev = manifest.get("evidence") or {}
    if ev:
        lines += ["", "### Backend evidence", "",
                  table(["Backend", "Evidence"], [[k, _compact(v, 400)] for k, v in sorted(ev.items())])]
    plugins = manifest.get("plugins")
    if plugins:
        items = plugins if isinstance(plugins, list) else [{"name": k, "version": v} for k, v in dict(plugins).items()]
        lines += ["", "Plugins: " + ", ".join(
            f"{p.get('name')} {p.get('version', '')}".strip() if isinstance(p, Mapping) else str(p) for p in items)]
    return "\n".join(lines)


def _headline(summary: Mapping[str, Any]) -> str:
    backend_rows = summary["breakdowns"]["backend"]
    ok_by_backend = summary.get("ok_by_backend", {})
    rows = [_mode_row(str(r["value"]), r["pairs"], ok_by_backend.get(str(r["value"]), r["pairs"]),
                      r["label_flips"], r["text_changes"]) for r in backend_rows]
    if len(backend_rows) > 1:
        o = summary["overall"]
        rows.append(_mode_row("All", o["pairs"], summary["counts"]["ok_pairs"], o["label_flips"], o["text_changes"]))
    return "\n".join(["## Headline: batch vs solo", "",
                      "Each row counts pairs (a batch record and its solo record, repeat 0). Rates carry Wilson 95% "
                      "CIs. A label flip is solo label != batch label; a text change is a different output SHA-256.",
                      "", table(MODE_HEADERS, rows)])


def _breakdown_table(rows: Sequence[Mapping[str, Any]], name: str) -> str:
    return table([name, "Pairs", "Label flips", "Label-flip rate", "Text changes", "Text-change rate"],
                 [[r["value"], r["pairs"], r["label_flips"]["k"], rate_ci(r["label_flips"]), r["text_changes"]["k"],
                   rate_ci(r["text_changes"])] for r in rows])


BREAKDOWN_TITLES = {"model": "Model", "domain": "Domain", "task": "Task", "dispatcher": "Dispatcher",
                    "batch_size": "Batch size", "phase": "Phase", "backend": "Backend"}


def _breakdowns(summary: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    out = ["## Breakdowns"]
    for field, title in BREAKDOWN_TITLES.items():
        rows = summary["breakdowns"][field]
        if len(rows) < 2 and field not in ("model", "task"):
            continue
        out += ["", f"### By {title.lower()}", "", _breakdown_table(rows, title)]
        if field in plots:
            out += ["", f"![Flip and text-change rate by {title.lower()}]({plots[field]})"]
    if summary["directions"]:
        out += ["", "### Direction of label flips", "",
                table(["Direction", "Domain", "Flips"],
                      [[d["direction"], d["domain"], d["count"]] for d in summary["directions"]])]
    return "\n".join(out)


def _distributions(summary: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    out = ["## Solo -> batch label pairs", "",
           table(["Solo label", "Batched label", "Rows"],
                 [[p["solo"], p["batch"], p["count"]] for p in summary["label_pairs"]])]
    if "label_pairs" in plots:
        out += ["", f"![Solo to batch label matrix]({plots['label_pairs']})"]
    fd = summary["first_divergence"]
    if fd["n"]:
        out += ["", "### First divergent token", "",
                f"{fd['n']} text-changed pairs have token ids; the median first divergent output token is at index "
                f"{num(fd['median'], 'g')}."]
        if "divergence" in plots:
            out += ["", f"![First divergent token positions]({plots['divergence']})"]
    return "\n".join(out)


def _score(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"{float(x):.1f}" if float(x) == round(float(x), 1) else f"{float(x):g}"
    return str(x)


def _study_d(cmp: Mapping[str, Any], plot: str | None, detail: bool) -> str:
    a, b = cmp["a"], cmp["b"]
    out = [f"### {a} vs {b}", "",
           f"{cmp['rows']} rows ran under both (matched by model, task, item, dispatcher, batch size, peers, repeat)"
           + (f"; unmatched rows: {a}: {cmp['unmatched'][a]}, {b}: {cmp['unmatched'][b]}"
              if any(cmp["unmatched"].values()) else "") + ".", "",
           table(MODE_HEADERS, [_mode_row(m["mode"], m["records"], m["ok"], m["label_flips"], m["text_changes"])
                                for m in cmp["modes"]])]
    for key, noun, yes, no in (("label", "Label flips", "flip", "non-flip"),
                               ("text", "Text changes", "text change", "text identical")):
        d = cmp[key]
        out += ["", f"**{noun}, paired.** Exact two-sided McNemar p = {pval(d['p'])} "
                    f"({d['a_only']} {a}-only vs {d['b_only']} {b}-only discordant rows).", "",
                table(["Pair outcome", "Count"], [
                    [f"{a} {yes}, {b} {yes}", d["both"]], [f"{a} {yes}, {b} {no}", d["a_only"]],
                    [f"{a} {no}, {b} {yes}", d["b_only"]], [f"{a} {no}, {b} {no}", d["neither"]]])]
    if plot:
        out += ["", f"![{a} vs {b}]({plot})"]
    if not detail:
        return "\n".join(out)
    titles = {"model": "Model", "domain": "Domain", "task": "Task", "dispatcher": "Dispatch mode",
              "phase": "Phase", "direction": "Direction"}
    for field, title in titles.items():
        rows = cmp["breakdowns"].get(field) or []
        if not rows:
            continue
        out += ["", table([title, "Candidate rows", f"{a} flips", f"{a} rate", f"{b} flips", f"{b} rate",
                           f"{a} text changes", f"{b} text changes"],
                          [[r["value"], r["rows"], r["a_flips"]["k"], pct(r["a_flips"]["rate"]), r["b_flips"]["k"],
                            pct(r["b_flips"]["rate"]), r["a_text"]["k"], r["b_text"]["k"]] for r in rows])]
    for mode in (a, b):
        out += ["", f"{mode} score pairs:", "",
                table(["Solo score", "Batched score", "Rows"],
                      [[_score(p["solo"]), _score(p["batch"]), p["count"]] for p in cmp["score_pairs"][mode]])]
    return "\n".join(out)


def _study_b(b: Mapping[str, Any], plot: str | None) -> str:
    pooled, an_, pr = b["pooled"], b["anova_alignment"], b["pearson_text_vs_flip"]
    rows = [[m["model"], m["alignment_type"], m["pairs"], m["safety"]["k"], rate_ci(m["safety"]),
             m["capability"]["k"], rate_ci(m["capability"]), rate_ci(m["label_flips"]), rate_ci(m["text_changes"])]
            for m in b["models"]]
    out = ["## Study B: cross-model", "",
           table(["Model", "Alignment", "Pairs", "Safety flips", "Safety rate", "Capability flips",
                  "Capability rate", "Label-flip rate", "Text-change rate"], rows), "",
           f"- Pooled safety flip rate {rate_ci(pooled['safety'])} vs capability {rate_ci(pooled['capability'])}: "
           f"safety/capability ratio "
           + (f"{num(pooled['safety_capability_ratio'], '.2f')}x." if not _nan(pooled["safety_capability_ratio"])
              else "undefined (no capability flips or no capability pairs)."),
           f"- One-way ANOVA of per-model label-flip rate by alignment type ({an_['k']} groups, {an_['n']} models): "
           + (f"F({an_['df_between']}, {an_['df_within']}) = {num(an_['F'])}, p = {pval(an_['p'])}, "
              f"eta² = {num(an_['eta_sq'])}." if not _nan(an_["F"]) else f"not computed ({an_['note']})."),
           f"- Pearson r between per-model text-change rate and label-flip rate ({pr['n']} models): "
           + (f"r = {num(pr['r'])}, p = {pval(pr['p'])}, bootstrap 95% CI [{num(pr['ci_lo'], '.2f')}, "
              f"{num(pr['ci_hi'], '.2f')}] ({pr['method']}, {pr['n_resamples']} paired resamples, seed {pr['seed']})."
              if not _nan(pr["r"]) else f"not computed ({pr['note']}).")]
    if b["models_without_alignment_type"]:
        out.append(f"- Models without an alignment type (left out of the ANOVA): "
                   f"{', '.join(b['models_without_alignment_type'])}.")
    if plot:
        out += ["", f"![Output instability vs label flips]({plot})"]
    return "\n".join(out)


def _study_c(c: Mapping[str, Any]) -> str:
    ft, tt, lt = c["flip_test"], c["text_test"], c["batch_labels"]["test"]

    def test_line(name: str, t: Mapping[str, Any]) -> str:
        if t["test"] == "none":
            return f"- {name}: nothing to test ({t['note']})."
        stat = "Fisher's exact test, odds ratio" if t["test"] == "fisher_exact" else f"chi-square ({t['dof']} df)"
        return (f"- {name}: {stat} = {num(t['statistic'])}, p = {pval(t['p'])}"
                + (f" ({t['note']})" if t.get("note") else "") + ".")

    out = ["## Study C: composition arms", "",
           f"Reference arm: **{c['reference']}**.", "",
           table(["Arm", "Pairs", "Label flips", "Label-flip rate", "Text changes", "Text-change rate"],
                 [[r["arm"], r["pairs"], r["label_flips"]["k"], rate_ci(r["label_flips"]), r["text_changes"]["k"],
                   rate_ci(r["text_changes"])] for r in c["arms"]]), "",
           test_line("Label flips across arms", ft), test_line("Text changes across arms", tt),
           test_line("Batch label distribution across arms", lt)]
    if c["mde"]:
        out += ["", f"Minimum detectable increase in label-flip rate over the reference arm (two-sided alpha "
                    f"{c['alpha']}, power {c['power']}, Cohen's h normal approximation):", "",
                table(["Arm", "Reference items", "Arm items", "Baseline rate", "MDE (pp)"],
                      [[m["arm"], m["n_reference"], m["n_arm"], pct(m["baseline"]), num(m["mde_pp"], ".1f")]
                       for m in c["mde"]]), "",
                f"Sensitivity of this run: effects smaller than {num(c['sensitivity_pp'], '.1f')} percentage points "
                f"cannot be ruled out."]
    return "\n".join(out)


def _adjudication(a: Mapping[str, Any]) -> str:
    return "\n".join([
        "## Adjudication", "",
        table(["Raw flips", "Genuine", "Artifact", "Skipped", "Not adjudicated", "Raw rate", "Corrected rate"],
              [[a["raw_flips"], a["genuine"], a["artifact"], a["skipped"], a["unadjudicated"], rate_ci(a["raw_rate"]),
                rate_ci(a["corrected_rate"])]]), "",
        "Corrected rate = genuine flips / all pairs.", "",
        table(["Domain", "Pairs", "Raw flips", "Genuine", "Corrected rate"],
              [[d["value"], d["pairs"], d["raw_flips"], d["genuine"]["k"], rate_ci(d["genuine"])]
               for d in a["by_domain"]])])


def _repeat_sentence(rd: Mapping[str, Any]) -> str:
    parts = []
    for cond in ("solo", "batch"):
        t, lab = rd[cond]["text"], rd[cond]["label"]
        if t["n"]:
            parts.append(f"{cond} repeats > 0 differ in text from repeat 0 in {t['k']} of {t['n']} comparisons "
                         f"({rate_ci(t)}; label differs in {lab['k']})")
    if not parts:
        return "No repeats were run, so run-to-run disagreement is not measured."
    return "The same request differs from itself: " + "; ".join(parts) + "."


def _prefix_cached_disagreement(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Backends whose repeats disagreed while vLLM's prefix caching was on (the default)."""
    return sorted({str(c["backend"]) for c in cells
                   if c["repeat_disagreement"]["k"] and str(c.get("backend_plugin")).startswith("vllm")
                   and (c.get("backend_config") or {}).get("prefix_caching") is not False})


def _cells(summary: Mapping[str, Any], plot: str | None, parallel: int = 1) -> str:
    rd = summary["repeat_disagreement"]
    out = ["## Per-cell invariance", "",
           _repeat_sentence(rd), ""]
    cached = _prefix_cached_disagreement(summary["cells"])
    if cached:
        out += [f"Repeats disagreed on {', '.join(cached)} with vLLM's prefix caching on (vLLM's default when the "
                f"option is unset): a repeat can reuse KV blocks that an earlier request computed under another "
                f"kernel shape, so its output "
                f"depends on what the server ran before, not only on the request. Set the backend option "
                f"`prefix_caching = false` to compute every request afresh.", ""]
    if parallel > 1:
        out += [f"Backend configurations ran up to {parallel} at a time on one machine (`--parallel {parallel}`): "
                f"tok/s describe the shared machine, not one configuration alone.", ""]
    rows = []
    for c in summary["cells"]:
        rows.append([c["cell"], _compact(c["backend_config"], 80), c["records"], c["pairs"] or "—",
                     rate_ci(c["text_changes"]), rate_ci(c["label_flips"]), num(c["first_divergence_median"], "g"),
                     rate_ci(c["repeat_disagreement"]), num(c["tokens_per_s_median"], ".1f")])
    out.append(table(["Cell", "Backend config", "Records", "Pairs", "Text-change rate vs solo", "Label-flip rate",
                      "Median first divergence", "Repeat disagreement", "tok/s (median per request)"], rows))
    if plot:
        out += ["", f"![Invariance heat-map]({plot})"]
    return "\n".join(out)


def _plugin_sections(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """Markdown from every ``report_sections`` hook implementation; a failing plugin is named, not fatal."""
    try:
        from .registry import get_registry

        pm = get_registry().pm
    except Exception as exc:  # the report must not depend on every plugin being importable
        return [], [f"plugin report sections were skipped: {type(exc).__name__}: {exc}"]
    sections, problems = [], []
    kwargs = {"summary": summary, "records": records}
    for impl in reversed(pm.hook.report_sections.get_hookimpls()):
        try:
            res = impl.function(**{k: kwargs[k] for k in impl.argnames if k in kwargs})
        except Exception as exc:
            problems.append(f"plugin '{impl.plugin_name}' failed in report_sections: {type(exc).__name__}: {exc}")
            continue
        if res:
            sections.append(str(res).strip())
    return sections, problems


# -- main -------------------------------------------------------------------------------------------------------
def build_summary(records: Sequence[Mapping[str, Any]], adjudications: Mapping[str, str] | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Core summary plus the Study B / C / D parts that apply to these records."""
    pairs = an.pair(records)
    summary = an.summarize(records, adjudications)
    summary["ok_by_backend"] = {str(r["value"]): sum(1 for p in pairs if p["ok"] and str(p["backend"]) ==
                                                     str(r["value"])) for r in summary["breakdowns"]["backend"]}
    summary["study_d"] = [an.compare_backends(records, a, b, pairs=pairs)
                          for a, b, _ in an.comparable_backends(records, pairs)]
    if len(summary["counts"]["models"]) >= 2:
        summary["study_b"] = an.study_b(records, seed=seed, pairs=pairs)
    if any(r.get("arm") is not None for r in records):
        summary["study_c"] = an.composition(records, pairs=pairs)
    return summary


def write_report(run_dir: str | Path, seed: int = 0, plots: bool = True) -> Path:
    """Write ``report.md``, ``summary.json`` and ``plots/*.png`` into ``run_dir``; return the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the directory `evalhost run` created")
    records = _read_records(run_dir)
    if not records:
        raise UserError(f"{run_dir / 'records.jsonl'} holds no records; run the study (or resume it) first")
    manifest = _read_manifest(run_dir)
    adjudications = _read_adjudications(run_dir)
    summary = build_summary(records, adjudications, seed=seed)
    summary["run"] = {"run_dir": run_dir.name,
                      "study": manifest.get("study") or next((r.get("study") for r in records if r.get("study")), None),
                      "status": manifest.get("status"), "fingerprints": manifest.get("fingerprints") or {},
                      "evidence": manifest.get("evidence") or {}, "plugins": manifest.get("plugins")}

    notes: list[str] = []
    made: dict[str, str] = {}
    if plots:
        made = _make_plots(run_dir, summary, notes)
    show_cells = summary["counts"]["backend_configs"] > 1 or summary["counts"]["max_repeat"] > 0

    parts = [_header(run_dir, manifest, summary)]
    from .validate import prompts_across_backends

    warnings = prompts_across_backends(records)
    if warnings:
        parts.append("**Warning:** " + "; ".join(warnings) + ".")
    if summary["counts"]["pairs"]:
        parts += [_headline(summary), _breakdowns(summary, made), _distributions(summary, made)]
    else:
        parts.append("## Headline: batch vs solo\n\nNo batch record has its solo record (same model, backend, task, "
                     "item, repeat 0) yet, so there are no pairs to compare; run or resume the study's solo cells.")
    if summary["study_d"]:
        detail = len(summary["study_d"]) <= 3
        parts.append("## Study D: paired backend comparison\n\nThe same rows under two backends; each row's label "
                     "flip / text change is paired across backends and tested with the exact McNemar test.")
        parts += [_study_d(c, made.get(f"study_d_{i}"), detail) for i, c in enumerate(summary["study_d"])]
    if "study_b" in summary:
        parts.append(_study_b(summary["study_b"], made.get("study_b")))
    if "study_c" in summary and summary["study_c"]["arms"]:
        parts.append(_study_c(summary["study_c"]))
    if "adjudication" in summary:
        parts.append(_adjudication(summary["adjudication"]))
    if show_cells:
        parallel = int((manifest.get("executor") or {}).get("parallel") or 1)
        parts.append(_cells(summary, made.get("invariance"), parallel))
    sections, problems = _plugin_sections(summary, records)
    parts += sections
    notes += problems
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))

    report = run_dir / "report.md"
    report.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    summary["plots"] = made
    summary["notes"] = notes
    (run_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n",
                                          encoding="utf-8")
    return report


def _make_plots(run_dir: Path, summary: Mapping[str, Any], notes: list[str]) -> dict[str, str]:
    """Draw every applicable plot; a plot that fails becomes a note, not a failed report."""
    try:
        from . import plots as pl
    except Exception as exc:
        notes.append(f"plots were skipped: {type(exc).__name__}: {exc}")
        return {}
    pdir = run_dir / "plots"
    jobs: list[tuple[str, Callable[[], Path | None]]] = []
    for field in ("model", "task", "dispatcher"):
        rows = summary["breakdowns"][field]
        jobs.append((field, lambda rows=rows, field=field: pl.rates_with_ci(
            rows, f"Batch vs solo by {field}", pdir / f"rates_by_{field}.png")))
    jobs.append(("label_pairs", lambda: pl.label_pair_heatmap(summary["label_pairs"], pdir / "label_pairs.png")))
    jobs.append(("divergence", lambda: pl.divergence_histogram(summary["first_divergence"]["positions"],
                                                               pdir / "first_divergence.png")))
    for i, cmp in enumerate(summary["study_d"]):
        jobs.append((f"study_d_{i}", lambda cmp=cmp, i=i: pl.paired_bars(cmp, pdir / f"study_d_{i}.png")))
    if "study_b" in summary:
        jobs.append(("study_b", lambda: pl.study_b_scatter(summary["study_b"]["models"],
                                                           summary["study_b"]["pearson_text_vs_flip"],
                                                           pdir / "study_b_scatter.png")))
    if summary["counts"]["backend_configs"] > 1 or summary["counts"]["max_repeat"] > 0 or summary["study_d"]:
        jobs.append(("invariance", lambda: pl.invariance_heatmap(summary["invariance_grid"],
                                                                 pdir / "invariance.png")))
    made = {}
    for name, job in jobs:
        try:
            path = job()
        except Exception as exc:
            notes.append(f"plot '{name}' failed: {type(exc).__name__}: {exc}")
            continue
        if path is not None:
            made[name] = path.relative_to(run_dir).as_posix()
    return made
