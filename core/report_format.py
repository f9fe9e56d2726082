"""Formatting helpers shared by the report's sections: percentages, Wilson intervals, p-values, Markdown tables,
the plain-language headline sentence, and a flattened view of nested dicts (stack fingerprints)."""
from __future__ import annotations

import json
import math
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Mapping, Sequence

NOT_COMPARABLE_REASONS = ("error", "unlabelled", "prompt_mismatch", "duplicate")
REASON_WORDS = {"error": "error", "unlabelled": "unlabelled", "prompt_mismatch": "prompt mismatch",
                "duplicate": "duplicate", "missing": "missing on one side"}


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _pct_number(x: Any) -> str:
    """100 * x with one decimal, halves rounded up (3/48 = 6.25 % prints as 6.3, as a reader rounds)."""
    v = Decimal(repr(round(100 * float(x), 9)))
    return str(v.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def pct(x: Any) -> str:
    return "n/a" if _nan(x) else f"{_pct_number(x)}%"


def rate_ci(prop: Mapping[str, Any]) -> str:
    if not prop or not prop.get("n"):
        return "n/a"
    return f"{pct(prop['rate'])} [{pct(prop['lo'])}, {pct(prop['hi'])}]"


def pval(p: Any) -> str:
    """Three significant digits; exponents without a leading zero, as the addendum prints them (4.77e-7)."""
    if _nan(p):
        return "n/a"
    s = f"{float(p):.3g}"
    if "e" in s:
        mant, exp = s.split("e")
        s = f"{mant}e{int(exp)}"
    return s


def num(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if _nan(x) else format(float(x), fmt)


def _cell(x: Any) -> str:
    if x is None:
        return "—"
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def score(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"{float(x):.1f}" if float(x) == round(float(x), 1) else f"{float(x):g}"
    return str(x)


def json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return None if (math.isnan(x) or math.isinf(x)) else x
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [json_safe(v) for v in x]
    try:  # numpy scalars
        import numpy as np

        if isinstance(x, np.generic):
            return json_safe(x.item())
    except ImportError:
        pass
    return str(x)


def compact(obj: Any, limit: int = 240) -> str:
    s = json.dumps(obj, sort_keys=True, default=str)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# -- plain language -----------------------------------------------------------------------------------------------
def count_sentence(prop: Mapping[str, Any], noun: str, verb: str) -> str:
    """'0 of 48 comparable pairs changed label; at most 7.4 % at 95 %' (the Wilson upper bound) or
    '3 of 48 comparable pairs changed label (6.3 %, 95 % CI 2.1-16.8 %)'."""
    k, n = int(prop.get("k") or 0), int(prop.get("n") or 0)
    if not n:
        return f"no {noun} to compare"
    if k == 0:
        return f"0 of {n} {noun} {verb}; at most {_pct_number(prop['hi'])} % at 95 %"
    return (f"{k} of {n} {noun} {verb} ({_pct_number(prop['rate'])} %, 95 % CI "
            f"{_pct_number(prop['lo'])}-{_pct_number(prop['hi'])} %)")


def not_comparable_text(nc: Mapping[str, Any] | None) -> str:
    """'3 (2 error, 1 prompt mismatch)', '0', or '—' when the analysis gave no count."""
    if nc is None:
        return "—"
    parts = [(REASON_WORDS.get(r, str(r)), int(nc.get(r) or 0)) for r in
             list(NOT_COMPARABLE_REASONS) + [r for r in nc if r not in NOT_COMPARABLE_REASONS]]
    total = sum(n for _, n in parts)
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{n} {w}" for w, n in parts if n) + ")"


# -- nested dicts as tables ---------------------------------------------------------------------------------------
def flatten(obj: Any, prefix: str = "", lists: bool = False) -> dict[str, Any]:
    """``{"env": {"A": "1"}, "args": ["--x", "2"]}`` -> ``{"env.A": "1", "args": "--x 2"}``; lists of scalars are
    joined with spaces (kept as lists of str with ``lists=True``), lists holding dicts are indexed."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        if not obj and prefix:
            out[prefix] = "{}"
        for k in sorted(obj, key=str):
            out.update(flatten(obj[k], f"{prefix}.{k}" if prefix else str(k), lists))
    elif isinstance(obj, (list, tuple)):
        if any(isinstance(v, (Mapping, list, tuple)) for v in obj):
            for i, v in enumerate(obj):
                out.update(flatten(v, f"{prefix}[{i}]", lists))
        elif lists:
            out[prefix or "value"] = ["—" if v is None else str(v) for v in obj]
        else:
            out[prefix or "value"] = " ".join("—" if v is None else str(v) for v in obj) if obj else "[]"
    else:
        out[prefix or "value"] = "—" if obj is None else str(obj)
    return out


def differing_fields(objs: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Flatten every object; return (fields whose value differs between objects, {field: value} shared by all)."""
    flat = {name: flatten(o) for name, o in objs.items()}
    fields = sorted({f for fl in flat.values() for f in fl})
    differ, shared = [], {}
    for f in fields:
        vals = {fl.get(f, "(absent)") for fl in flat.values()}
        if len(vals) == 1:
            shared[f] = vals.pop()
        else:
            differ.append(f)
    return differ, shared


def list_middles(values: Sequence[Any]) -> tuple[list[str], str] | None:
    """For lists (e.g. server arguments) that differ: each list's differing middle, marked with '…' where a part
    shared by all was left out, and that shared part as one string; None unless every value is a list."""
    if not values or not all(isinstance(v, list) for v in values):
        return None
    pre = 0
    while all(len(v) > pre for v in values) and len({v[pre] for v in values}) == 1:
        pre += 1
    suf = 0
    while all(len(v) - pre > suf for v in values) and len({v[len(v) - 1 - suf] for v in values}) == 1:
        suf += 1
    if pre and pre < min(len(v) for v in values) and str(values[0][pre - 1]).startswith("-") and \
            not str(values[0][pre]).startswith("-"):
        pre -= 1  # keep a flag with the value that differs
    if not pre and not suf:
        return None
    mids = [(["…"] if pre else []) + (v[pre:len(v) - suf] or ["(nothing)"]) + (["…"] if suf else [])
            for v in values]
    shared = " ".join(values[0][:pre]) + " … " + " ".join(values[0][len(values[0]) - suf:] if suf else [])
    return [" ".join(m) for m in mids], shared.strip()
