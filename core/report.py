"""``report.md`` + ``summary.json`` + ``plots/*.png`` for a run directory. Reads records only (no torch).

Tables reuse the shapes of the Study D addendum (``Mode | Records | OK | Label flips | Label-flip rate | Text changes
| Text-change rate``, paired discordance tables, per-slice breakdowns, score-pair distributions).

Rendering is split by part: ``report_format`` (numbers, tables, the plain-language sentence), ``report_header`` (run
table, stack fingerprints), ``report_headline`` (headline per backend, breakdowns, label matrices per scorer),
``report_study_d`` (the addendum's tables) and ``report_studies`` (Studies B and C). Every rate is over comparable
pairs; the manifest's ``flip_on`` ("label" by default) says what a flip is.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import analysis as an
from . import report_studies, report_study_d
from .analysis_margins import section as margins_section
from .analysis_screen import section as screen_section
from .report_imported import section as imported_section
from .errors import UserError
from .report_format import (_cell, _nan, compact as _compact, json_safe as _json_safe, num, pct,  # noqa: F401
                            not_comparable_text, pval, rate_ci, table)
from .report_header import header as _header
from .report_headline import breakdown_table, flip_words, headline as _headline, rate_header

VERDICTS = ("genuine", "artifact", "skip")


# -- inputs -----------------------------------------------------------------------------------------------------
def _read_records(run_dir: Path) -> "an.RunRecords":
    """The run's records as a re-iterable stream (:class:`evalhost.analysis_run.RunRecords`), never a list: each
    pass reads the file with evalhost.records' bounds (line length, gzip ratio, no links); a record whose shape
    analysis cannot use (a list as a key, a dict as a label, a non-object line) is one UserError."""
    from .records import find_records

    return an.RunRecords(find_records(run_dir))


def _read_adjudications(run_dir: Path) -> dict[str, str]:
    from .adjudicate import load_adjudications  # size-bounded, no links followed

    out = {}
    for k, v in dict(load_adjudications(run_dir) or {}).items():
        verdict = v.get("verdict") if isinstance(v, Mapping) else v
        if verdict in VERDICTS:
            out[str(k)] = str(verdict)
    return out


_MANIFEST_SHAPE = {"fingerprints": dict, "evidence": dict, "backend_fingerprints": dict, "executor": dict,
                   "resumes": list}


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    """manifest.json (size-limited, a regular file, an object) or {} when absent; a wrong shape is a UserError."""
    from .rundir import MANIFEST, RunDir

    data = RunDir(run_dir).read_json(MANIFEST, default={})
    for field, typ in _MANIFEST_SHAPE.items():
        if data.get(field) is not None and not isinstance(data[field], typ):
            raise UserError(f"{run_dir / MANIFEST} has a {type(data[field]).__name__} as '{field}', not a "
                            f"{typ.__name__}; restore it from the run or delete it to report without the run header")
    return data


# -- sections ---------------------------------------------------------------------------------------------------
BREAKDOWN_TITLES = {"model": "Model", "domain": "Domain", "task": "Task", "dispatcher": "Dispatcher",
                    "batch_size": "Batch size", "phase": "Phase", "original_direction": "Original direction",
                    "backend": "Backend"}


def _breakdowns(summary: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    noun, _ = flip_words(summary.get("flip_on") or "label")
    out = ["## Breakdowns"]
    for field, title in BREAKDOWN_TITLES.items():
        rows = summary["breakdowns"].get(field) or []
        if (len(rows) < 2 and field not in ("model", "task") and field not in plots) or \
                all(r["value"] is None for r in rows):
            continue
        out += ["", f"### By {title.lower()}", "", breakdown_table(rows, title, noun)]
        if field in plots:
            out += ["", f"![Flip and text-change rate by {title.lower()}]({plots[field]})"]
    if summary["directions"]:
        out += ["", "### Direction of label flips" + (" (`unchanged`: the score changed, the label did not)"
                                                     if summary.get("flip_on") == "score" else ""), "",
                table(["Direction", "Domain", "Flips"],
                      [[d["direction"], d["domain"], d["count"]] for d in summary["directions"]])]
    return "\n".join(out)


def _distributions(summary: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    by_scorer = summary.get("label_pairs_by_scorer") or []
    out = ["## Solo -> batch label pairs", "",
           "Comparable pairs only, one matrix per scorer (labels of different scorers are never mixed); "
           "off-diagonal rows are label changes."]
    for i, s in enumerate(by_scorer):
        out += ["", f"### Scorer {s['scorer']}", "",
                table(["Solo label", "Batched label", "Pairs"], [[p["solo"], p["batch"], p["count"]]
                                                                 for p in s["pairs"]])]
        if f"label_pairs_{i}" in plots:
            out += ["", f"![Solo to batch label matrix, scorer {s['scorer']}]({plots[f'label_pairs_{i}']})"]
    fd = summary["first_divergence"]
    if fd["n"]:
        out += ["", "### First divergent token", "",
                f"{fd['n']} text-changed pairs have token ids; the median first divergent output token is at index "
                f"{num(fd['median'], 'g')}."]
        if "divergence" in plots:
            out += ["", f"![First divergent token positions]({plots['divergence']})"]
    return "\n".join(out)


def _adjudication(a: Mapping[str, Any]) -> str:
    return "\n".join([
        "## Adjudication", "",
        table(["Raw flips", "Genuine", "Artifact", "Skipped", "Not adjudicated", "Raw rate", "Corrected rate"],
              [[a["raw_flips"], a["genuine"], a["artifact"], a["skipped"], a["unadjudicated"], rate_ci(a["raw_rate"]),
                rate_ci(a["corrected_rate"])]]), "",
        "Corrected rate = genuine flips / comparable pairs.", "",
        table(["Domain", "Comparable pairs", "Raw flips", "Genuine", "Corrected rate"],
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
    noun, _ = flip_words(summary.get("flip_on") or "label")
    nc = any("not_comparable" in c for c in summary["cells"])
    for c in summary["cells"]:
        rows.append([c["cell"], _compact(c["backend_config"], 80), c["records"], c["pairs"] or "—"]
                    + ([not_comparable_text(c.get("not_comparable"))] if nc else [])
                    + [rate_ci(c["text_changes"]), rate_ci(c["label_flips"]), num(c["first_divergence_median"], "g"),
                       rate_ci(c["repeat_disagreement"]), num(c["tokens_per_s_median"], ".1f")])
    out.append(table(["Cell", "Backend config", "Records", "Comparable pairs"] + (["Not comparable"] if nc else [])
                     + ["Text-change rate vs solo", rate_header(noun), "Median first divergence",
                        "Repeat disagreement", "tok/s (median per request)"], rows))
    if plot:
        out += ["", f"![Invariance heat-map]({plot})"]
    return "\n".join(out)


def _study_dict(run_dir: Path) -> dict[str, Any] | None:
    """The run's study.toml parsed (size-limited, no links), or None when absent or not valid TOML."""
    from .rundir import STUDY, RunDir

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(RunDir(run_dir).read_bytes(STUDY, 16 * 2**20).decode("utf-8"))
    except (UserError, OSError, UnicodeDecodeError, ValueError):
        return None


