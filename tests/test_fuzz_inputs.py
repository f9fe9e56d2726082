"""Bad-input fuzzing (hypothesis): generated study TOMLs and task files through ``evalhost run STUDY --dry-run``.

Every generated case is classified before it runs (tests/fuzz_expect.py, written from the documented rules): a
valid input must exit 0, print a plan and write nothing to stderr; a bad one must exit 2 with exactly one line on
stderr starting with ``error: `` (besides the ``warning:`` lines for plugin problems the registry already knows
about). Never a traceback. A run directory made by a real toy run stays byte-identical after a ``--resume RUN_DIR`` attempt
with a bad study (or a bad task file behind the run's own study).

``evalhost.cli.main`` runs in process for speed; a timer turns a hang (e.g. a plan that never finishes expanding)
into a failure instead of a stuck test.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from evalhost import registry as reg_mod
from evalhost.testing import run_cli as cli_in_process
from fuzz_expect import Unclassified, items_scorer_problem, study_problem, task_file_problem
from toy import make_distribution, study_text, write_tasks

CALL_LIMIT_S = 60  # one dry run of a small study takes milliseconds; this only turns a real hang into a failure
FUZZ = settings(max_examples=int(os.environ.get("EVALHOST_FUZZ_EXAMPLES", 80)), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------------ running the CLI
class Hang(BaseException):
    """Raised by the timer; a BaseException so no ``except Exception`` in the code under test swallows it."""


@contextmanager
def _time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"evalhost did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)  # and again every 0.5 s, in case one lands in a gc callback
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``evalhost ARGV`` in process (:func:`evalhost.testing.run_cli`), within ``CALL_LIMIT_S``: (exit code, stdout,
    stderr). Any exception that escapes ``main`` (what a user would see as a traceback) fails the test with it."""
    try:
        with _time_limit(CALL_LIMIT_S):
            return cli_in_process(argv)
    except BaseException:  # noqa: BLE001 - a traceback (or a hang) is exactly what we look for
        escaped = traceback.format_exc()
    pytest.fail(f"`evalhost {' '.join(argv)}` raised instead of exiting with a message:\n{escaped}", pytrace=False)


def _event(label: str) -> None:
    try:
        event(label)  # shown by pytest --hypothesis-show-statistics
    except Exception:  # not inside a hypothesis test
        pass


def _known_warnings() -> set[str]:
    return {f"warning: {p}" for p in reg_mod.get_registry().problems}


def check_outcome(argv: list[str], what: str, expect_ok: bool = False) -> int:
    """Run ``evalhost ARGV``; a valid input (``expect_ok``) must exit 0 with a plan and a clean stderr, a bad one
    exit 2 with one ``error:`` sentence. Returns the exit code."""
    code, out, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line not in _known_warnings()]
    _event(f"exit {code}" + (f": {lines[0].split(': ')[-1][:40]}" if code and lines else ""))
    context = f"\n--- input ---\n{what}\n--- exit {code}; stderr ---\n{err}--- stdout ---\n{out[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in out, "a traceback reached the user" + context
    if expect_ok:
        assert code == 0, f"exit code {code}, expected 0 (the input is valid)" + context
        assert lines == [], "a successful dry run wrote to stderr" + context
        assert "generations" in out, "a successful dry run printed no plan" + context
        return code
    assert code == 2, f"exit code {code}, expected 2 (bad input)" + context
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}" + context
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: ") + 10, "not an 'error: ' sentence" + context
    return code


# ------------------------------------------------------------------------------------------------ TOML writer
class Raw(str):
    """A TOML literal written verbatim (e.g. a datetime)."""


DATETIME = Raw("1979-05-27T07:32:00Z")


