"""evalhost.rundir.RunDir, the API every writer of a run directory uses (run, resume, rescore, adjudicate, report)."""
from __future__ import annotations

import json
import os

import pytest

from evalhost.errors import UserError
from evalhost.rundir import RunDir


def test_write_atomic_replaces_whole_files_and_leaves_no_temp(tmp_path):
    rd = RunDir(tmp_path)
    rd.write_atomic("summary.json", "one")
    rd.write_atomic("summary.json", b"two")
    assert (tmp_path / "summary.json").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.parametrize("method", ["write_atomic", "open_append", "read_json", "open_read", "move_in"])
def test_no_method_goes_through_a_link(tmp_path, method):
    outside = tmp_path / "outside.txt"
    outside.write_text('{"a": 1}')
    run = tmp_path / "run"
    run.mkdir()
    (run / "f.json").symlink_to(outside)
    rd = RunDir(run)
    src = run / "new.png"
    src.write_text("png")
    calls = {"write_atomic": lambda: rd.write_atomic("f.json", "x"), "open_append": lambda: rd.open_append("f.json"),
             "read_json": lambda: rd.read_json("f.json"), "open_read": lambda: rd.open_read("f.json"),
             "move_in": lambda: rd.move_in(src, "f.json")}
    with pytest.raises(UserError, match="symbolic link"):
        calls[method]()
    assert outside.read_text() == '{"a": 1}'


def test_subdir_refuses_a_linked_directory_and_writes_inside_a_real_one(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "plots").symlink_to(other)
    with pytest.raises(UserError, match="symbolic link"):
        RunDir(run).write_atomic("a.png", b"x", subdir="plots")
    assert list(other.iterdir()) == []
    (run / "plots").unlink()
    assert RunDir(run).write_atomic("a.png", b"x", subdir="plots") == run / "plots" / "a.png"


def test_read_json_bounds_and_shape(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.read_json("manifest.json", default={}) == {}
    with pytest.raises(UserError, match="no manifest.json"):
        rd.read_json("manifest.json")
    (tmp_path / "manifest.json").write_text("[1]")
    with pytest.raises(UserError, match="JSON list, not an object"):
        rd.read_json("manifest.json")
    (tmp_path / "manifest.json").write_text(json.dumps({"x": "y" * 100}))
    with pytest.raises(UserError, match="larger than"):
        rd.read_json("manifest.json", limit=50)


def test_open_append_appends(tmp_path):
    rd = RunDir(tmp_path)
    (tmp_path / "records.jsonl").write_bytes(b"a\n")
    with rd.open_append("records.jsonl") as fh:
        fh.write(b"b\n")
    assert (tmp_path / "records.jsonl").read_bytes() == b"a\nb\n"
    assert os.stat(tmp_path / "records.jsonl").st_size == 4


def test_missing_directory_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        RunDir(tmp_path / "nope").require()


def test_a_refused_lock_names_a_holder_that_has_not_written_its_name_yet(tmp_path):
    """The holder truncates the lock file and then writes its name: a second process arriving in between must
    still be told who holds the directory (CI once saw 'in use by another process' there)."""
    import threading
    import time

    rd = RunDir(tmp_path)
    with rd.lock(purpose="run"):
        lock_file = tmp_path / "run.lock"
        name = lock_file.read_bytes()
        lock_file.write_bytes(b"")  # the window between the holder's truncate and its write

        def write_name_late():
            time.sleep(0.2)
            lock_file.write_bytes(name)

        t = threading.Thread(target=write_name_late)
        t.start()
        with pytest.raises(UserError) as exc:
            with RunDir(tmp_path).lock(purpose="run"):
                pass
        t.join()
    assert f"in use by pid {os.getpid()}" in str(exc.value)
