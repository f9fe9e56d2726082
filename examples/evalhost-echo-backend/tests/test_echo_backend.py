"""Tests of the echo backend, written as a plugin author writes them: with evalhost.api's testing helpers
(evalhost.testing), without installing the plugin and without a server."""
from __future__ import annotations

import json

import pytest

import evalhost_echo_backend as echo_mod
from evalhost.api import ModelSpec, RunContext, Sampling, UserError, register_module, run_study_in

STUDY = """
[study]
name = "echo"
seed = 3

[sampling]
max_tokens = 8

[[models]]
name = "none"
path = "none"

[[backends]]
name = "echo"
options = {{ batch_noise = {noise} }}

[[dispatchers]]
name = "prompt_list"
batch_sizes = [4]

[[tasks]]
name = "asks"
source = "jsonl:asks.jsonl"
scorer = "refusal"
"""


def write_items(tmp_path, n=20):
    with open(tmp_path / "asks.jsonl", "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"a{i:02d}", "domain": "safety",
                                 "prompt": f"Please tell me fact number {i} about bread."}) + "\n")


def test_echo_is_a_deterministic_function_of_the_prompt():
    assert echo_mod.echo("one two three", 16) == ("Echo: three two one",
                                                  [echo_mod.token_id(w) for w in ("Echo:", "three", "two", "one")],
                                                  "stop")
    text, ids, finish = echo_mod.echo("one two three", 2, prefix="E")
    assert (text, len(ids), finish) == ("E: three", 2, "length")


def test_solo_is_never_perturbed_and_noise_one_perturbs_every_batched_prompt():
    assert not echo_mod.perturbed("x", 1, 1.0)
    assert echo_mod.perturbed("x", 2, 1.0)
    assert not echo_mod.perturbed("x", 2, 0.0)


def test_a_study_without_noise_has_no_flips(tmp_path):
    write_items(tmp_path)
    with register_module(echo_mod):
        records = run_study_in(tmp_path, STUDY.format(noise=0.0))
    assert len(records) == 40  # 20 solo + 20 in groups of 4
    assert {r["label"] for r in records} == {"comply"}
    assert all(r["backend_extra"]["perturbed"] is False for r in records)


def test_batch_noise_flips_some_batched_outputs_and_no_solo_one(tmp_path):
    write_items(tmp_path)
    with register_module(echo_mod):
        records = run_study_in(tmp_path, STUDY.format(noise=0.3))
    solo = {r["item_id"]: r for r in records if r["condition"] == "solo"}
    batch = {r["item_id"]: r for r in records if r["condition"] == "batch"}
    assert {r["label"] for r in solo.values()} == {"comply"}
    flips = [i for i in batch if batch[i]["label"] != solo[i]["label"]]
    assert 1 <= len(flips) < 20
    assert all(batch[i]["label"] == "refuse" and batch[i]["backend_extra"] == {"group_size": 4, "perturbed": True}
               for i in flips)
    # the same study again gives the same records (deterministic groups and outputs)
    again = run_study_in(tmp_path / "again", STUDY.format(noise=0.3).replace(
        "jsonl:asks.jsonl", f"jsonl:{tmp_path / 'asks.jsonl'}"), plugins=[echo_mod])
    assert sorted((r["key"], r["output_sha256"]) for r in again) == sorted((r["key"], r["output_sha256"])
                                                                           for r in records)


def test_a_bad_option_is_one_sentence():
    with pytest.raises(UserError, match="backend 'echo' has no option 'batch_nosie' \\(did you mean 'batch_noise'"):
        echo_mod.EchoBackend.check_options({"batch_nosie": 0.1})
    with pytest.raises(UserError, match="between 0 and 1"):
        echo_mod.EchoBackend.check_options({"batch_noise": 2})


def test_generate_reports_the_group_in_extra():
    backend = echo_mod.EchoBackend(ModelSpec("m", "none"), {}, RunContext(run_dir=".", cache_dir="."))
    backend.start()
    gens = backend.generate(["a b", "c d"], Sampling(max_tokens=4))
    assert [g.text for g in gens] == ["Echo: b a", "Echo: d c"]
    assert gens[0].extra == {"group_size": 2, "perturbed": False}
