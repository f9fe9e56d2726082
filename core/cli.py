"""The ``evalhost`` command line. Heavy modules are imported inside commands so ``--help`` stays fast."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import RunError, UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="evalhost")
def cli() -> None:
    """Batch-composition studies: does an output (and its label) change solo vs batched?"""


@cli.command()
@click.argument("study", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the expanded plan (cells, generations) and exit.")
@click.option("--resume", "resume", type=click.Path(file_okay=False, path_type=Path),
              help="Finish an interrupted run in RUN_DIR (no duplicates).")
@click.option("--executor", default="local", show_default=True, help="local, ray, or a plugin's executor.")
@click.option("--address", default=None, help="Ray cluster address (ray executor); default: start a local Ray.")
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="local executor: run up to N backend configurations at the same time (they share the machine).")
@click.option("--target-mde", type=float, default=None,
              help="With --dry-run: items per composition arm needed to detect this effect (percentage points).")
@click.option("--baseline", type=float, default=None,
              help="Baseline flip rate in percent for --target-mde (default: worst case, an upper bound).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Cap every task at N items (a quick trial of a large study; kept on --resume).")
@click.option("--no-report", is_flag=True, help="Do not write report.md at the end.")
@click.option("--quiet", is_flag=True, help="No progress bar (on a terminal) or progress lines (otherwise).")
@click.option("--no-solo-cache", is_flag=True, help="Always generate solo baselines (do not reuse cached ones).")
@click.option("--screen", "screen_k", type=int, default=None, metavar="K",
              help="Solo screening pass with top-k logprobs first, then batch-test only the K most fragile items "
                   "per task (evalhost.screen).")
def run(study, dry_run, resume, executor, address, parallel, target_mde, baseline, limit, no_report, quiet,
        no_solo_cache, screen_k):
    """Run STUDY (a TOML file); records go to a new run directory."""
    import os

    from .runner import run_file

    if no_solo_cache:
        os.environ["EVALHOST_SOLO_CACHE"] = "0"

    if address and executor == "local":
        raise UserError("--address is the Ray cluster to run on; add --executor ray (the local executor runs here)")
    opts = {"address": address} if address else {}
    if parallel is not None:
        if executor != "local":
            raise UserError(f"--parallel is an option of the local executor; the {executor} executor places "
                            f"backend configurations itself (drop --parallel)")
        opts["parallel"] = parallel
    n = None if target_mde is None else _mde_items(target_mde, baseline)  # refused before anything runs
    if screen_k is not None:
        from .screen import run_screened

        run_screened(study, screen_k, resume=resume, dry_run=dry_run, limit=limit, executor=executor,
                     executor_options=opts, progress=not quiet, report=not no_report, out=click.echo)
    else:
        run_file(study, resume=resume, executor=executor, executor_options=opts, dry_run=dry_run,
                 progress=not quiet, report=not no_report, out=click.echo, limit=limit)
    if target_mde is not None:
        base = "the worst-case baseline (an upper bound)" if baseline is None else f"a {baseline:g}% baseline"
        click.echo(f"to detect a {target_mde:g} pp difference between two composition arms over {base} "
                   f"(80% power, alpha 0.05, two-sided) you need about {n} items per arm")


MAX_MDE_ITEMS = 10 ** 7  # items per arm beyond which --target-mde is refused (no study runs that many)


def _mde_items(target_mde: float, baseline: float | None) -> int:
    """Items per arm for ``--target-mde`` (percentage points) over ``--baseline`` (percent); one UserError sentence
    for values out of range or an effect so small that more than MAX_MDE_ITEMS items would be needed (the normal
    approximation is checked first, so the exact search never runs for hours)."""
    import math
    from statistics import NormalDist

    from .stats import cohens_h, items_needed

    if not math.isfinite(target_mde) or not 0 < target_mde <= 100:
        raise UserError(f"--target-mde {target_mde:g} is not a difference in percentage points between 0 and 100; "
                        f"give e.g. --target-mde 5")
    if baseline is not None and (not math.isfinite(baseline) or not 0 <= baseline < 100):
        raise UserError(f"--baseline {baseline:g} is not a flip rate in percent in [0, 100); give e.g. --baseline 2")
    p1 = 0.5 - target_mde / 200.0 if baseline is None else baseline / 100.0
    p2 = p1 + target_mde / 100.0
    if p2 > 1.0:
        raise UserError(f"--baseline {baseline:g} plus --target-mde {target_mde:g} exceeds 100%; lower one of them")
    h = abs(cohens_h(p1, p2))
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    approx = 2 * (z / h) ** 2 if h > 0 else math.inf
    if approx > MAX_MDE_ITEMS:
        shown = f"about {approx:.1e}" if math.isfinite(approx) else "infinitely many"
        raise UserError(f"--target-mde {target_mde:g} would need {shown} items per arm, more than the "
                        f"{MAX_MDE_ITEMS:.0e} this estimate supports; ask for a larger difference")
    try:
        return items_needed(target_mde, None if baseline is None else baseline / 100.0)
    except ValueError as exc:
        raise UserError(f"--target-mde/--baseline: {exc}") from None


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def plugins(as_json):
    """List every plugin with its distribution, version, the hooks it implements and the names it registers.

    EVALHOST_LOAD_PLUGINS=a,b loads only those third-party plugins (empty: none)."""
    from .registry import get_registry

    reg = get_registry()
    entries = sorted([*reg.entries.values(), *(e for rivals in reg.contested.values() for e in rivals)],
                     key=lambda e: (e.kind, e.name, e.distribution))
    names = [{"kind": e.kind, "name": e.name, "plugin": e.plugin, "distribution": e.distribution,
              "version": e.version, **({"contested": True} if (e.kind, e.name) in reg.contested else {})}
             for e in entries]
    rows = [{**p, "registers": [{"kind": e.kind, "name": e.name} for e in entries if e.plugin == p["name"]
                                and e.distribution == p["distribution"]]} for p in reg.plugins]
    if as_json:
        # "plugins": one row per registered name (kind, name, plugin, distribution, version); "modules": one row
        # per loaded plugin with the hooks it implements and the names it registers (a report_sections-only
        # plugin is there too); "problems": plugins left out or contested names
        click.echo(json.dumps({"plugins": names, "modules": rows, "problems": reg.problems}, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']}  ({r['distribution']} {r['version']})")
        click.echo(f"  hooks: {', '.join(r['hooks']) or 'none'}")
        if r["registers"]:
            click.echo("  registers: " + ", ".join(f"{x['kind'].replace('_', ' ')} {x['name']}"
                                                   + (" (contested)" if (x["kind"], x["name"]) in reg.contested
                                                      else "") for x in r["registers"]))
    for p in reg.problems:
        click.echo(f"problem: {p}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def report(run_dir):
    """Write report.md, summary.json and plots for RUN_DIR."""
    from .report import write_report

    from .records import find_records

    find_records(run_dir)
    click.echo(f"report: {write_report(run_dir)}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def validate(run_dir, as_json):
    """Check RUN_DIR's records: schema, duplicates, pairing, fingerprints (exit 1 on any error)."""
    from .validate import validate_run

    result = validate_run(run_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:  # messages quote keys and values from the records: control characters are escaped, never sent raw
        click.echo(one_line(f"{result['records']} records ({result.get('solo', 0)} solo, {result.get('batch', 0)} "
                            f"batch) in {result.get('cells', 0)} cells; run status: {result.get('status')}"))
        for w in result.get("warnings", []):
            click.echo(f"warning: {one_line(w)}")
        for e in result["errors"]:
            click.echo(f"error: {one_line(e)}")
        click.echo("ok" if not result["errors"] else f"{result.get('error_count', len(result['errors']))} error(s)")
    if result["errors"]:
        sys.exit(1)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--text-changes", is_flag=True, help="Also export text-change rows (marked kind=text_change).")
def candidates(run_dir, output, text_changes):
    """Export RUN_DIR's flip rows for a follow-up study (Study D reads them with source = "candidates:FILE")."""
    from .analysis import export_candidates
    from .records import find_records, read_records

    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"the folder of {str(output)[:120]!r} does not exist; create it first or write the candidates "
                        f"file elsewhere")
    if output.exists() or output.is_symlink():
        raise UserError(f"{output} exists; choose another file name (candidate files are never overwritten)")
    rows = export_candidates(read_records(find_records(run_dir), checked=True))  # a missing run: one sentence
    if not text_changes:
        rows = [r for r in rows if r.get("kind", "label_flip") == "label_flip"]
    _write_new_file(output, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    click.echo(f"{len(rows)} candidate rows -> {output}")


def _write_new_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` that must not exist: a temp file in the same folder, then a hard link to the name
    (which fails instead of replacing anything created meanwhile). A problem is one UserError sentence."""
    import os
    import tempfile

    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent or ".")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    except FileExistsError:
        raise UserError(f"{path} exists; choose another file name (candidate files are never overwritten)") from None
    except OSError as exc:
        raise UserError(f"cannot write {str(path)[:120]!r} ({exc.strerror}); choose a folder you may write to") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@cli.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "run_dir", type=click.Path(path_type=Path), required=True,
              help="The run directory to create (must not exist).")
@click.option("--from", "source", type=click.Choice(["evalhost", "lm-eval", "inspect"]), default="evalhost",
              show_default=True, help="evalhost: one FILE in evalhost's import format; lm-eval / inspect: two files "
              "of one task, SOLO then BATCH (lm-eval --log_samples samples_*.jsonl, or inspect .eval/.json logs).")
@click.option("--metric", default=None, help="lm-eval / inspect: the per-sample metric (lm-eval) or scorer "
              "(inspect) whose value is each sample's label (default: the first the file names).")
@click.option("--flip-on", type=click.Choice(["label", "score"]), default="label", show_default=True,
              help="What the report counts as a flip: a label change, or a score change (e.g. 0.5 -> 1.0).")
@click.option("--study", "study_name", default=None, help="Study name in the records (default: FILE's stem).")
@click.option("--no-report", is_flag=True, help="Do not write report.md after importing.")
def import_(files, run_dir, source, metric, flip_on, study_name, no_report):
    """Import results made elsewhere as a run directory.

    \b
    evalhost import FILE -o RUN_DIR                                  (JSONL or CSV, one row per row_id and mode)
    evalhost import --from lm-eval SOLO.jsonl BATCH.jsonl -o RUN_DIR (two lm-eval --log_samples files of one task)
    evalhost import --from inspect SOLO.eval BATCH.eval -o RUN_DIR   (two inspect logs of one task)
    """
    from .importer import import_file, import_pair

    if source == "evalhost" and len(files) != 1:
        raise UserError(f"evalhost import takes one FILE in evalhost's format but got {len(files)}; for two lm-eval "
                        f"or inspect files add --from lm-eval or --from inspect (the solo run's file first)")
    if source != "evalhost" and len(files) != 2:
        raise UserError(f"evalhost import --from {source} takes two files, SOLO then BATCH, but got {len(files)}; "
                        f"pass the solo run's file, then the batch run's")
    if source != "evalhost":
        from .import_bridge import describe
        from .report import write_report

        result = import_pair(source, files[0], files[1], run_dir, flip_on=flip_on, study=study_name, metric=metric)
        for line in describe(result, (files[0], files[1])):
            click.echo(line)
        if not no_report:
            click.echo(f"report: {write_report(result['run_dir'])}")
        return
    if metric is not None:
        raise UserError("--metric is for --from lm-eval or --from inspect; evalhost's format carries its labels")
    path, rows, records = import_file(files[0], run_dir, flip_on=flip_on, study=study_name)
    click.echo(f"imported {rows} rows -> {records} records in {path} (flip_on = {flip_on})")
    if not no_report:
        from .importer import study_d_section
        from .report import write_report

        report_path = write_report(path)
        section = study_d_section(report_path.read_text(encoding="utf-8"))
        if section:
            click.echo("\n" + section + "\n")
        click.echo(f"report: {report_path}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["inspect"]), required=True,
              help="inspect: an inspect_ai log (needs pip install 'evalhost[inspect]').")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The file to write: FILE.eval (or FILE.json).")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
def export(run_dir, fmt, output, force):
    """Write RUN_DIR in another tool's format: one inspect sample per solo/batch pair (`inspect view` browses it)."""
    from .export_inspect import export_inspect

    path, n = export_inspect(run_dir, output, force=force)
    click.echo(f"exported {n} solo/batch pairs -> {path} (inspect log; open it with `inspect view`)")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--scorer", default=None, help="Score every record with this scorer (default: each task's own).")
def rescore(run_dir, scorer):
    """Score RUN_DIR's stored outputs again (no generation) and rewrite the report.

    \b
    For a fixed scorer, or records with a scorer_error. The labels it replaces are kept: one line per rescore
    in RUN_DIR/rescore-history.jsonl (each changed record's key, old and new label/score/rationale/scorer_error),
    written before the new records file replaces the old one by rename (records.jsonl, or records.jsonl.gz when
    archived; never edited in place). Holds the run directory's lock; safe against kill -9 (run it again).
    """
    from .rescore import HISTORY, rescore_run

    result = rescore_run(run_dir, scorer=scorer)
    now = f", {result['scorer_errors']} scorer error(s) now" if result["scorer_errors"] else ""
    if result["changed"]:
        click.echo(f"rescored {result['records']} records: {result['changed']} changed "
                   f"({result['scorer_errors_before']} had a scorer error{now}); old values in {run_dir / HISTORY}")
    else:
        click.echo(f"rescored {result['records']} records: nothing changed{now}")
    if result["report"]:
        click.echo(f"report: {result['report']}")


@cli.command()
@click.option("--url", default=None, help="A running OpenAI-compatible server (vLLM, SGLang, ...), e.g. "
              "http://127.0.0.1:8000.")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Or a TOML file with one [[models]] and one [[backends]]: the server is started as a study would.")
@click.option("--model", default=None, help="The served model to check (--url; default: the first listed).")
@click.option("--tokenizer", default=None, help="Local checkpoint whose chat template renders the prompts (--url; "
              "default: the server's model directory when it is on this machine).")
@click.option("--minutes", type=float, default=10.0, show_default=True, help="Time budget, start to verdicts.")
@click.option("--max-tokens", type=int, default=None, help="Tokens per output (default 64, or the config's).")
@click.option("--output-dir", default=None, help="Where the run directory goes (default runs/).")
@click.option("--stack", "stack", multiple=True, help="A stack fact the server does not expose, KEY=VALUE "
              "(e.g. gpu=H100, attention_backend=FLASH_ATTN, invariance_flag=1); repeatable.")
@click.option("--quiet", is_flag=True, help="No progress bar or progress lines.")
def preflight(url, config, model, tokenizer, minutes, max_tokens, output_dir, stack, quiet):
    """Check in minutes whether a served stack keeps batched outputs identical to solo ones (exit 1 if not)."""
    from .preflight import preflight as run_preflight

    code, _ = run_preflight(url=url, config=config, model=model, tokenizer=tokenizer, minutes=minutes,
                            max_tokens=max_tokens, output_dir=output_dir, stack_pairs=list(stack),
                            progress=not quiet, out=click.echo)
    sys.exit(code)


@cli.command()
@click.argument("name", default="builtin:smollm2-135m-instruct")
def model(name):
    """Prepare a model path now (converts the shipped SmolLM2 once) and print where it is."""
    from .models import resolve_model_path

    click.echo(resolve_model_path(name))


def _add_optional_commands() -> None:
    try:
        from .adjudicate import adjudicate
    except ImportError:
        return
    cli.add_command(adjudicate)


_add_optional_commands()


def one_line(text: str) -> str:
    """A user error is one line: line breaks and other control characters that came from the input are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


MAX_ERROR = 290  # characters of the one error line (a name or path from the input may be very long)


def _at_most(text: str, n: int = MAX_ERROR) -> str:
    """``text`` elided in the middle to ``n`` characters: the problem's start and the fix at the end stay."""
    return text if len(text) <= n else f"{text[:n - 105]} [...] {text[-100:]}"


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="evalhost", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C (the run loop has already said how to resume)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
    except UserError as exc:
        click.echo(f"error: {_at_most(one_line(str(exc)))}", err=True)
        sys.exit(exc.exit_code)
    except RunError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
