"""virt_dup.images.qemu_img.punch_holes: the zero runs a restore's checksum read found
become holes, and the file's content stays byte for byte the same."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from virt_dup.files import sha256_and_zero_runs
from virt_dup.images.qemu_img import punch_holes

MIB = 1 << 20


def test_punch_holes_frees_the_zero_runs_and_keeps_the_content(tmp_path: Path) -> None:
    data = bytearray(os.urandom(8 * MIB))
    data[MIB : 3 * MIB] = bytes(2 * MIB)
    data[5 * MIB + 4096 : 5 * MIB + 3 * 4096] = bytes(2 * 4096)
    path = tmp_path / "disk.qcow2"
    path.write_bytes(bytes(data))  # written zeros: allocated, as duplicity restores them
    allocated = path.stat().st_blocks
    digest, runs = sha256_and_zero_runs(path)
    assert runs == [(MIB, 2 * MIB), (5 * MIB + 4096, 2 * 4096)]

    assert punch_holes(os.fspath(path), runs)

    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert path.stat().st_size == len(data)
    assert path.stat().st_blocks * 512 <= allocated * 512 - 2 * MIB
    with path.open("rb") as stream:
        assert os.lseek(stream.fileno(), 0, os.SEEK_HOLE) == MIB
        assert os.lseek(stream.fileno(), MIB, os.SEEK_DATA) == 3 * MIB


def test_punch_holes_with_nothing_to_punch_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    path.write_bytes(os.urandom(MIB))
    before = path.stat()
    assert punch_holes(os.fspath(path), [])
    assert path.stat().st_blocks == before.st_blocks
    assert path.stat().st_mtime_ns == before.st_mtime_ns
