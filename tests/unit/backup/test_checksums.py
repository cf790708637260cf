"""Checksums remembered by file identity: reused while a file is untouched,
read again after any change (even one that puts the mtime back)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from virt_dup.backup.checksums import ChecksumCache


def counting(calls: list[str]):
    def hash_file(path: str) -> str:
        calls.append(path)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    return hash_file


def test_an_untouched_file_is_not_read_again(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"base data")
    calls: list[str] = []
    first = ChecksumCache(tmp_path / "cache.json", counting(calls))
    digest = first.digests([str(base)])[str(base)]
    first.save()
    again = ChecksumCache(tmp_path / "cache.json", counting(calls))
    assert (
        again.digests([str(base)])[str(base)] == digest == hashlib.sha256(b"base data").hexdigest()
    )
    assert calls == [str(base)]  # read once, over two runs
    assert again.hashed == []


def test_a_change_is_seen_even_with_its_mtime_put_back(tmp_path: Path) -> None:
    """Bit rot aside, nothing changes a file's bytes without changing its ctime."""
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"base data")
    calls: list[str] = []
    first = ChecksumCache(tmp_path / "cache.json", counting(calls))
    first.digests([str(base)])[str(base)]
    first.save()
    status = base.stat()
    base.write_bytes(b"BASE DATA")  # same size
    os.utime(base, ns=(status.st_atime_ns, status.st_mtime_ns))  # mtime as it was
    again = ChecksumCache(tmp_path / "cache.json", counting(calls))
    assert again.digests([str(base)])[str(base)] == hashlib.sha256(b"BASE DATA").hexdigest()
    assert len(calls) == 2


def test_a_broken_or_missing_cache_only_costs_a_read(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"x")
    (tmp_path / "cache.json").write_text("{not json")
    calls: list[str] = []
    cache = ChecksumCache(tmp_path / "cache.json", counting(calls))
    assert cache.digests([str(base)])[str(base)] == hashlib.sha256(b"x").hexdigest()
    cache.save()
    assert (tmp_path / "cache.json").stat().st_mode & 0o777 == 0o600
    unwritable = ChecksumCache(tmp_path / "no" / "such" / "dir" / "c.json", counting(calls))
    (tmp_path / "no").write_text("a file")  # the directory cannot be made
    unwritable.digests([str(base)])[str(base)]
    unwritable.save()  # a warning, not an error