def _plugin_sections(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]], run_dir: Path,
                     manifest: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Markdown from every ``report_sections`` hook implementation; a failing plugin is named, not fatal. Each
    implementation gets only the arguments it names (summary, records, run_dir, manifest, study: see
    :func:`evalhost.hookspecs.report_sections`), as pluggy calls it."""
    try:
        from .registry import get_registry

        pm = get_registry().pm
    except Exception as exc:  # the report must not depend on every plugin being importable
        return [], [f"plugin report sections were skipped: {type(exc).__name__}: {exc}"]
    from .rundir import RunDir

    sections, problems = [], []
    impls = list(reversed(pm.hook.report_sections.get_hookimpls()))
    study = _study_dict(run_dir) if any("study" in i.argnames for i in impls) else None
    kwargs = {"summary": summary, "records": records, "run_dir": RunDir(run_dir), "manifest": dict(manifest),
              "study": study}
    for impl in impls:
        try:
            res = impl.function(**{k: kwargs[k] for k in impl.argnames if k in kwargs})
        except Exception as exc:
            problems.append(f"plugin '{impl.plugin_name}' failed in report_sections: {type(exc).__name__}: {exc}")
            continue
        if res:
            sections.append(str(res).strip())
    return sections, problems


# -- main -------------------------------------------------------------------------------------------------------
def build_summary(records: Sequence[Mapping[str, Any]] | "an.RunRecords",
                  adjudications: Mapping[str, str] | None = None, seed: int = 0,
                  flip_on: str = "label") -> dict[str, Any]:
    """Core summary plus the Study B / C / D parts and the margins that apply to these records (a list, or the
    stream :func:`_read_records` returns); ``flip_on`` ("label" | "score") says what a flip is.  The passes and
    what they hold: :mod:`evalhost.analysis_run`."""
    return an.summarize_run(records, adjudications, seed=seed, flip_on=flip_on).summary


def _render(run_dir: Path, manifest: Mapping[str, Any], summary: Mapping[str, Any],
            records: Sequence[Mapping[str, Any]], made: Mapping[str, str], notes: list[str]) -> list[str]:
    """The sections of report.md, in order; every plot in ``made`` is linked from one of them."""
    show_cells = (summary["counts"]["backend_configs"] > 1 or summary["counts"]["max_repeat"] > 0
                  or "invariance" in made or any(any((c.get("not_comparable") or {}).values())
                                                 for c in summary["cells"]))
    parts = [_header(run_dir, manifest, summary, records.fingerprint_rows)]  # records: an.RunRecords
    warnings = records.prompt_warnings
    if warnings:
        parts.append("**Warning:** " + "; ".join(warnings) + ".")
    if summary["counts"]["pairs"]:
        parts += [_headline(summary), _breakdowns(summary, made), _distributions(summary, made)]
    else:
        parts.append("## Headline: batch vs solo\n\nNo batch record has its solo record (same model, backend, task, "
                     "item, repeat 0) yet, so there are no pairs to compare; run or resume the study's solo cells.")
    parts += [s for s in [imported_section(manifest.get("imported")), margins_section(summary.get("margins")),
                          screen_section(summary.get("screen"), manifest.get("screen"))] if s]
    parts += report_study_d.section(summary["study_d"], made, summary.get("flip_on") or "label")
    if "study_b" in summary:
        parts.append(report_studies.study_b(summary["study_b"], made))
    if "study_c" in summary and summary["study_c"]["arms"]:
        parts.append(report_studies.study_c(summary["study_c"]))
    if "adjudication" in summary:
        parts.append(_adjudication(summary["adjudication"]))
    if show_cells:
        parallel = int((manifest.get("executor") or {}).get("parallel") or 1)
        parts.append(_cells(summary, made.get("invariance"), parallel))
    sections, problems = _plugin_sections(summary, records, run_dir, manifest)
    parts += sections
    notes += problems
    text = "\n\n".join(parts)
    unlinked = [rel for rel in made.values() if f"]({rel})" not in text]
    if unlinked:  # a safety net: every plot written is linked
        parts.append("## Other plots\n\n" + "\n\n".join(f"![{rel}]({rel})" for rel in unlinked))
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    return parts


def write_report(run_dir: str | Path, seed: int = 0, plots: bool = True) -> Path:
    """Write ``report.md``, ``summary.json``, ``plots/*.png`` and ``report.html`` into ``run_dir``; return the
    report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the directory `evalhost run` created")
    records = _read_records(run_dir)  # a stream: the analysis keeps a compact projection (evalhost.analysis_run)
    if not records:
        raise UserError(f"{run_dir / 'records.jsonl'} holds no records; run the study (or resume it) first")
    manifest = _read_manifest(run_dir)
    adjudications = _read_adjudications(run_dir)
    analysis = an.summarize_run(records, adjudications, seed=seed, flip_on=manifest.get("flip_on") or "label")
    summary = analysis.summary
    summary["run"] = {"run_dir": run_dir.name,
                      "study": manifest.get("study") or analysis.study,
                      "status": manifest.get("status"), "fingerprints": manifest.get("fingerprints") or {},
                      "evidence": manifest.get("evidence") or {}, "plugins": manifest.get("plugins")}

    notes: list[str] = []
    made: dict[str, str] = {}
    if plots:
        made = _make_plots(run_dir, summary, notes)
    parts = _render(run_dir, manifest, summary, records, made, notes)

    from .rundir import REPORT, SUMMARY, RunDir

    report = RunDir(run_dir).write_atomic(REPORT, "\n\n".join(parts) + "\n")  # temp + rename, links refused
    summary["plots"] = made
    summary["notes"] = notes
    RunDir(run_dir).write_atomic(SUMMARY, json.dumps(_json_safe(_for_summary_json(summary)), indent=2,
                                                     allow_nan=False) + "\n")
    from .report_html import write_html

    write_html(run_dir, summary, analysis.changed_records, analysis.changed_pairs,  # report.html, atomic
               imported=manifest.get("imported"))
    return report


def _for_summary_json(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    """summary.json holds the aggregates; the per-change margin rows (one per text change: tens of thousands on a
    large run, ~90 MiB to serialise at 50,000) are shown in report.html and recomputable from the records."""
    margins = summary.get("margins")
    if not isinstance(margins, Mapping) or "rows" not in margins:
        return summary
    kept = {k: v for k, v in margins.items() if k != "rows"}
    kept["rows_in"] = "report.html"
    return {**summary, "margins": kept}


def _slug(name: Any) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(name)).strip("_") or "x"


def _make_plots(run_dir: Path, summary: Mapping[str, Any], notes: list[str]) -> dict[str, str]:
    """Draw every applicable plot; a plot that fails becomes a note, not a failed report."""
    try:
        from . import plots as pl
    except Exception as exc:
        notes.append(f"plots were skipped: {type(exc).__name__}: {exc}")
        return {}
    import shutil
    import tempfile

    from .rundir import PLOTS, RunDir

    rd = RunDir(run_dir)
    rd.subdir(PLOTS)  # a real directory: a link named plots/ is refused, never drawn through
    pdir = Path(tempfile.mkdtemp(prefix=".plots-", dir=run_dir))  # drawn here, then renamed into plots/
    jobs: list[tuple[str, Callable[[], Path | None]]] = []
    for field in ("model", "task", "dispatcher"):
        rows = summary["breakdowns"][field]
        jobs.append((field, lambda rows=rows, field=field: pl.rates_with_ci(
            rows, f"Batch vs solo by {field}", pdir / f"rates_by_{field}.png")))
    by_scorer = summary.get("label_pairs_by_scorer") or []
    for i, sc in enumerate(by_scorer):
        name = "label_pairs.png" if len(by_scorer) == 1 else f"label_pairs_{_slug(sc['scorer'])}.png"
        jobs.append((f"label_pairs_{i}", lambda sc=sc, name=name: pl.label_pair_heatmap(
            sc["pairs"], pdir / name, title=f"scorer {sc['scorer']}: solo -> batch labels (off-diagonal = changes)")))
    jobs.append(("divergence", lambda: pl.divergence_histogram(summary["first_divergence"]["positions"],
                                                               pdir / "first_divergence.png")))
    for i, cmp in enumerate(summary["study_d"]):
        jobs.append((f"study_d_{i}", lambda cmp=cmp, i=i: pl.paired_bars(cmp, pdir / f"study_d_{i}.png")))
    if "study_b" in summary:
        blocks = report_studies.study_b_backends(summary["study_b"])
        for i, blk in enumerate(blocks):
            name = "study_b_scatter.png" if len(blocks) == 1 else f"study_b_scatter_{_slug(blk['backend'])}.png"
            jobs.append((f"study_b_{i}", lambda blk=blk, name=name: pl.study_b_scatter(
                blk["models"], blk["pearson_text_vs_flip"], pdir / name, title=f"backend {blk['backend']}")))
    if summary["counts"]["backend_configs"] > 1 or summary["counts"]["max_repeat"] > 0 or summary["study_d"]:
        jobs.append(("invariance", lambda: pl.invariance_heatmap(summary["invariance_grid"],
                                                                 pdir / "invariance.png")))
    made = {}
    try:
        for name, job in jobs:
            try:
                path = job()
            except Exception as exc:
                notes.append(f"plot '{name}' failed: {type(exc).__name__}: {exc}")
                continue
            if path is not None:
                made[name] = rd.move_in(path, path.name, PLOTS).relative_to(run_dir).as_posix()
    finally:
        shutil.rmtree(pdir, ignore_errors=True)
    return made
