"""Overlay names and the snapshot request, without libvirt (the real thing is in
tests/integration/test_overlay.py).
"""

from __future__ import annotations

import pytest
from lxml import etree

from virt_dup.backup.overlay import QuiesceResult, is_virt_dup_overlay, overlay_path
from virt_dup.libvirt.domain_xml import snapshot_xml

JOB = "0b9f6c1e-6f43-4c1e-9d1a-2b8f3c4d5e6f"


def test_overlay_sits_next_to_the_top_image_and_names_the_job() -> None:
    assert overlay_path("/images/vm01/vm01.qcow2", JOB) == f"/images/vm01/vm01.virt-dup-{JOB}.qcow2"


def test_a_top_not_named_qcow2_keeps_its_whole_name() -> None:
    assert overlay_path("/images/disk.img", JOB) == f"/images/disk.img.virt-dup-{JOB}.qcow2"
    assert overlay_path("/images/vm01.qcow2.snap", JOB) == (
        f"/images/vm01.qcow2.snap.virt-dup-{JOB}.qcow2"
    )


def test_overlay_path_is_absolute_and_clean() -> None:
    assert overlay_path("/images/x/../vm.qcow2", JOB) == f"/images/vm.virt-dup-{JOB}.qcow2"


def test_overlay_path_spells_the_job_in_lowercase() -> None:
    assert overlay_path("/images/vm.qcow2", JOB.upper()) == f"/images/vm.virt-dup-{JOB}.qcow2"


@pytest.mark.parametrize("job", ["", "not-a-uuid", "../" + JOB, JOB + "/x"])
def test_overlay_path_needs_a_job_uuid(job: str) -> None:
    with pytest.raises(ValueError, match="not a UUID"):
        overlay_path("/images/vm.qcow2", job)


def test_overlays_are_recognised_by_name() -> None:
    assert is_virt_dup_overlay(overlay_path("/images/vm.qcow2", JOB)) == JOB
    assert is_virt_dup_overlay(f"vm.virt-dup-{JOB}.qcow2") == JOB


@pytest.mark.parametrize(
    "path",
    [
        "/images/vm.qcow2",
        "/images/vm.snap.qcow2",
        f"/images/vm.virt-dup-{JOB}.qcow2.bak",
        f"/images/vm.virt-dup-{JOB}.raw",
        "/images/vm.virt-dup-123.qcow2",
        f"/images/vm.virt-dup-{JOB}.qcow2/other.qcow2",
    ],
)
def test_other_files_are_not_overlays(path: str) -> None:
    assert is_virt_dup_overlay(path) is None


def test_snapshot_request_overlays_the_selected_disks_and_leaves_the_others() -> None:
    xml = snapshot_xml(["vda", "vdb", "sda"], {"vdb": "/images/b.virt-dup.qcow2"})

    root = etree.fromstring(xml)
    disks = {disk.get("name"): disk for disk in root.iterfind("disks/disk")}
    assert list(disks) == ["vda", "vdb", "sda"]
    assert disks["vda"].attrib == {"name": "vda", "snapshot": "no"}
    assert disks["sda"].attrib == {"name": "sda", "snapshot": "no"}
    assert disks["vdb"].attrib == {"name": "vdb", "snapshot": "external", "type": "file"}
    assert disks["vdb"].xpath("string(driver/@type)") == "qcow2"
    assert disks["vdb"].xpath("string(source/@file)") == "/images/b.virt-dup.qcow2"


def test_snapshot_request_escapes_file_names() -> None:
    name = '/images/it\'s <odd> & "quoted".qcow2'
    root = etree.fromstring(snapshot_xml(["vda"], {"vda": name}))
    assert root.xpath("string(disks/disk/source/@file)") == name


def test_only_a_running_unfrozen_domain_is_crash_consistent_only() -> None:
    assert QuiesceResult(frozen=False, domain_active=True, reason="no agent").crash_consistent_only
    assert not QuiesceResult(frozen=True, domain_active=True).crash_consistent_only
    assert not QuiesceResult(frozen=False, domain_active=False).crash_consistent_only
