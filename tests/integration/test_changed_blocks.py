"""Changed-block reads from libvirt checkpoints on a real running domain
(docs/changed-blocks.md): what a read holds, and that stacking it onto the
image as it was gives the image as it is."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from harness.backups import guest_view, same_guest_view
from harness.domains import MIB

from virt_dup.images.qemu_img import apply_changes
from virt_dup.libvirt.checkpoints import ChangedBlocks, ChangesUnavailable, checkpoint_name
from virt_dup.libvirt.connection import Hypervisor

pytestmark = pytest.mark.integration

JOB = "5e2baef0-d99e-4e22-b65d-25d0dbb82f58"


def allocated(image: Path) -> int:
    """Bytes of data the qcow2 itself holds (not its backing file)."""
    listing = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sum(
        extent["length"]
        for extent in json.loads(listing)
        if extent["depth"] == 0 and extent["data"]
    )


def test_a_read_since_a_checkpoint_holds_the_writes_and_rebuilds_the_image(
    make_domain, libvirt_conn, tmp_path: Path
) -> None:
    vm = make_domain(running=True, size=64 * MIB, disks=["vda", "vdb"])
    top = vm.images["vda"][-1]
    blocks = ChangedBlocks(Hypervisor(libvirt_conn), vm.domain)
    first = checkpoint_name(JOB, "20261202T020000Z")
    blocks.create_checkpoint(first, ["vda"], ["vda", "vdb"])
    before = guest_view(top, tmp_path / "before.qcow2")  # what a backup read then
    vm.write_pattern("vda", 0x5A, 8 * MIB, 3 * MIB)
    vm.write_pattern("vda", 0x5B, 40 * MIB, 1 * MIB)
    vm.write_pattern("vdb", 0x5C, 0, 1 * MIB)  # not tracked, not read

    changes = top.parent / "vda.changes.qcow2"  # where QEMU may write, as overlays
    second = checkpoint_name(JOB, "20261203T020000Z")
    blocks.back_up_changes(first, second, {"vda": changes}, ["vda", "vdb"], timeout_s=60)

    assert 4 * MIB <= allocated(changes) <= 4 * MIB + 2 * 64 * 1024  # cluster slack
    assert blocks.checkpoints(JOB) == [first, second]
    rebuilt = tmp_path / "rebuilt.qcow2"
    shutil.copy(before, rebuilt)
    apply_changes(str(rebuilt), str(changes))
    assert same_guest_view(rebuilt, guest_view(top, tmp_path / "now.qcow2"))

    # The older checkpoint goes; the next read starts from the newer one.
    blocks.delete_checkpoint(first)
    assert blocks.checkpoints(JOB) == [second]
    vm.write_pattern("vda", 0x5D, 20 * MIB, 1 * MIB)
    third_changes = top.parent / "vda.changes-3.qcow2"
    blocks.back_up_changes(
        second, checkpoint_name(JOB, "20261204T020000Z"), {"vda": third_changes}, ["vda", "vdb"], 60
    )
    assert 1 * MIB <= allocated(third_changes) <= 1 * MIB + 2 * 64 * 1024
    apply_changes(str(rebuilt), str(third_changes))
    assert same_guest_view(rebuilt, guest_view(top, tmp_path / "now-3.qcow2"))


def test_a_checkpoint_that_is_gone_is_a_fallback_not_a_failure(
    make_domain, libvirt_conn, tmp_path: Path
) -> None:
    vm = make_domain(running=True, size=16 * MIB)
    blocks = ChangedBlocks(Hypervisor(libvirt_conn), vm.domain)
    with pytest.raises(ChangesUnavailable, match="has no checkpoint"):
        blocks.back_up_changes(
            checkpoint_name(JOB, "20261202T020000Z"),
            checkpoint_name(JOB, "20261203T020000Z"),
            {"vda": tmp_path / "changes.qcow2"},
            ["vda"],
            60,
        )
    assert not (tmp_path / "changes.qcow2").exists()
    assert blocks.checkpoints(JOB) == []
    with pytest.raises(Exception, match="not a virt-dup checkpoint"):
        blocks.delete_checkpoint("users-own")