def _tstr(s: str) -> str:
    # JSON string escapes are TOML basic-string escapes; DEL must be escaped in TOML as well
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _tval(v) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _tstr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_tval(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_tstr(k)} = {_tval(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _is_tables(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(data: dict) -> str:
    lines = [f"{_tstr(k)} = {_tval(v)}" for k, v in data.items() if not isinstance(v, dict) and not _is_tables(v)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"[{_tstr(k)}]")
            lines += [f"{_tstr(kk)} = {_tval(vv)}" for kk, vv in v.items()]
        elif _is_tables(v):
            for table in v:
                lines.append(f"[[{_tstr(k)}]]")
                lines += [f"{_tstr(kk)} = {_tval(vv)}" for kk, vv in table.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy plugin installed as a real distribution, a valid task file, a finished toy run directory."""
    root = tmp_path_factory.mktemp("fuzz")
    site = make_distribution(root / "site")
    sys.path.insert(0, str(site))
    reg_mod._REGISTRY = None
    try:
        tasks = write_tasks(root / "tasks.jsonl", 8)
        toy_tasks = write_tasks(root / "toy-tasks.jsonl", 8)
        toy_study = root / "toy.toml"
        toy_study.write_text(study_text(toy_tasks, root / "runs", (2, 4)) + "# the run's own study file\n")
        code, out, err = run_cli(["run", str(toy_study), "--quiet", "--no-report"])
        assert code == 0, err
        run_dir = Path(out.split("run directory: ")[1].split()[0])
        yield {"root": root, "tasks": tasks, "toy_tasks": toy_tasks, "toy_study": toy_study, "run_dir": run_dir,
               "scratch": root / "scratch"}
    finally:
        sys.path.remove(str(site))
        reg_mod._REGISTRY = None


def base_study(world) -> dict:
    return {
        "study": {"name": "fuzz", "seed": 3, "output_dir": str(world["root"] / "runs")},
        "sampling": {"max_tokens": 16, "temperature": 0.0},
        "models": [{"name": "m", "path": "builtin:smollm2-135m-instruct"}],
        "backends": [{"name": "hf", "options": {"device": "cpu"}}],
        "dispatchers": [{"name": "prompt_list", "batch_sizes": [2, 4]}],
        "tasks": [{"name": "t", "source": f"jsonl:{world['tasks']}", "scorer": "refusal"}],
    }


def toy_base(world) -> dict:
    return {
        "study": {"name": "toy", "seed": 7, "output_dir": str(world["root"] / "runs")},
        "sampling": {"max_tokens": 16},
        "models": [{"name": "toy-model", "path": "none"}],
        "backends": [{"name": "toy"}],
        "dispatchers": [{"name": "prompt_list", "batch_sizes": [2, 4]}],
        "tasks": [{"name": "toyset", "source": f"jsonl:{world['toy_tasks']}", "scorer": "toy_refusal"}],
    }


_counter = [0]


def scratch_file(world, suffix: str) -> Path:
    _counter[0] += 1
    d = world["scratch"]
    d.mkdir(exist_ok=True)
    return d / f"case{_counter[0]:05d}{suffix}"


# ------------------------------------------------------------------------------------------------ strategies
CHARS = st.characters(blacklist_categories=("Cs",))  # any code point UTF-8 can carry
keys = st.one_of(st.text(CHARS, max_size=12), st.sampled_from(
    ["name", "nmae", "batch_size", "batch_sizes", "options", "limit", "repeats", "", " ", "a\nb", "étude", "名前",
     "\x00", "seed", "scorer", "matrix", "label"]))
scalars = st.one_of(
    st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1),
    st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 63 - 1, -(2 ** 63), 10 ** 9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(CHARS, max_size=20),
    st.booleans(),
    st.just(DATETIME),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=3)), max_leaves=8)
HUGE = st.one_of(st.sampled_from([0, -1, -5, 10 ** 6, 10 ** 9, 10 ** 12, 2 ** 63 - 1, -(2 ** 63), 1e308, -1e308,
                                  float("inf"), float("nan"), 0.5, -0.0]),
                 st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1))
NUMERIC_KEYS = [("study", "seed"), ("study", "repeats"), ("study", "solo_repeats"), ("sampling", "max_tokens"),
                ("sampling", "temperature"), ("sampling", "top_p"), ("sampling", "seed"), ("sampling", "logprobs"),
                ("tasks", 0, "limit")]
PLUGIN_NAMES = st.one_of(st.text(CHARS, max_size=15), st.sampled_from(
    ["hf", "Hf", "vllm", "vllm-invariant", "openai", "toy", "prompt_list", "prompt-list", "solo", "synchronized",
     "continuous", "refusal", "refusl", "mcq", "bbq", "truthfulqa", "", " ", "ray", "local"]))
WEIRD_PATHS = st.one_of(st.text(CHARS, max_size=30), st.sampled_from([
    "", " ", "/", ".", "..", "/dev/null", "/proc/self/status", "/etc/hostname", "~nosuchuser-evalhost/tasks.jsonl",
    "~/no-such-evalhost-file.jsonl", "../../../../../../etc/passwd", "/no/such/dir/tasks.jsonl", "tasks.jsonl",
    "a\x00b.jsonl", "x" * 300 + ".jsonl", "/" + "d/" * 3000 + "t.jsonl", "C:\\tasks\\t.jsonl", "tasks.JSONL",
    "file:///etc/passwd", "http://127.0.0.1:9/t.jsonl",
]))
SCHEMES = st.sampled_from(["jsonl:", "csv:", "builtin:", "candidates:", "hf-disk:", "", "nosuchscheme:", "JSONL:"])


def _paths(node, prefix=()) -> list[tuple]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, dict):
                out.append(prefix + (i,))
                out += _paths(v, prefix + (i,))
    return out


def _tables(node, prefix=()) -> list[tuple]:
    out = [prefix] if isinstance(node, dict) else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _tables(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _tables(v, prefix + (i,))
    return out


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def _set(data: dict, path: tuple, value) -> None:
    node = data
    for p in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(p, {})
        elif isinstance(node, list) and isinstance(p, int) and p < len(node):
            node = node[p]
        else:
            return
        if not isinstance(node, (dict, list)):
            return
    if isinstance(node, dict):
        node[path[-1]] = value
    elif isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
        node[path[-1]] = value


MUTATIONS = ["delete", "set", "add", "add", "plugin", "path", "path", "path", "batch", "huge", "huge", "matrix"]


@st.composite
def mutated_study(draw, base: dict) -> dict:
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(MUTATIONS))
        if kind == "delete":
            paths = _paths(data)
            if paths:
                path = draw(st.sampled_from(paths))
                parent = _get(data, path[:-1])
                del parent[path[-1]]
        elif kind == "set":
            paths = _paths(data)
            if paths:
                _set(data, draw(st.sampled_from(paths)), draw(values))
        elif kind == "add":
            tables = _tables(data)
            _get(data, draw(st.sampled_from(tables)))[draw(keys)] = draw(values)
        elif kind == "plugin":
            where = draw(st.sampled_from([("backends", 0, "name"), ("dispatchers", 0, "name"),
                                          ("tasks", 0, "scorer")]))
            _set(data, where, draw(PLUGIN_NAMES))
        elif kind == "path":
            where = draw(st.sampled_from(["source", "output_dir", "model"]))
            path = draw(WEIRD_PATHS)
            if where == "source":
                _set(data, ("tasks", 0, "source"), draw(SCHEMES) + path)
            elif where == "output_dir":
                _set(data, ("study", "output_dir"), path)
            else:
                _set(data, ("models", 0, "path"), path)
        elif kind == "batch":
            sizes = draw(st.lists(st.one_of(st.integers(-(2 ** 63), 2 ** 63 - 1), st.integers(-3, 9),
                                            st.sampled_from([0, -4, 4096, 4097, 10 ** 9]), st.floats(), st.text(max_size=3)),
                                  max_size=4))
            _set(data, ("dispatchers", 0, "batch_sizes"), sizes)
        elif kind == "huge":
            _set(data, draw(st.sampled_from(NUMERIC_KEYS)), draw(HUGE))
        else:  # a backend matrix / options with odd shapes
            _set(data, ("backends", 0, draw(st.sampled_from(["matrix", "options"]))),
                 draw(st.dictionaries(keys, st.one_of(st.lists(scalars, max_size=3), scalars), max_size=3)))
    return data


@st.composite
def study_text_cases(draw, base: dict) -> str:
    """Mostly structured mutations of a valid study; sometimes raw text damage."""
    text = to_toml(draw(mutated_study(base)))
    how = draw(st.sampled_from(["as is"] * 6 + ["cut", "insert", "random"]))
    if how == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif how == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(CHARS, min_size=1, max_size=5)) + text[at:]
    elif how == "random":
        text = draw(st.text(CHARS, max_size=200))
    return text


def _item(i: int) -> dict:
    return {"id": f"it-{i}", "prompt": f"Please say something about number {i}.", "domain": "safety"}


BAD_BYTES = st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
ITEM_FIELDS = ["id", "prompt", "messages", "domain", "choices", "answer", "targets", "scorer", "metadata"]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(CHARS, max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(CHARS, max_size=8), inner,
                                                                          max_size=3)), max_leaves=6)


@st.composite
def task_file_cases(draw, always_bad: bool = False) -> bytes:
    """Bytes of a JSONL task file: valid ones mutated, broken encodings, bad JSON, empty files, random bytes."""
    items = [_item(i) for i in range(draw(st.integers(1, 5)))]
    kinds = ["missing", "unknown field", "duplicate id", "bad json", "non-utf8", "empty", "whitespace",
             "json scalars", "truncated"]  # each of these is bad whatever else is drawn
    if not always_bad:
        kinds += ["wrong type", "random bytes", "valid", "bom crlf", "random field values", "reserved metadata"]
    kind = draw(st.sampled_from(kinds))
    if kind == "missing":
        field = draw(st.sampled_from(["id", "prompt", "domain"]))
        del items[draw(st.integers(0, len(items) - 1))][field]
    elif kind == "wrong type":
        field = draw(st.sampled_from(["id", "prompt", "messages", "domain", "choices", "answer", "targets", "metadata"]))
        bad = draw(st.one_of(st.sampled_from([None, 5, [], {}, True, 1.5, "", [1, 2], {"role": 1}]), json_values))
        items[draw(st.integers(0, len(items) - 1))][field] = bad
    elif kind == "unknown field":
        name = draw(st.text(CHARS, min_size=1, max_size=10).filter(lambda s: s not in ITEM_FIELDS))
        items[0][name] = draw(json_values)
    elif kind == "duplicate id":
        items.append(dict(items[0]))
    elif kind == "random field values":
        items[0] = {draw(st.sampled_from(ITEM_FIELDS)): draw(json_values) for _ in range(draw(st.integers(0, 5)))}
    elif kind == "reserved metadata":  # what only the candidates source may set: bad unless empty
        items[draw(st.integers(0, len(items) - 1))]["metadata"] = {
            "group_members": draw(st.one_of(json_values, st.just([f"it-{i}" for i in range(len(items))]))),
            "position": draw(json_values)}
    lines = [json.dumps(x, ensure_ascii=draw(st.booleans())) for x in items]
    if kind == "json scalars":
        lines.insert(draw(st.integers(0, len(lines))), json.dumps(draw(st.one_of(
            st.none(), st.booleans(), st.integers(), st.text(CHARS, max_size=5), st.lists(st.integers(), max_size=3)))))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if kind == "bad json":
        at = draw(st.integers(0, len(lines)))
        junk = draw(st.sampled_from(['{"id": "x", "prompt": "y"', "{'id': 'x'}", "not json", "{", "]", '{"id": NaN}',
                                     '{"id": "q", "prompt": "p", "domain": "safety",}']))
        lines.insert(at, junk)
        data = ("\n".join(lines) + "\n").encode("utf-8")
    elif kind == "non-utf8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(BAD_BYTES) + data[at:]
    elif kind == "empty":
        data = b""
    elif kind == "whitespace":
        data = draw(st.sampled_from([b"\n", b"   \n\n", b"\r\n\t\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n \n"]))
    elif kind == "truncated":
        data = data[: draw(st.integers(1, max(1, len(data) - 3)))].rstrip(b"}\n") or b"{"  # a cut-off object
    elif kind == "random bytes":
        data = draw(st.binary(max_size=200))
    elif kind == "bom crlf":
        data = b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n")
    return data


# ------------------------------------------------------------------------------------------------ tests
def _classified(problem) -> str | None:
    """The classification of a generated case (None: valid); a case the rules cannot decide is discarded."""
    try:
        why = problem()
    except Unclassified as exc:
        _event(f"unclassified: {exc}")
        reject()
    _event("classified valid" if why is None else "classified bad")
    return why


@FUZZ
@given(data=st.data())
def test_generated_study_files_exit_0_when_valid_else_2_with_one_error_line(world, data):
    text = data.draw(study_text_cases(base_study(world)))
    path = scratch_file(world, ".toml")
    path.write_text(text, encoding="utf-8")
    why = _classified(lambda: study_problem(text, reg_mod.get_registry(), path.parent))
    check_outcome(["run", str(path), "--dry-run"], f"{text}\n(classified: {why or 'valid'})", expect_ok=why is None)


@FUZZ
@given(data=st.data())
def test_generated_task_files_exit_0_when_valid_else_2_with_one_error_line(world, data):
    content = data.draw(task_file_cases())
    scheme = data.draw(st.sampled_from(["jsonl", "jsonl", "jsonl", "csv"]))
    tasks = scratch_file(world, "." + scheme)
    tasks.write_bytes(content)
    study = base_study(world)
    study["tasks"][0]["source"] = f"{scheme}:{tasks}"
    if data.draw(st.booleans()):
        del study["tasks"][0]["scorer"]  # the items' own scorer fields decide
    path = scratch_file(world, ".toml")
    path.write_text(to_toml(study), encoding="utf-8")

    def problem():
        why, items = task_file_problem(content, scheme)
        return why or items_scorer_problem(items, study["tasks"][0].get("scorer"), reg_mod.get_registry(), {})

    why = _classified(problem)
    check_outcome(["run", str(path), "--dry-run"], f"{scheme} task file bytes: {content!r}\n"
                  f"(classified: {why or 'valid'})", expect_ok=why is None)


def test_the_fuzz_classification_knows_both_outcomes(world):
    """The classifier is not trivially 'bad': the unmutated bases and a valid task file are valid to it, and a
    few plainly bad inputs are bad."""
    registry = reg_mod.get_registry()
    for base in (base_study(world), toy_base(world)):
        assert study_problem(to_toml(base), registry, world["root"]) is None
    assert study_problem(to_toml({**base_study(world), "nmae": 1}), registry, world["root"])
    good = world["tasks"].read_bytes()
    assert task_file_problem(good, "jsonl")[0] is None
    assert task_file_problem(good + good, "jsonl")[0] == "repeated id"
    assert task_file_problem(b"\xef\xbb\xbf" + good.replace(b"\n", b"\r\n"), "jsonl")[0] is None
    assert task_file_problem(b"\n \n", "jsonl")[0] == "no items"


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"], ids=ascii)
def test_a_unicode_line_break_inside_a_json_string_is_text(world, sep):
    """JSON Lines ends a line at \\n only: U+2028, U+2029 or NEL written raw inside a JSON string (JSON allows them
    unescaped) is part of the string, not a line break (the classified fuzzer found an item with NEL in its
    metadata refused as 'not valid JSON')."""
    tasks = scratch_file(world, ".jsonl")
    item = {"id": "a", "prompt": f"one{sep}two", "domain": "safety", "metadata": {"note": sep}}
    tasks.write_text(json.dumps(item, ensure_ascii=False) + "\n", encoding="utf-8")
    study = base_study(world)
    study["tasks"][0]["source"] = f"jsonl:{tasks}"
    path = scratch_file(world, ".toml")
    path.write_text(to_toml(study), encoding="utf-8")
    check_outcome(["run", str(path), "--dry-run"], f"task file with {sep!r} in a string", expect_ok=True)
    [loaded] = reg_mod.get_registry().get("task_source", "jsonl")().load(str(tasks), {"task": "t"})
    assert loaded.prompt == f"one{sep}two" and loaded.metadata == {"note": sep}


def test_the_unmutated_fuzz_bases_are_valid(world):
    """The generators start from valid studies (so a mutation, not the base, is what the other tests exercise)."""
    for base in (base_study(world), toy_base(world)):
        path = scratch_file(world, ".toml")
        path.write_text(to_toml(base), encoding="utf-8")
        assert check_outcome(["run", str(path), "--dry-run"], to_toml(base), expect_ok=True) == 0


def _tree_hash(root: Path) -> dict[str, str]:
    # run.lock is the lock's own bookkeeping (the holder's PID and time, rewritten by whoever takes the lock)
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*")) if p.name != "run.lock"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_bad_resume_leaves_the_run_directory_byte_identical(world, data):
    run_dir: Path = world["run_dir"]
    before = _tree_hash(run_dir)
    assert "records.jsonl" in before and "manifest.json" in before
    how = data.draw(st.sampled_from(["bad study", "bad study", "bad task file behind the run's own study"]))
    if how == "bad study":
        text = data.draw(study_text_cases(toy_base(world)))
        path = scratch_file(world, ".toml")
        path.write_text(text, encoding="utf-8")
        what = text
    else:
        # the run's own study file (same bytes, so the study check passes) while its task file is broken
        path = world["toy_study"]
        content = data.draw(task_file_cases(always_bad=True))
        what = f"task file bytes: {content!r}"
    original_tasks = world["toy_tasks"].read_bytes()
    try:
        if how != "bad study":
            world["toy_tasks"].write_bytes(content)
        check_outcome(["run", str(path), "--quiet", "--no-report", "--resume", str(run_dir)], what)
    finally:
        world["toy_tasks"].write_bytes(original_tasks)
    assert _tree_hash(run_dir) == before, f"a failed --resume changed the run directory\n{what}"


# Specific inputs the fuzzers found or that are easy to miss; each must be refused with one sentence, quickly.
KNOWN_BAD = {
    "home of an unknown user in output_dir": ("study", "output_dir", "~nosuchuser-evalhost/runs"),
    "home of an unknown user in a task path": ("tasks", 0, "source", "jsonl:~nosuchuser-evalhost/t.jsonl"),
    "a task path longer than the OS allows": ("tasks", 0, "source", "jsonl:" + "x" * 300 + ".jsonl"),
    "a key with a newline in it": ("study", "a\nb", 1),
    "a billion repeats": ("study", "repeats", 10 ** 9),
    "a billion solo repeats": ("study", "solo_repeats", 10 ** 9),
    "NaN temperature": ("sampling", "temperature", float("nan")),
    "negative batch size": ("dispatchers", 0, "batch_sizes", [4, -2]),
    "batch size of 2**63-1": ("dispatchers", 0, "batch_sizes", [2 ** 63 - 1]),
    # listed twice, a batch size planned its cell's groups twice (12 generations planned for 8 records)
    "a batch size listed twice": ("dispatchers", 0, "batch_sizes", [4, 2, 4]),
}


@pytest.mark.parametrize("case", sorted(KNOWN_BAD))
def test_known_bad_studies(world, case):
    *where, value = KNOWN_BAD[case]
    study = base_study(world)
    _set(study, tuple(where), value)
    path = scratch_file(world, ".toml")
    path.write_text(to_toml(study), encoding="utf-8")
    assert check_outcome(["run", str(path), "--dry-run"], f"{case}\n{to_toml(study)}") == 2


def test_study_file_that_is_not_utf8_or_missing(world):
    path = scratch_file(world, ".toml")
    path.write_bytes(to_toml(base_study(world)).encode() + b"# \xff\xfe\n")
    check_outcome(["run", str(path), "--dry-run"], "non-UTF-8 study")
    check_outcome(["run", str(world["root"] / "no-such-study.toml"), "--dry-run"], "missing study")
    empty = scratch_file(world, ".toml")
    empty.write_bytes(b"")
    check_outcome(["run", str(empty), "--dry-run"], "empty study")


# ------------------------------------------------------------------------------------------------ issue 18
HOST_PORT_TRICKS = ["--hos=0.0.0.0", "--ho=0.0.0.0", "--hos", "--ho", "--host", "--host=0.0.0.0", "--por=80",
                    "--po", "--port", "--port=8000", "--h", "--p", "--model=x"]


@pytest.mark.parametrize("arg", HOST_PORT_TRICKS)
def test_extra_args_refuse_every_abbreviation_of_host_and_port(arg):
    """argparse (vLLM's parser: allow_abbrev) reads any unambiguous prefix as the option: --hos=0.0.0.0 would bind
    every interface. Each of these would set --host/--port/--model, or is a prefix argparse might expand to one."""
    from evalhost.errors import UserError
    from evalhost.plugins.backends.vllm import VLLMBackend

    with pytest.raises(UserError, match=r"extra_args must not contain --(host|port|model)"):
        VLLMBackend.check_options({"extra_args": ["--enforce-eager", arg, "0.0.0.0"]})


def test_extra_args_check_matches_argparse_prefix_matching():
    """What the check refuses is what an argparse parser with vLLM's options and allow_abbrev sets as host/port,
    and what it lets through never sets them."""
    import argparse

    from evalhost.plugins.backends.vllm import VLLMBackend

    parser = argparse.ArgumentParser(allow_abbrev=True, add_help=False)
    for flag in ("--host", "--port", "--model", "--pooler-config", "--enforce-eager", "--max-model-len", "--hf-token"):
        parser.add_argument(flag, nargs="?", const="1")
    for arg in ["--hos=h", "--ho=h", "--hostn=x", "--por=1", "--poo=x", "--enforce-eager", "--max-model-len=9",
                "--hf=x", "--port-=1", "--mo=x"]:
        try:
            ns = parser.parse_args([arg])
            sets = ns.host is not None or ns.port is not None
        except SystemExit:  # ambiguous or unknown: vLLM would refuse to start, harmless either way
            sets = False
        try:
            VLLMBackend.check_options({"extra_args": [arg]})
            refused = False
        except Exception:
            refused = True
        assert not sets or refused, f"{arg} sets host/port but passed the check"


def _write_study(world, study: dict) -> Path:
    path = scratch_file(world, ".toml")
    path.write_text(to_toml(study), encoding="utf-8")
    return path


def _refused(world, argv: list[str], what: str, needle: str) -> str:
    """``evalhost ARGV`` exits 2 with one 'error: ' line under 300 characters that contains ``needle``."""
    code, out, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line not in _known_warnings()]
    assert "Traceback" not in err + out, f"{what}: a traceback reached the user:\n{err}"
    assert code == 2 and len(lines) == 1, f"{what}: exit {code}, stderr:\n{err}\nstdout:\n{out[-500:]}"
    assert lines[0].startswith("error: ") and len(lines[0]) < 300, f"{what}: {lines[0]!r}"
    assert needle in lines[0], f"{what}: {lines[0]!r} does not say {needle!r}"
    return lines[0]


NAMES = {
    "a slash": ("a/b", "may only use letters"),
    "a NUL byte": ("a\x00b", "may only use letters"),
    "240 characters": ("x" * 240, "must be 1 to 100 characters"),
    "dot dot": ("..", "must not be '.' or '..'"),
    "a parent path": ("../../X", "may only use letters"),
    "an absolute path": ("/tmp/evalhost-abs", "may only use letters"),
    "a space": ("my study", "may only use letters"),
}


@pytest.mark.parametrize("case", sorted(NAMES))
def test_study_name_is_one_safe_path_component(world, case, tmp_path):
    """A study name becomes the run directory's name: one component of [A-Za-z0-9._-], at most 100 characters.
    Before, 'a/b' crashed with FileNotFoundError and '../../X' or '/abs' put the run outside output_dir. A real run
    is refused before anything is created."""
    name, needle = NAMES[case]
    name = str(tmp_path / "abs") if name == "/tmp/evalhost-abs" else name  # an escape would stay in tmp_path
    study = toy_base(world)
    study["study"]["name"] = name
    study["study"]["output_dir"] = str(tmp_path / "out" / "runs")
    path = _write_study(world, study)
    _refused(world, ["run", str(path), "--dry-run"], case, needle)
    _refused(world, ["run", str(path), "--quiet", "--no-report"], case, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run directory, nor an escaped one


def test_study_name_at_the_limit_is_fine(world, tmp_path):
    study = toy_base(world)
    study["study"]["name"] = "A-z_0." + "n" * 94
    study["study"]["output_dir"] = str(tmp_path)
    code, out, err = run_cli(["run", str(_write_study(world, study)), "--quiet", "--no-report"])
    assert code == 0, err
    assert [p.name[:100] for p in tmp_path.iterdir()] == ["A-z_0." + "n" * 94]


OUTPUT_DIRS = {
    "a file": (lambda w: str(w["tasks"]), "is a file, not a directory"),
    "inside a file": (lambda w: str(w["tasks"]) + "/runs", "which is a file"),
    "/etc": (lambda w: "/etc", "is a system directory"),
    "/": (lambda w: "/", "is a system directory"),
    "below /usr": (lambda w: "/usr/lib/evalhost-runs", "is a system directory"),
    "/var": (lambda w: "/var", "is a system directory"),
    "/proc via ..": (lambda w: "/tmp/../proc/self", "is a system directory"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_DIRS))
def test_output_dir_must_be_a_directory_of_ours(world, case):
    """output_dir is a directory (or will be made below one we may write to) and not a system directory; before,
    '/etc' ran (as root it wrote there) and a file gave a traceback."""
    make, needle = OUTPUT_DIRS[case]
    study = toy_base(world)
    study["study"]["output_dir"] = make(world)
    path = _write_study(world, study)
    _refused(world, ["run", str(path), "--dry-run"], case, needle)


def test_deeply_nested_inline_tables_are_one_sentence(world):
    backend = '[["backends"]]\n"name" = "toy"\n'
    assert backend in to_toml(toy_base(world))
    text = to_toml(toy_base(world)).replace(backend, backend + 'options = ' + "{a = " * 2000 + "1" + "}" * 2000 + "\n")
    path = scratch_file(world, ".toml")
    path.write_text(text)
    _refused(world, ["run", str(path), "--dry-run"], "2000-deep inline tables", "too deeply")
    shallow = to_toml(toy_base(world)).replace(backend, backend + 'options = ' + "{a = " * 40 + "1" + "}" * 40 + "\n")
    path.write_text(shallow)
    _refused(world, ["run", str(path), "--dry-run"], "40-deep inline tables", "more than 32 levels deep")


def test_a_huge_matrix_is_refused_before_it_is_expanded(world):
    """12 two-value axes are 4096 backend configurations: refused from the product of the axis lengths (before, the
    dry run expanded them all); the limit and the count are in the sentence."""
    study = toy_base(world)
    study["backends"][0]["matrix"] = {f"axis{i}": [1, 2] for i in range(12)}
    _refused(world, ["run", str(_write_study(world, study)), "--dry-run"], "12 axes", "4096 backend configurations")
    study["backends"][0]["matrix"] = {f"axis{i}": list(range(10)) for i in range(40)}  # 10**40: never expanded
    _refused(world, ["run", str(_write_study(world, study)), "--dry-run"], "40 axes", "more than the limit of 256")


def test_a_plan_beyond_the_prompt_limit_is_refused_before_it_is_built(world, tmp_path):
    from evalhost.plan import MAX_PROMPTS

    tasks = write_tasks(tmp_path / "big.jsonl", 1000)
    study = toy_base(world)
    study["tasks"][0]["source"] = f"jsonl:{tasks}"
    study["study"]["solo_repeats"] = 1000  # 1,000,000 solo prompts + the batches
    _refused(world, ["run", str(_write_study(world, study)), "--dry-run"], "a million prompts",
             f"more than the limit of {MAX_PROMPTS:,}")


def test_plan_size_counts_what_build_plan_builds(world, tmp_path):
    """The bound is computed without building the plan; it must equal what the plan then holds."""
    from evalhost.plan import build_plan, plan_size
    from evalhost.registry import get_registry
    from evalhost.study import parse_study

    tasks = write_tasks(tmp_path / "t.jsonl", 11)
    study = toy_base(world)
    study["tasks"][0]["source"] = f"jsonl:{tasks}"
    study["study"].update(repeats=2, solo_repeats=3)
    study["backends"][0]["matrix"] = {"flavour": ["a", "b"]}
    study["dispatchers"] = [{"name": "prompt_list", "batch_sizes": [2, 4, 16]},
                            {"name": "synchronized", "label": "sync", "batch_sizes": [3], "options": {}}]
    s = parse_study(to_toml(study), tmp_path / "s.toml")
    plan = build_plan(s, get_registry())
    cells, prompts = plan_size(s, plan.tasks, get_registry())
    assert cells == len(plan.cells())
    assert prompts == sum(len(j.members) for j in plan.jobs)


@pytest.mark.parametrize("mde, needle", [("1e-9", "items per arm, more than"), ("0", "between 0 and 100"),
                                         ("nan", "between 0 and 100"), ("-3", "between 0 and 100")])
def test_target_mde_out_of_range_is_refused_fast(world, mde, needle):
    """--target-mde 1e-9 needs ~10^22 items: the exact search never finished (before, the dry run hung; here the
    timer of run_cli turns a hang into a failure). It is refused from the normal approximation, before any run."""
    path = _write_study(world, toy_base(world))
    _refused(world, ["run", str(path), "--dry-run", "--target-mde", mde], f"--target-mde {mde}", needle)


def _write_task_bytes(world, data: bytes, suffix=".jsonl") -> Path:
    path = scratch_file(world, suffix)
    path.write_bytes(data)
    return path


TASK_FILES = {
    "a 5000-digit id": (b'{"id": ' + b"9" * 5000 + b', "prompt": "p", "domain": "safety"}\n', "number too long"),
    "a 300-character id": (json.dumps({"id": "i" * 300, "prompt": "p", "domain": "safety"}).encode() + b"\n",
                           "300 characters long"),
    "a lone surrogate in the id": (b'{"id": "a\\ud800", "prompt": "p", "domain": "safety"}\n'
                                   b'{"id": "b", "prompt": "p", "domain": "safety"}\n', "lone surrogate"),
    "a lone surrogate in the prompt": (b'{"id": "a", "prompt": "p\\udfff", "domain": "safety"}\n', "lone surrogate"),
    "arrays 5000 deep": (b'{"id": "a", "prompt": "p", "domain": "safety", "metadata": {"x": ' + b"[" * 5000
                         + b"]" * 5000 + b"}}\n", "nesting too deep"),
}


@pytest.mark.parametrize("case", sorted(TASK_FILES))
def test_task_files_that_no_record_could_hold_are_refused_before_the_run_directory_exists(world, case, tmp_path):
    data, needle = TASK_FILES[case]
    study = toy_base(world)
    study["tasks"][0]["source"] = f"jsonl:{_write_task_bytes(world, data)}"
    study["study"]["output_dir"] = str(tmp_path / "runs")
    path = _write_study(world, study)
    message = _refused(world, ["run", str(path), "--quiet", "--no-report"], case, needle)
    assert ".jsonl:1:" in message
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("members", [5, ["q001", "q002"], {"a": 1}, "q001", []], ids=repr)
def test_item_metadata_group_members_is_reserved(world, members, tmp_path):
    """An explicit group (metadata ``group_members``) is what the candidates source rebuilds from its rows. Written
    in a task file it crashed the plan (a number: a TypeError traceback) or planned a group of bare strings that no
    backend can render; now it is one sentence before the run directory exists. An empty value stays plain
    metadata."""
    items = [{"id": f"q{i:03d}", "prompt": f"Say {i}.", "domain": "safety"} for i in range(3)]
    items[0]["metadata"] = {"group_members": members, "position": 0}
    data = "".join(json.dumps(it) + "\n" for it in items).encode()
    study = toy_base(world)
    study["tasks"][0]["source"] = f"jsonl:{_write_task_bytes(world, data)}"
    study["study"]["output_dir"] = str(tmp_path / "runs")
    path = _write_study(world, study)
    if not members:
        check_outcome(["run", str(path), "--dry-run"], "empty group_members", expect_ok=True)
        return
    message = _refused(world, ["run", str(path), "--quiet", "--no-report"], repr(members), "reserved")
    assert "item 'q000' has metadata 'group_members'" in message
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def _candidate_row(world, **changes) -> dict:
    row = {"task": "toyset", "task_source": f"jsonl:{world['toy_tasks']}", "item_id": "q000", "peers": ["q001", "q002"],
           "position": 1, "dispatcher": "prompt_list", "batch_size": 3, "scorer": "toy_refusal", "group_id": "g1"}
    row.update(changes)
    return row


CANDIDATE_ROWS = {
    "position 'abc'": ({"position": "abc"}, "'position' is abc, not a place in its group"),
    "position -5": ({"position": -5}, "'position' is -5"),
    "position 10**9": ({"position": 10 ** 9}, "'position' is 1000000000"),
    "position true": ({"position": True}, "'position' is True"),
    "peers null": ({"peers": None}, "'peers' must be a list"),
    "peers of objects": ({"peers": [{"id": 1}]}, "'peers' must be a list"),
    "item_id a list": ({"item_id": ["q000"]}, "'item_id' must be"),
    "batch_size 0": ({"batch_size": 0}, "'batch_size' must be"),
    "a candidates task source": ({"task_source": "candidates:self.jsonl"}, "is itself a candidates file"),
    "a label that is a list": ({"solo_label": ["refuse"]}, "'solo_label' must be a string"),
}


@pytest.mark.parametrize("case", sorted(CANDIDATE_ROWS) + ["a null row", "a 5000-digit number", "a surrogate"])
def test_bad_candidates_rows_name_file_and_line(world, case):
    """Before: 'abc' / null gave tracebacks, and a position of -5 or 10**9 silently dropped the row's batch cell."""
    good = json.dumps(_candidate_row(world))
    if case == "a null row":
        bad, needle = "null", "is a JSON null, not an object"
    elif case == "a 5000-digit number":
        bad, needle = good.replace('"position": 1', '"position": ' + "1" * 5000), "is not JSON"
    elif case == "a surrogate":
        bad, needle = good.replace('"g1"', '"g\\ud800"'), "lone surrogate"
    else:
        changes, needle = CANDIDATE_ROWS[case]
        bad = json.dumps(_candidate_row(world, **changes))
    cands = _write_task_bytes(world, (good + "\n" + bad + "\n").encode())
    study = toy_base(world)
    study["tasks"][0]["source"] = f"candidates:{cands}"
    message = _refused(world, ["run", str(_write_study(world, study)), "--dry-run"], case, needle)
    assert f"{cands}:2" in message


def test_a_valid_candidates_file_keeps_its_batch_cell(world):
    rows = [_candidate_row(world, position=p, item_id=f"q00{p}", peers=[i for i in ["q000", "q001", "q002"]
                                                                         if i != f"q00{p}"]) for p in range(3)]
    cands = _write_task_bytes(world, "".join(json.dumps(r) + "\n" for r in rows).encode())
    study = toy_base(world)
    study["tasks"][0]["source"] = f"candidates:{cands}"
    code, out, err = run_cli(["run", str(_write_study(world, study)), "--dry-run"])
    assert code == 0, err
    assert "toy-model/toy/toyset/prompt_list/bs3" in out and "toy-model/toy/toyset/solo/bs1" in out


def test_candidates_command_refuses_missing_run_and_missing_folder(world, tmp_path):
    """Before: `evalhost candidates /nonexistent` exited 0 (and wrote an empty file); `-o nodir/x` gave a
    traceback. An existing output file is never overwritten."""
    _refused(world, ["candidates", str(tmp_path / "nonexistent"), "-o", str(tmp_path / "c.jsonl")],
             "missing run", "does not exist")
    assert not (tmp_path / "c.jsonl").exists()
    _refused(world, ["candidates", str(world["run_dir"]), "-o", str(tmp_path / "nodir" / "x")], "missing folder",
             "does not exist")
    taken = tmp_path / "taken.jsonl"
    taken.write_text("keep\n")
    _refused(world, ["candidates", str(world["run_dir"]), "-o", str(taken)], "existing output", "exists")
    assert taken.read_text() == "keep\n"
    code, out, err = run_cli(["candidates", str(world["run_dir"]), "-o", str(tmp_path / "ok.jsonl")])
    assert code == 0 and "candidate rows" in out, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.jsonl", "taken.jsonl"]  # no temp file left


@pytest.mark.parametrize("where", ["matrix", "options"])
def test_a_toml_datetime_in_backend_options_is_one_sentence(world, tmp_path, where):
    """Options are recorded as JSON; a TOML datetime there crashed the real run (found by test_fuzz_property)."""
    study = toy_base(world)
    study["study"]["output_dir"] = str(tmp_path)
    study["backends"][0][where] = {"when": [DATETIME] if where == "matrix" else {"nested": [1, DATETIME]}}
    path = _write_study(world, study)
    _refused(world, ["run", str(path), "--quiet", "--no-report"], where, "is a TOML date or time")
    assert list(tmp_path.iterdir()) == []


LONG = "k" * 1000
LONG_PLACES = {
    "a top-level key": (lambda s: s.__setitem__(LONG, 1), "unknown top-level key"),
    "a study key": (lambda s: s["study"].__setitem__(LONG, 1), "unknown key 'study.kkk"),
    "a backend name": (lambda s: s["backends"][0].__setitem__("name", LONG), "must be at most 100 characters"),
    "a model name": (lambda s: s["models"][0].__setitem__("name", LONG), "must be at most 100 characters"),
    "a scorer": (lambda s: s["tasks"][0].__setitem__("scorer", LONG), "must be at most 100 characters"),
    "a matrix key": (lambda s: s["backends"][0].__setitem__("matrix", {LONG: [1]}), "configuration label of"),
    "a dispatcher option": (lambda s: s["dispatchers"][0].__setitem__("options", {LONG: 1}), "has no option"),
    "a task source": (lambda s: s["tasks"][0].__setitem__("source", "nosuchscheme:" + LONG), "error: "),
}


@pytest.mark.parametrize("case", sorted(LONG_PLACES))
def test_a_thousand_character_key_or_name_gives_a_short_error_line(world, case):
    """Keys and names from the study are cut in the sentence, and no error line exceeds 300 characters (before,
    the whole key was repeated: lines of 1,100 characters)."""
    study = toy_base(world)
    change, needle = LONG_PLACES[case]
    change(study)
    _refused(world, ["run", str(_write_study(world, study)), "--dry-run"], case, needle)


HF_ROWS = [{"question": "Which one?", "choices": ["x", "y"], "answer": 1, "weird": "²", "eszett": "ß"}]
HF_OPTIONS = {
    "an answer of '²' (isdigit, not int)": ({"fields": {"prompt": "question", "choices": "choices",
                                                           "answer": "weird"}}, "cannot read answer"),
    "an answer of 'ß' (upper() is two letters)": ({"fields": {"prompt": "question", "choices": "choices",
                                                                 "answer": "eszett"}}, "cannot read answer"),
    "a template reading an attribute": ({"prompt_template": "{question.upper}"}, "prompt_template cannot be filled"),
    "a template reading a missing attribute": ({"prompt_template": "{question.nope}"},
                                               "prompt_template cannot be filled"),
    "a template with an index": ({"prompt_template": "{0}"}, "prompt_template cannot be filled"),
    "a template with a lone brace": ({"prompt_template": "{question"}, "prompt_template cannot be filled"),
    "a preset that is a list": ({"preset": ["mmlu"]}, "option 'preset' must be a string"),
    "where that is a list": ({"where": ["x"]}, "option 'where' must be a table"),
    "metadata_fields of numbers": ({"metadata_fields": [1]}, "'metadata_fields' must list column names"),
    "a field mapped to a number": ({"fields": {"prompt": 5}}, "'fields' must map item fields to column names"),
}


@pytest.mark.parametrize("case", sorted(HF_OPTIONS))
def test_hf_rows_and_options_that_crashed_are_one_sentence(case):
    """Dataset rows and [[tasks]] options of the hf task sources (read without the datasets package: the rows are
    given): each of these raised ValueError / TypeError / AttributeError before."""
    from evalhost.errors import UserError
    from evalhost.plugins.task_sources.hf_datasets import rows_to_items

    options, needle = HF_OPTIONS[case]
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")) as info:
        rows_to_items(HF_ROWS, "hf:owner/set", {"task": "t", "domain": "capability", **options})
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_a_plan_beyond_the_cell_limit_is_refused_before_it_is_built(world):
    """4096 batch sizes x 5 tasks: 20,485 cells (and millions of padded prompts) are counted, not built."""
    from evalhost.plan import MAX_CELLS

    study = toy_base(world)
    study["dispatchers"][0]["batch_sizes"] = list(range(1, 4097))
    study["tasks"] = [dict(study["tasks"][0], name=f"t{i}") for i in range(5)]
    _refused(world, ["run", str(_write_study(world, study)), "--dry-run"], "20,485 cells",
             f"would make 20,485 cells (1 model/backend configurations), more than the limit of {MAX_CELLS:,}")
