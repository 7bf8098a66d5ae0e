"""Content digests (memaudit.core.digests): the SHA-256 of the bytes, remembered across calls by the file's stat, but never
trusted past an edit (even one whose modification time was put back), a tampered memo row or a corrupt memo."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from pathlib import Path

import pytest

from memaudit.core import digests
from memaudit.core.digests import MEMO_FILE, digest_many, file_digest, tree_digest


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MEMAUDIT_CACHE_DIR", str(folder))
    return folder


def hashed_files(monkeypatch) -> list[str]:
    """Record every file the module hashes (memo misses)."""
    seen: list[str] = []
    real = digests.sha256_file

    def spy(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(digests, "sha256_file", spy)
    return seen


def test_the_digest_is_the_sha256_of_the_bytes_and_is_remembered(tmp_path, cache, monkeypatch):
    data = os.urandom(3 * digests.BLOCK_BYTES + 17)  # several blocks and a partial one
    p = tmp_path / "a.bin"
    p.write_bytes(data)
    seen = hashed_files(monkeypatch)
    assert file_digest(p) == hashlib.sha256(data).hexdigest()
    assert (cache / MEMO_FILE).is_file() and len(seen) == 1
    assert file_digest(p) == hashlib.sha256(data).hexdigest() and len(seen) == 1  # the memo answered
    assert file_digest(tmp_path / "." / "a.bin") == hashlib.sha256(data).hexdigest() and len(seen) == 1


def test_an_edit_in_place_with_the_modification_time_put_back_is_noticed(tmp_path, cache):
    p = tmp_path / "img.png"
    p.write_bytes(b"A" * 1000)
    before = file_digest(p)
    st = os.stat(p)
    with open(p, "r+b") as f:  # same size, one byte changed
        f.seek(500)
        f.write(b"B")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_mtime_ns == st.st_mtime_ns and os.stat(p).st_size == st.st_size
    after = file_digest(p)
    assert after != before and after == hashlib.sha256(b"A" * 500 + b"B" + b"A" * 499).hexdigest()


def test_a_tampered_memo_row_is_not_trusted(tmp_path, cache, monkeypatch):
    p = tmp_path / "x.bin"
    p.write_bytes(b"hello")
    truth = hashlib.sha256(b"hello").hexdigest()
    assert file_digest(p) == truth
    with sqlite3.connect(cache / MEMO_FILE) as conn:
        table = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchone()[0]
        assert conn.execute(f"UPDATE {table} SET sha256 = ?", ("0" * 64,)).rowcount == 1
    seen = hashed_files(monkeypatch)
    assert file_digest(p) == truth and len(seen) == 1  # recomputed, and the row is written again
    assert file_digest(p) == truth and len(seen) == 1


def test_a_corrupt_memo_still_gives_correct_digests(tmp_path, cache, caplog):
    cache.mkdir(parents=True)
    (cache / MEMO_FILE).write_bytes(os.urandom(8192))
    files = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * (i + 1))
    with caplog.at_level(logging.WARNING, logger="memaudit.core.digests"):
        got = digest_many(files)
    assert got == [hashlib.sha256(bytes([i]) * (i + 1)).hexdigest() for i in range(3)]
    assert "corrupt" in caplog.text
    assert digest_many(files) == got  # the new memo works


def test_an_unusable_or_locked_memo_only_costs_the_hashing(tmp_path, monkeypatch):
    p = tmp_path / "f"
    p.write_bytes(b"data")
    (tmp_path / "plain-file").write_text("x")  # a cache folder that cannot be created
    monkeypatch.setenv("MEMAUDIT_CACHE_DIR", str(tmp_path / "plain-file" / "cache"))
    assert file_digest(p) == hashlib.sha256(b"data").hexdigest()
    monkeypatch.setenv("MEMAUDIT_CACHE_DIR", str(tmp_path / "cache"))
    assert file_digest(tmp_path / "plain-file") == hashlib.sha256(b"x").hexdigest()  # creates the memo
    monkeypatch.setattr(digests, "TIMEOUT_S", 0.05)
    holder = sqlite3.connect(tmp_path / "cache" / MEMO_FILE, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the lock
    try:
        p.write_bytes(b"other")
        assert file_digest(p) == hashlib.sha256(b"other").hexdigest()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_digest_many_uses_one_lookup_and_few_commits(tmp_path, cache, monkeypatch):
    files = [tmp_path / f"{i}.txt" for i in range(50)]
    for i, f in enumerate(files):
        f.write_text(str(i))
    inserts: list[int] = []
    real = digests._Memo.insert

    def insert(self, rows):
        rows = list(rows)
        inserts.append(len(rows))
        return real(self, rows)

    monkeypatch.setattr(digests._Memo, "insert", insert)
    progress: list[tuple[int, int]] = []
    got = digest_many(files, progress=lambda d, t: progress.append((d, t)))
    assert got == [hashlib.sha256(str(i).encode()).hexdigest() for i in range(50)]
    assert inserts == [50] and progress[0] == (0, 50) and progress[-1] == (50, 50)
    progress.clear()
    assert digest_many(files, progress=lambda d, t: progress.append((d, t))) == got
    assert inserts == [50] and progress == [(50, 50)]


def test_tree_digest_changes_with_any_file_and_any_name(tmp_path, cache):
    root = tmp_path / "model"
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    (root / "unet" / "w.bin").write_bytes(b"\1" * 100)
    (root / ".hidden").write_text("h")
    first = tree_digest(root)
    assert tree_digest(root) == first
    assert tree_digest(root / "model_index.json") == hashlib.sha256(b"{}").hexdigest()
    (root / ".hidden").write_text("H")
    second = tree_digest(root)
    assert second != first
    (root / "unet" / "w.bin").write_bytes(b"\2" + b"\1" * 99)
    third = tree_digest(root)
    assert third not in (first, second)
    (root / "unet" / "w.bin").rename(root / "unet" / "v.bin")
    assert tree_digest(root) not in (first, second, third)
    (root / "unet" / "v.bin").rename(root / "unet" / "w.bin")
    assert tree_digest(root) == third  # the same names and bytes: the same digest
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in root.rglob("*"):
        if p.is_file():
            (copy / p.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            (copy / p.relative_to(root)).write_bytes(p.read_bytes())
    assert tree_digest(copy) == third  # where it lives does not matter
