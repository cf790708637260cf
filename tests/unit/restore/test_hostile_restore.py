"""Hostile-input corpus, what a hostile backend restores: only regular files are taken.

duplicity gives back whatever the backup holds.  A symbolic link (or a FIFO,
a device, a directory) where a disk image or a metadata file should be must
be refused before anything reads, rewrites or links it: a link to
``/etc/shadow`` would otherwise be checksummed, rebased, hole-dug and
hard-linked into the target directory.  The end-to-end case, with a real
duplicity backup, is tests/integration/test_hostile_restore.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from virt_dup.errors import VirtDupError
from virt_dup.restore.plan import RestoreError
from virt_dup.restore.sources import _read_metadata_folder
from virt_dup.restore.workspace import check_regular_file


def symlink_to_shadow(path: Path) -> None:
    path.symlink_to("/etc/shadow")


def dangling_symlink(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere")


def fifo(path: Path) -> None:
    os.mkfifo(path)


def directory(path: Path) -> None:
    path.mkdir()


STAGED = [
    pytest.param(
        symlink_to_shadow, "a symbolic link to '/etc/shadow'", id="symlink to /etc/shadow"
    ),
    pytest.param(dangling_symlink, "a symbolic link to", id="dangling symlink"),
    pytest.param(fifo, "no regular file", id="FIFO"),
    pytest.param(directory, "no regular file", id="directory"),
]


@pytest.mark.parametrize(("make", "message"), STAGED)
def test_a_restored_image_that_is_no_regular_file_is_refused(
    tmp_path: Path, make: Callable[[Path], None], message: str
) -> None:
    staged = tmp_path / "staged"
    make(staged)
    with pytest.raises(RestoreError, match="refused") as caught:
        check_regular_file(str(staged), "/i/vm.qcow2")
    assert message in str(caught.value) and "/i/vm.qcow2" in str(caught.value)


def test_a_restored_regular_file_passes_and_a_missing_one_is_named(tmp_path: Path) -> None:
    (tmp_path / "staged").write_bytes(b"qcow")
    check_regular_file(str(tmp_path / "staged"), "/i/vm.qcow2")
    with pytest.raises(RestoreError, match=r"duplicity restored no file for /i/vm\.qcow2"):
        check_regular_file(str(tmp_path / "missing"), "/i/vm.qcow2")


def big_file(path: Path) -> None:
    with path.open("wb") as file:
        file.truncate(65 * 2**20)  # sparse: 65 MiB that take no space


def not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe{}")


METADATA = [
    pytest.param(symlink_to_shadow, "manifest.json in the backup is a symbolic link", id="symlink"),
    pytest.param(fifo, "manifest.json in the backup is not a regular file", id="FIFO"),
    pytest.param(directory, "incomplete metadata: Is a directory", id="directory"),
    pytest.param(big_file, "manifest.json in the backup is 68157440 bytes", id="65 MiB"),
    pytest.param(not_utf8, "manifest.json in the backup is not UTF-8", id="not UTF-8"),
]


@pytest.mark.parametrize(("make", "message"), METADATA)
def test_a_metadata_file_that_is_no_small_regular_file_is_refused(
    tmp_path: Path, make: Callable[[Path], None], message: str
) -> None:
    make(tmp_path / "manifest.json")
    (tmp_path / "domain.xml").write_text("<domain/>")
    with pytest.raises(VirtDupError) as caught:
        _read_metadata_folder(tmp_path, "backup B on file:///b", "/var/lib/virt-dup/metadata/j")
    assert str(caught.value).startswith(f"backup B on file:///b: {message}")
    assert "\n" not in str(caught.value)
