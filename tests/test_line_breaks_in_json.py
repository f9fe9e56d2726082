"""JSONL files evalhost reads split lines at ``\\n`` only: U+2028, U+2029 and NEL are legal inside a JSON string
(``json.dumps(..., ensure_ascii=False)`` writes them raw), so a hand-written candidates or adjudication file holding
one must load, not fail as "not JSON" (the adjudication case is in test_adjudicate.py). Also: a sampling number that TOML lets be infinite is refused."""
from __future__ import annotations

import json

import pytest
from evalhost.registry import build_registry

BREAKS = ["\u2028", "\u2029", "\u0085"]


@pytest.mark.parametrize("brk", BREAKS)
def test_candidates_row_with_a_unicode_line_break_in_a_string_loads(tmp_path, brk):
    row = {"task": "benign", "task_source": "builtin:benign", "item_id": "benign-001", "peers": ["benign-002"],
           "position": 0, "dispatcher": "prompt_list", "batch_size": 2, "group_id": f"g{brk}1",
           "kind": "label_flip"}
    path = tmp_path / "cand.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert brk in path.read_text(encoding="utf-8")  # written raw, not escaped
    source = build_registry(entry_points=False).get("task_source", "candidates")()
    items = source.load(str(path), {})
    assert len(items) == 1 and items[0].metadata["group_members"]
