"""The ``hf`` backend: transformers ``generate`` in process.

``render`` applies the tokenizer's chat template client-side (``add_generation_prompt=True``); ``generate`` on one
prompt is a batch of one (solo), on several prompts ONE left-padded ``generate`` call (pad token = eos when the
tokenizer has none).  Prompts are already rendered, so they are tokenized with ``add_special_tokens=False``.
Greedy when ``temperature == 0``, else sampling seeded with ``torch.manual_seed(sampling.seed)``.

With ``[sampling] top_logprobs = k`` each generation also carries ``top_logprobs``: per generated token its k most
likely tokens ``[token id, logprob]`` from the raw logits (``output_logits``; log-softmax over the vocabulary, before
temperature or top-p, as vLLM's default raw logprobs), most likely first.

``token_ids`` are the generated tokens only, up to and including the first eos (as vLLM's ``return_token_ids``
reports them), never the padding after it; ``finish_reason`` is ``stop`` when an eos was generated, else
``length``.

Options: ``chat_template`` (default: true when the tokenizer has one), ``dtype`` (precedence: this option, then the
ModelSpec's ``dtype``, then float32 on CPU / float16 on CUDA), ``device`` (``auto`` = cuda if available else cpu),
``attn_implementation`` (e.g. ``eager`` or ``sdpa``; default: transformers' choice), ``label``.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import time
from typing import Any

from evalhost.api import (PROMPT_LIST, Backend, Generation, hookimpl, Sampling, TaskItem, UserError,
                          check_model_path)

from .completions import check_option_keys

DTYPES = ("float32", "float16", "bfloat16")
ENV_FLAGS = ("CUBLAS_WORKSPACE_CONFIG", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "PYTORCH_CUDA_ALLOC_CONF", "TORCH_DETERMINISTIC", "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")


class HFBackend(Backend):
    plugin_name = "hf"
    capabilities = frozenset({PROMPT_LIST})
    OPTIONS: dict[str, Any] = {
        "chat_template": bool,
        "dtype": str,
        "device": str,
        "attn_implementation": str,
        "flush_denormal": bool,
        "label": str,
    }

    @classmethod
    def check_model(cls, model, options: dict[str, Any]) -> None:
        check_model_path(model.path)  # loaded in this process: a path it can never load is refused at plan time

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        check_option_keys("hf", options, cls.OPTIONS)
        dtype = options.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise UserError(f"backend 'hf' option dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        device = options.get("device")
        if device is not None and not (device in ("auto", "cpu", "cuda") or str(device).startswith("cuda:")):
            raise UserError(f"backend 'hf' option device must be auto, cpu, cuda or cuda:N, not {device!r}")

    def __init__(self, model, options, context) -> None:
        super().__init__(model, options, context)
        self.tok = None
        self.lm = None
        self.device: str | None = None
        self.dtype_name: str | None = None
        self.path: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def _device(self) -> str:
        import torch

        device = self.options.get("device", "auto")
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"backend 'hf' option device = {device!r}, but no CUDA GPU is available here; "
                            f"use device = \"auto\" or \"cpu\"")
        return str(device)

    def preflight(self) -> None:
        self.check_options(self.options)
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            raise UserError(f"backend 'hf' needs torch and transformers ({exc}); install the hf extra: "
                            f"pip install -e '.[hf]'") from None
        self._device()

    def start(self) -> None:
        if self.lm is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.preflight()
        self.path = self.context.resolve_model_path(self.model.path)
        self.device = self._device()
        default = "float16" if self.device.startswith("cuda") else "float32"
        self.dtype_name = self.options.get("dtype") or self.model.dtype or default
        if self.dtype_name not in DTYPES:
            raise UserError(f"model '{self.model.name}' dtype must be one of {', '.join(DTYPES)}, "
                            f"not {self.dtype_name!r}")
        tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype_name)}
        if self.options.get("attn_implementation"):
            kwargs["attn_implementation"] = self.options["attn_implementation"]
        self.context.log(f"hf: loading {self.path} ({self.dtype_name}, {self.device})")
        lm = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True, **kwargs)
        lm.to(self.device)
        lm.eval()
        # Denormal floats in the activations make x86 CPU kernels crawl (seen here: a SmolLM2-135M forward pass went
        # from 3.7 s to 0.4 s with flush-to-zero). FTZ is switched on only while generating (it is process-global
        # CPU state) and applies to solo and batch alike; the fingerprint records it.
        self.flush_denormal = self.device == "cpu" and bool(self.options.get("flush_denormal", True))
        self.tok = tok
        self.lm = lm

    def close(self) -> None:
        self.lm = None
        self.tok = None

    def resources(self) -> dict[str, float]:
        return {"num_cpus": 1, "num_gpus": 1} if self.options.get("device", "auto") != "cpu" and _cuda() else \
            {"num_cpus": 1}

    # -- generation --------------------------------------------------------------------------
    def _tokenizer(self):
        if self.tok is None:
            from transformers import AutoTokenizer

            path = self.path or self.context.resolve_model_path(self.model.path)
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.tok.padding_side = "left"
            if self.tok.pad_token_id is None:
                self.tok.pad_token = self.tok.eos_token
        return self.tok

    def render(self, item: TaskItem) -> str:
        tok = self._tokenizer()
        has = bool(getattr(tok, "chat_template", None))
        wanted = self.options.get("chat_template")
        if wanted and not has:
            raise UserError(f"backend 'hf' option chat_template = true, but the tokenizer of model "
                            f"'{self.model.name}' has no chat template; set chat_template = false")
        if wanted is False or not has:
            return item.plain_text()
        return tok.apply_chat_template(item.chat(), add_generation_prompt=True, tokenize=False)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.lm, "generation_config", None), self.tok):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        if not prompts:
            return []
        import torch

        self.start()
        tok, lm = self.tok, self.lm
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        eos = sorted(self._eos_ids())
        greedy = sampling.temperature == 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(sampling.max_tokens),
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": eos or None,
            "do_sample": not greedy,
        }
        if greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p), top_k=None)
            torch.manual_seed(int(sampling.seed))
        if sampling.logprobs is not None:
            kwargs.update(output_scores=True, return_dict_in_generate=True)
        top_k = int(sampling.top_logprobs or 0)
        if top_k:  # the raw logits (before temperature / top-p), like vLLM's default raw logprobs
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        sent = time.time()
        ftz = bool(getattr(self, "flush_denormal", False)) and torch.set_flush_denormal(True)
        try:
            with torch.inference_mode():
                out = lm.generate(**enc, **kwargs)
        finally:
            if ftz:
                torch.set_flush_denormal(False)
        finished = time.time()
        sequences = out.sequences if hasattr(out, "sequences") else out
        new = sequences[:, enc["input_ids"].shape[1]:].tolist()
        eos_set = set(eos)
        top = _top_logprobs(out, top_k)
        results = []
        for row, ids in enumerate(new):
            cut = next((i for i, t in enumerate(ids) if t in eos_set), None)
            gen_ids = ids if cut is None else ids[: cut + 1]
            reason = "stop" if cut is not None else "length"
            logprobs = None
            if sampling.logprobs is not None and hasattr(out, "scores"):
                logprobs = [
                    float(torch.log_softmax(out.scores[i][row].float(), dim=-1)[t]) for i, t in enumerate(gen_ids)
                ]
            results.append(Generation(
                text=tok.decode(gen_ids, skip_special_tokens=True),
                token_ids=[int(t) for t in gen_ids],
                finish_reason=reason,
                timings={"sent": sent, "finished": finished},
                logprobs=logprobs,
                extra={"batch_size": len(prompts), "prompt_tokens": int(enc["attention_mask"][row].sum())},
                top_logprobs=None if top is None else _row_top(top, row, len(gen_ids)),
            ))
        return results

    # -- provenance --------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        import torch

        device = self.device or self._device()
        if device.startswith("cuda"):
            index = torch.device(device).index or 0
            device_name = torch.cuda.get_device_name(index)
        else:
            device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        fp: dict[str, Any] = {
            "backend": self.plugin_name,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "accelerate": _version("accelerate"),
            "device": device,
            "device_name": device_name,
            "dtype": self.dtype_name or self.options.get("dtype") or self.model.dtype
            or ("float16" if device.startswith("cuda") else "float32"),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "torch_threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "flush_denormal": getattr(self, "flush_denormal", False),
            "attn_implementation": getattr(getattr(self.lm, "config", None), "_attn_implementation", None)
            or self.options.get("attn_implementation"),
            "chat_template": self.options.get("chat_template", "auto"),
            "env": {k: os.environ[k] for k in ENV_FLAGS if k in os.environ},
        }
        return fp


def _top_logprobs(out: Any, k: int):
    """(logprobs, ids) tensors of shape [steps, batch, k]: the k most likely tokens at every generated step, from
    the raw logits (log-softmax over the vocabulary); None when off or the output has no logits."""
    logits = getattr(out, "logits", None) if k else None
    if not logits:
        return None
    import torch

    values, ids = [], []
    for step in logits:  # [batch, vocab] per step: one step at a time keeps the extra memory small
        v, i = torch.log_softmax(step.float(), dim=-1).topk(min(k, step.shape[-1]), dim=-1)
        values.append(v.tolist())
        ids.append(i.tolist())
    return values, ids


def _row_top(top, row: int, n: int) -> list[list[list[Any]]]:
    """Row ``row``'s first ``n`` steps as ``[[token id, logprob], ...]`` per token (logprobs to 6 decimals)."""
    values, ids = top
    return [[[int(t), round(float(v), 6)] for t, v in zip(ids[i][row], values[i][row])] for i in range(n)]


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@hookimpl
def register_backends(register):
    register("hf", HFBackend)
