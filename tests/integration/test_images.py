"""qemu-img on real images: what a restore checks before a file is placed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from virt_dup.images.qemu_img import ImageError, check_image

pytestmark = pytest.mark.integration


def test_a_raw_image_that_is_a_qcow2_in_disguise_is_refused(tmp_path: Path) -> None:
    """A backup that calls a file raw while it probes as qcow2 (whose header could
    name /etc/shadow as its backing file) is refused, not placed."""
    disguised = tmp_path / "disk.img"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", disguised],
        check=True,
    )
    with pytest.raises(ImageError, match=r"is a qcow2 image, the backup says raw; refused"):
        check_image(str(disguised), "raw")


def test_a_real_raw_image_passes(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\0" * 65536)
    assert check_image(str(raw), "raw") is None
