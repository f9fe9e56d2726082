"""Shared by the search scripts: the hf backend itself (as a study builds it) and the refusal scorer."""
import json, os, sys, tempfile, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from evalhost.plugins.backends.hf import HFBackend
from evalhost.plugins.scorers.refusal import RefusalScorer
from evalhost.types import ModelSpec, RunContext, Sampling, TaskItem

SC = RefusalScorer()

def backend(dtype="float32"):
    scratch = tempfile.mkdtemp(prefix="rb-search-")
    ctx = RunContext(run_dir=scratch, cache_dir=scratch, log=lambda m: None)
    b = HFBackend(ModelSpec(name="r", path="builtin:smollm2-135m-refusal", dtype=dtype), {}, ctx)
    b.start()
    return b

def render(b, prompt):
    return b.render(TaskItem(id="x", task="t", domain="safety", prompt=prompt))

def label(text):
    s = SC.score(None, text)
    return s.label, s.value
