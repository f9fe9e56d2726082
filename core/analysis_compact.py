"""The compact forms in which :mod:`evalhost.analysis_run` holds what it needs of a run (issue 18: ``evalhost report``
on a million records in a few hundred MB): the projection of a solo record that pairing reads (:func:`project`,
:class:`SoloIndex`), a kept pair dict (:class:`PairRow`), and the packings they use (hex digests as bytes, token
ids as arrays, shared small values).  Every packing is exact: packed values compare as the originals."""
from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Mapping as _MappingABC
from typing import Any, Mapping


def sha(rec: Mapping[str, Any]) -> str:
    s = rec.get("output_sha256")
    if s:
        return str(s)
    return hashlib.sha256(str(rec.get("output_text") or "").encode("utf-8")).hexdigest()


def _empty(text: Any) -> bool:
    return isinstance(text, str) and not text.strip()


def compact_ids(ids: Any) -> Any:
    """Token ids in a compact form that :func:`first_divergence` reads exactly like the list: ``array('i')`` when
    every id is an int that fits 32 bits, ``array('q')`` for 64 bits, else a tuple; None stays None."""
    if ids is None or isinstance(ids, (array, tuple)):
        return ids
    for code in ("i", "q"):
        try:
            if not any(type(i) is not int for i in ids):
                return array(code, ids)
        except OverflowError:
            continue
        break
    return tuple(ids)


def pack_hex(value: Any) -> Any:
    """A lowercase 64-digit hex digest as its 32 bytes (half the memory), anything else unchanged: an injective
    map, so packed values compare exactly as the originals."""
    if isinstance(value, str) and len(value) == 64:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            return value
        if raw.hex() == value:
            return raw
    return value


def text_id(rec: Mapping[str, Any]) -> Any:
    """What a text change compares: :func:`sha` of the record, packed (a projection already holds it packed)."""
    s = rec.get("output_sha256")
    return s if isinstance(s, bytes) else pack_hex(sha(rec))


_FLOATS: dict = {}


def shared(value: Any) -> Any:
    """One object per distinct label, score or name, so that a million records share them (strings interned,
    floats by their exact text; NaN and everything else unchanged)."""
    if type(value) is str and len(value) <= 256:
        return sys.intern(value)
    if type(value) is float and value == value and len(_FLOATS) < 100_000:
        return _FLOATS.setdefault(repr(value), value)
    return value


SOLO_FIELDS = ("key", "label", "score", "finish_reason", "scorer_error", "output_text", "prompt_sha256",
               "output_sha256", "output_token_ids")
_STATES: dict = {}


def project(rec: Mapping[str, Any]) -> tuple:
    """The compact projection of a cleaned record: exactly what :func:`make_pair` reads from a solo record, with
    the output text reduced to whether it is empty (``""``) or not (None), the two hashes packed (one 64-byte
    string when both are hex digests), the token ids compact and the small values shared between records:
    ``(key, (label, score, finish_reason, scorer_error, text), hashes, token ids)``.  :func:`expand` turns it back
    into a mapping."""
    text = rec.get("output_text")
    state = (shared(rec.get("label")), shared(rec.get("score")), shared(rec.get("finish_reason")),
             rec.get("scorer_error"), "" if _empty(text) else None)
    try:
        state = _STATES.setdefault(state, state) if len(_STATES) < 100_000 else state
    except TypeError:
        pass
    prompt, out = pack_hex(rec.get("prompt_sha256")), text_id(rec)
    hashes = prompt + out if type(prompt) is bytes and type(out) is bytes else (prompt, out)
    return (rec.get("key"), state, hashes, compact_ids(rec.get("output_token_ids")))


def expand(projection: tuple) -> dict[str, Any]:
    key, state, hashes, ids = projection
    prompt, out = (hashes[:32], hashes[32:]) if type(hashes) is bytes else hashes
    return dict(zip(SOLO_FIELDS, (key, *state, prompt, out, ids)))


class SoloIndex:
    """The projection (:func:`project`) of the first solo record of repeat 0 per ``(model, backend, task,
    item_id)`` (the pairing key).  Stored in columns: keys, hashes and token ids each in one growing buffer, so
    that a million solo items cost a few hundred bytes each, in a few large blocks that go back to the system
    when the index is dropped; :meth:`get` rebuilds the projection."""

    def __init__(self) -> None:
        self.by: dict[tuple, dict[Any, int]] = {}
        self.states: list[tuple] = []
        self.keys, self.key_end = bytearray(), array("q")
        self.hashes = bytearray()
        self.ids, self.ids_end = array("i"), array("q")
        self.odd: dict[int, tuple] = {}  # row -> its projection, when a part does not fit the columns

    def add(self, rec: Mapping[str, Any]) -> None:
        """``rec``: a kept, cleaned record (only a solo of repeat 0 is indexed, the first per pairing key)."""
        if rec.get("condition") != "solo" or rec["repeat"] != 0:
            return
        inner = self.by.setdefault((rec.get("model"), rec.get("backend"), rec.get("task")), {})
        item = rec.get("item_id")
        if item in inner:
            return
        row = inner[item] = len(self.states)
        key, state, hashes, ids = project(rec)
        self.states.append(state)
        fits = (type(key) is str and type(hashes) is bytes
                and (ids is None or (type(ids) is array and ids.typecode == "i")))
        if not fits:
            self.odd[row] = (key, state, hashes, ids)
            key, hashes, ids = "", bytes(64), None
        self.keys += key.encode("utf-8", "surrogatepass")
        self.key_end.append(len(self.keys))
        self.hashes += hashes
        if ids is not None:
            self.ids += ids
        self.ids_end.append(len(self.ids) if ids is not None else -1 - len(self.ids))

    def get(self, rec: Mapping[str, Any]) -> tuple | None:
        """The projection of ``rec``'s solo (``rec``: any cleaned record), or None."""
        inner = self.by.get((rec.get("model"), rec.get("backend"), rec.get("task")))
        row = None if inner is None else inner.get(rec.get("item_id"))
        if row is None:
            return None
        if row in self.odd:
            return self.odd[row]
        k0 = self.key_end[row - 1] if row else 0
        key = self.keys[k0:self.key_end[row]].decode("utf-8", "surrogatepass")
        end = self.ids_end[row]
        start = (self.ids_end[row - 1] if self.ids_end[row - 1] >= 0 else -1 - self.ids_end[row - 1]) if row else 0
        ids = self.ids[start:end] if end >= 0 else None
        return (key, self.states[row], bytes(self.hashes[64 * row:64 * row + 64]), ids)

    def __len__(self) -> int:
        return len(self.states)


class PairRow(_MappingABC):
    """A pair dict kept for later (the changed pairs of a report), read like the dict (``p["flip"]``,
    ``p.get("key")``, ``dict(p)``): its values in one tuple, the field names shared by every row, strings
    shared with the other records."""

    __slots__ = ("_index", "_values")
    _indexes: dict = {}

    def __init__(self, p: Mapping[str, Any]) -> None:
        names = tuple(p)
        self._index = PairRow._indexes.setdefault(names, {n: i for i, n in enumerate(names)})
        self._values = tuple(shared(v) if type(v) is str else [shared(x) for x in v] if type(v) is list else v
                             for v in p.values())

    def __getitem__(self, name: str) -> Any:
        return self._values[self._index[name]]

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"PairRow({dict(self)!r})"
