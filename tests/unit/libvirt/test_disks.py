"""The disks of a domain definition and the ones a job selects.

``parse_disks`` reads every ``<disk>`` (file, block, network, cdrom);
``select_disks`` turns a job's :class:`DiskSelector` into disks, by target dev
or by source file (compared symlink-free), or every qcow2 disk when the
selector is empty, and refuses whatever virt-dup cannot back up.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virt_dup.errors import ConfigError, NotFoundError
from virt_dup.libvirt.domain_xml import Disk, parse_disks, select_disks
from virt_dup.libvirt.metadata import DiskSelector

IMAGES = "/var/lib/libvirt/images"


def domain(*disks: str) -> str:
    return (
        "<domain type='kvm'><name>vm01</name><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        + "".join(disks)
        + "<interface type='network'><source network='default'/></interface>"
        "</devices></domain>"
    )


def file_disk(dev: str, source: str, driver: str = "qcow2") -> str:
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='{driver}'/>"
        f"<source file='{source}'/><target dev='{dev}' bus='virtio'/></disk>"
    )


VDA = file_disk("vda", f"{IMAGES}/vm01.qcow2")
VDB = file_disk("vdb", f"{IMAGES}/vm01-data.qcow2")
RAW = file_disk("vdc", f"{IMAGES}/scratch.img", driver="raw")
BLOCK = (
    "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
    "<source dev='/dev/vg0/vm01'/><target dev='vdd' bus='virtio'/></disk>"
)
NETWORK = (
    "<disk type='network' device='disk'><driver name='qemu' type='qcow2'/>"
    "<source protocol='rbd' name='pool/vm01'><host name='ceph1'/></source>"
    "<target dev='vde' bus='virtio'/></disk>"
)
CDROM = (
    "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
    "<source file='/srv/iso/install.iso'/><target dev='sda' bus='sata'/><readonly/></disk>"
)
EMPTY_CDROM = "<disk type='file' device='cdrom'><target dev='sdb' bus='sata'/></disk>"


def disks_of(*disks: str) -> list[Disk]:
    return parse_disks(domain(*disks), "vm01")


# -- parse_disks ----------------------------------------------------------------------------
def test_every_disk_is_read_in_document_order() -> None:
    assert disks_of(VDA, RAW, BLOCK, NETWORK, CDROM, EMPTY_CDROM) == [
        Disk("vda", f"{IMAGES}/vm01.qcow2", "qcow2", "disk", "file"),
        Disk("vdc", f"{IMAGES}/scratch.img", "raw", "disk", "file"),
        Disk("vdd", "/dev/vg0/vm01", "raw", "disk", "block"),
        Disk("vde", "pool/vm01", "qcow2", "disk", "network"),
        Disk("sda", "/srv/iso/install.iso", "raw", "cdrom", "file"),
        Disk("sdb", None, None, "cdrom", "file"),
    ]


def test_libvirts_defaults_for_left_out_attributes() -> None:
    (disk,) = disks_of(f"<disk><source file='{IMAGES}/a.qcow2'/><target dev='hda'/></disk>")
    assert (disk.device, disk.source_type, disk.driver_type) == ("disk", "file", None)
    assert not disk.is_qcow2_file  # no <driver type>: not known to be qcow2
    assert disks_of() == []


def test_only_qcow2_files_that_are_disks_can_be_backed_up() -> None:
    every_kind = disks_of(VDA, VDB, RAW, BLOCK, NETWORK, CDROM, EMPTY_CDROM)
    assert [disk.target for disk in every_kind if disk.is_qcow2_file] == ["vda", "vdb"]
    assert not Disk("vdx", None, "qcow2", "disk", "file").is_qcow2_file
    assert not Disk("sdc", "/i/x.qcow2", "qcow2", "cdrom", "file").is_qcow2_file
    assert not Disk("vdy", "/dev/sdb", "qcow2", "disk", "block").is_qcow2_file


# -- select_disks ---------------------------------------------------------------------------
ALL = disks_of(VDA, VDB, RAW, BLOCK, CDROM)


def targets(selector: DiskSelector, disks: list[Disk] = ALL) -> list[str]:
    return [disk.target for disk in select_disks(disks, selector, "vm01")]


def test_an_empty_selector_means_every_qcow2_disk() -> None:
    assert targets(DiskSelector()) == ["vda", "vdb"]


def test_disks_by_target_dev_and_by_path_in_selector_order() -> None:
    assert targets(DiskSelector(devs=("vdb",))) == ["vdb"]
    assert targets(DiskSelector(devs=("vdb", "vda"))) == ["vdb", "vda"]
    assert targets(DiskSelector(paths=(f"{IMAGES}/vm01-data.qcow2",))) == ["vdb"]
    assert targets(DiskSelector(devs=("vdb",), paths=(f"{IMAGES}/vm01.qcow2",))) == ["vdb", "vda"]
    assert targets(DiskSelector(paths=(f"{IMAGES}/other/../vm01.qcow2",))) == ["vda"]


def test_a_path_through_a_symlink_is_the_same_disk(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "vm01.qcow2").write_bytes(b"")
    os.symlink(images, tmp_path / "link")
    os.symlink(images / "vm01.qcow2", tmp_path / "vm01-current.qcow2")
    real = disks_of(file_disk("vda", str(images / "vm01.qcow2")), VDB)
    linked = disks_of(file_disk("vda", str(tmp_path / "link" / "vm01.qcow2")), VDB)

    for selected in (tmp_path / "link" / "vm01.qcow2", tmp_path / "vm01-current.qcow2"):
        assert targets(DiskSelector(paths=(str(selected),)), real) == ["vda"]
    assert targets(DiskSelector(paths=(str(images / "vm01.qcow2"),)), linked) == ["vda"]


def test_an_unknown_dev_is_not_found_and_lists_the_disks() -> None:
    with pytest.raises(NotFoundError) as caught:
        select_disks(ALL, DiskSelector(devs=("vdz",)), "vm01")
    assert str(caught.value) == "domain vm01 has no disk vdz (its disks: vda, vdb, vdc, vdd, sda)"


def test_an_unknown_path_is_not_found() -> None:
    path = f"{IMAGES}/vm02.qcow2"
    with pytest.raises(NotFoundError) as caught:
        select_disks(ALL, DiskSelector(devs=("vda",), paths=(path,)), "vm01")
    assert str(caught.value) == f"{path} is not a disk of domain vm01"


@pytest.mark.parametrize(
    ("selector", "target", "kind"),
    [
        (DiskSelector(devs=("vdc",)), "vdc", "raw"),
        (DiskSelector(paths=(f"{IMAGES}/scratch.img",)), "vdc", "raw"),
        (DiskSelector(devs=("vda", "vdd")), "vdd", "raw"),
        (DiskSelector(devs=("sda",)), "sda", "raw"),
    ],
)
def test_a_disk_that_is_no_qcow2_file_is_refused(
    selector: DiskSelector, target: str, kind: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        select_disks(ALL, selector, "vm01")
    assert str(caught.value) == (
        f"disk {target} of domain vm01 is not a qcow2 file ({kind}); virt-dup backs up qcow2 disks"
    )


def test_a_qcow2_image_on_the_network_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^disk vde of domain vm01 is not a qcow2 file "):
        select_disks(disks_of(VDA, NETWORK), DiskSelector(devs=("vde",)), "vm01")


def test_a_domain_without_a_qcow2_disk_has_nothing_to_back_up() -> None:
    for disks in (disks_of(RAW, BLOCK, CDROM), disks_of()):
        with pytest.raises(ConfigError) as caught:
            select_disks(disks, DiskSelector(), "vm01")
        assert str(caught.value) == "domain vm01 has no qcow2 disk to back up"


def test_a_disk_named_by_dev_and_by_path_is_selected_once() -> None:
    """virt-dup(8): a job backs up the union of its dev and path selectors."""
    both = DiskSelector(devs=("vda",), paths=(f"{IMAGES}/vm01.qcow2",))
    assert targets(both) == ["vda"]
