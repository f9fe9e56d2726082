"""A real third-party OpenAI-compatible server: llama-cpp-python's (``llama_cpp.server``, installed by
scripts/setup.sh) serving the shipped SmolLM2 GGUF on 127.0.0.1, reached through the ``openai`` backend.

* solo records are the same server's answers to a plain httpx client sending the same prompt;
* ``prompt_list`` is refused before the first group, in one sentence that names ``synchronized``;
* ``synchronized`` groups come out ``serialized`` (this server runs one request at a time) and are not counted as
  the batch condition: the report says 0 verified batch pairs instead of "no batch effect".
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evalhost.models import _gguf_file, resolve_model_path
from evalhost.plan import load_task
from evalhost.plugins.backends.server import ManagedServer, free_port
from evalhost.registry import get_registry
from evalhost.study import TaskSpec

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by scripts/setup.sh")

EVALHOST = str(Path(sys.executable).with_name("evalhost"))
MAX_TOKENS = 24
TASK = "builtin:jailbreak_amplification"
ITEMS = 8


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama-cpp-python's server on the shipped GGUF, on a free port of 127.0.0.1 (one per module)."""
    tmp = tmp_path_factory.mktemp("llamacpp")
    port = free_port()
    server = ManagedServer([sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf_file("smollm2-135m-instruct")),
                            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
                            "--verbose", "false"],
                           port=port, log_path=tmp / "llama-server.log", startup_timeout_s=300, log=lambda m: None,
                           label="llama-cpp-python server", health_path="/v1/models")
    server.start()
    try:
        import httpx

        model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        yield server.url, model, tmp
    finally:
        server.stop()


def study_text(url: str, model: str, out: Path, dispatcher: str, extra: str = "") -> str:
    return f"""
[study]
name = "llamacpp_{dispatcher}"
output_dir = "{out}"
{extra}
[sampling]
max_tokens = {MAX_TOKENS}
[[models]]
name = "smollm2"
path = "builtin:smollm2-135m-instruct"
[[backends]]
name = "openai"
options = {{ base_url = "{url}", model = {json.dumps(model)} }}
[[dispatchers]]
name = "{dispatcher}"
batch_sizes = [4]
[[tasks]]
name = "jailbreak"
source = "{TASK}"
limit = {ITEMS}
"""


def run(study: Path) -> subprocess.CompletedProcess:
    return subprocess.run([EVALHOST, "run", str(study)], capture_output=True, text=True, timeout=1200)


def run_dir(out: Path) -> Path:
    dirs = [d for d in out.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def records(rd: Path) -> list[dict]:
    from evalhost.records import read_records

    return read_records(rd / "records.jsonl")  # a model output may hold U+2028: not splitlines()


@pytest.fixture(scope="module")
def synchronized_run(llama_server):
    url, model, tmp = llama_server
    out = tmp / "sync-runs"
    study = tmp / "sync.toml"
    study.write_text(study_text(url, model, out, "synchronized"))
    proc = run(study)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir(out)


def test_solo_records_match_a_plain_client(llama_server, synchronized_run):
    import httpx
    from transformers import AutoTokenizer

    url, model, _ = llama_server
    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:smollm2-135m-instruct"))
    items = {it.id: it for it in load_task(TaskSpec(name="jailbreak", source=TASK, limit=ITEMS), get_registry())}
    solos = [r for r in records(synchronized_run) if r["condition"] == "solo"]
    assert len(solos) == ITEMS
    for rec in solos:
        prompt = tok.apply_chat_template(items[rec["item_id"]].chat(), add_generation_prompt=True, tokenize=False)
        assert hashlib.sha256(prompt.encode("utf-8")).hexdigest() == rec["prompt_sha256"]
        answer = httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                           "temperature": 0.0}, timeout=300).json()
        assert answer["choices"][0]["text"] == rec["output_text"], rec["item_id"]
        assert rec["finish_reason"] == answer["choices"][0]["finish_reason"]
    manifest = json.loads((synchronized_run / "manifest.json").read_text())
    fp = next(iter(manifest["fingerprints"].values()))
    # the probe's findings, cached in the fingerprint: no prompt lists, no token ids, no engine metrics
    assert fp["capabilities"]["prompt_list"] is False and fp["capabilities"]["token_ids"] is False
    assert fp["capabilities"]["engine_metrics"] is False and fp["token_ids_source"] == "retokenized"


def test_synchronized_groups_are_serialized_and_not_counted_as_batches(synchronized_run):
    batch = [r for r in records(synchronized_run) if r["condition"] == "batch"]
    assert len(batch) == ITEMS
    verdicts = {r["group_id"]: r["dispatch_evidence"]["cobatch"] for r in batch}
    assert len(verdicts) == ITEMS // 4
    for v in verdicts.values():
        assert v["verdict"] == "serialized" and v["counted"] is False, v
    assert all(r["dispatch_evidence"]["max_running"] is None for r in batch)  # no engine metrics there
    summary = json.loads((synchronized_run / "summary.json").read_text())
    assert summary["counts"]["pairs"] == ITEMS and summary["overall"]["pairs"] == 0
    assert summary["counts"]["not_comparable"]["serialized"] == ITEMS
    report = (synchronized_run / "report.md").read_text()
    assert f"Co-batching: 0 of {ITEMS} batch pairs come from groups with verified co-batching" in report


def test_prompt_list_is_refused_before_the_first_group(llama_server):
    url, model, tmp = llama_server
    out = tmp / "list-runs"
    study = tmp / "list.toml"
    study.write_text(study_text(url, model, out, "prompt_list"))
    proc = run(study)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0] == ("error: dispatcher 'prompt_list' needs a list of prompts in one request, which "
                         f"{url} does not accept (it answers a list of prompts with HTTP 500 and an empty message); "
                         "use dispatcher 'synchronized' instead in the study file")
    rd = run_dir(out)
    assert not (rd / "records.jsonl").exists() or not records(rd)  # not one group ran
