"""Helpers that install the toy plugin as a real distribution (a dist-info with an ``evalhost`` entry point)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).parent


def make_distribution(root: Path, name: str = "evalhost-toy", module: str = "evalhost_toy",
                      source: Path | None = None, entry: str | None = None, version: str = "0.3.1") -> Path:
    """Create ``root/<module>.py`` and ``root/<dist>.dist-info`` so that, with ``root`` on sys.path / PYTHONPATH,
    importlib.metadata finds distribution ``name`` with entry point ``evalhost: toy = <module>``."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(source or HERE / "evalhost_toy.py", root / f"{module}.py")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[evalhost]\n{entry or 'toy'} = {module}\n")
    return root


def write_tasks(path: Path, n: int = 12, domain: str = "safety") -> Path:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"q{i:03d}", "prompt": f"Question number {i}: tell me something.",
                                 "domain": domain}) + "\n")
    return path


def study_text(tasks: Path, out: Path, batch_sizes=(2, 4), extra: str = "") -> str:
    return f"""
[study]
name = "toy"
seed = 7
output_dir = "{out}"

[sampling]
max_tokens = 16

[[models]]
name = "toy-model"
path = "none"

[[backends]]
name = "toy"

[[dispatchers]]
name = "prompt_list"
batch_sizes = {list(batch_sizes)}

[[tasks]]
name = "toyset"
source = "jsonl:{tasks}"
scorer = "toy_refusal"
{extra}
"""
