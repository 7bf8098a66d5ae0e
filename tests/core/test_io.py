"""Tests for memaudit.core.io: atomic file and folder writes."""

from __future__ import annotations

import json

import pytest

from memaudit.core.io import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_atomic_write_json(tmp_path):
    obj = {"a": 1, "b": [1.5, "x", None], "c": {"d": True}}
    path = atomic_write_json(tmp_path / "sub" / "result.json", obj)
    assert path == tmp_path / "sub" / "result.json"
    assert json.loads(path.read_text()) == obj
    assert path.read_text().endswith("\n")
    # overwrite in place; non-JSON values are written with str()
    atomic_write_json(path, {"p": tmp_path})
    assert json.loads(path.read_text()) == {"p": str(tmp_path)}
    assert _leftovers(path.parent) == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_atomic_write_text_and_bytes(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert json.loads(path.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_atomic_directory_replaces_whole_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "nested").mkdir()
    (target / "nested" / "x.txt").write_text("x")
    with atomic_directory(target) as tmp:
        assert tmp != target and tmp.parent == target.parent and tmp.is_dir()
        (tmp / "new.txt").write_text("new")
        # the old folder is untouched while the body runs
        assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_atomic_directory_new_folder(tmp_path):
    with atomic_directory(tmp_path / "a" / "b") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "a" / "b" / "f").read_text() == "1"
    assert _leftovers(tmp_path / "a") == []


def test_atomic_directory_error_keeps_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_error_without_old_folder(tmp_path):
    with pytest.raises(ValueError):
        with atomic_directory(tmp_path / "never") as tmp:
            (tmp / "x").write_text("1")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
