"""The restored domain's XML (``restore --define``): the same domain, or a copy."""

from __future__ import annotations

import pytest
from lxml import etree

from virt_dup.errors import VirtDupError
from virt_dup.libvirt.domain_xml import (
    DefinitionChanges,
    RestoredDisk,
    disk_sources,
    point_disks_at,
    rewrite_definition,
)

SAVED = """<domain type='kvm'>
  <name>vm01</name>
  <uuid>5e3c7d8a-9b0f-4c1d-a2e3-f40516273849</uuid>
  <metadata>
    <other:x xmlns:other="http://example.com/other">kept</other:x>
    <virt-dup:instance xmlns:virt-dup="https://www.github.com/spencerharmon/virt-dup">
      <virt-dup:job uuid="0e1f2a3b-1111-4222-8333-444455556666"/>
    </virt-dup:instance>
  </metadata>
  <memory unit='KiB'>65536</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'
      >/var/lib/libvirt/qemu/nvram/vm01_VARS.fd</nvram>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/vm01.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm01-data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>"""

RESTORED = {"vda": RestoredDisk("/srv/restore/vda/vm01.qcow2", "qcow2")}


def everything_exists(_path: str) -> bool:
    return True


def rewritten(
    changes: DefinitionChanges, exists=everything_exists
) -> tuple[etree._Element, list[str]]:
    xml, notices = rewrite_definition(SAVED, changes, exists)
    return etree.fromstring(xml), notices


def test_the_same_domain_comes_back_as_it_was_on_the_restored_files() -> None:
    root, notices = rewritten(DefinitionChanges(disks=RESTORED))

    assert root.findtext("name") == "vm01"
    assert root.findtext("uuid") == "5e3c7d8a-9b0f-4c1d-a2e3-f40516273849"
    assert root.find("devices/interface/mac").get("address") == "52:54:00:12:34:56"
    assert root.findtext("os/nvram") == "/var/lib/libvirt/qemu/nvram/vm01_VARS.fd"
    assert len(root.findall("metadata/*")) == 2  # its jobs travel with it
    vda = root.xpath("devices/disk[target/@dev='vda']")[0]
    assert vda.find("source").attrib == {"file": "/srv/restore/vda/vm01.qcow2"}
    assert vda.find("backingStore") is None  # libvirt reads the chain from the headers
    assert vda.find("driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "none"}
    # disks not restored stay as they were
    assert disk_sources(etree.tostring(root, encoding="unicode"))["vdb"] == (
        "/var/lib/libvirt/images/vm01-data.qcow2"
    )
    assert notices == []


def test_a_copy_gets_a_new_identity_and_nothing_of_the_original() -> None:
    root, notices = rewritten(DefinitionChanges(disks=RESTORED, name="vm01-test", copy=True))

    assert root.findtext("name") == "vm01-test"
    assert root.find("uuid") is None  # libvirt makes a new one
    assert root.find("devices/interface/mac") is None
    assert root.find("devices/interface/source").get("network") == "default"
    nvram = root.find("os/nvram")
    assert nvram is not None and nvram.text is None
    assert nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    assert [etree.QName(child).localname for child in root.find("metadata")] == ["x"]
    targets = [disk.get("dev") for disk in root.findall("devices/disk/target")]
    assert targets == ["vda", "sda"]  # vdb is the original's: left out; the cdrom stays
    assert any("no virt-dup jobs" in line for line in notices)
    assert any("disk vdb was not restored" in line for line in notices)
    assert any("own UEFI variable store" in line for line in notices)


def test_firmware_and_emulator_missing_on_this_host() -> None:
    def exists(path: str) -> bool:
        return not path.startswith(("/usr/share/OVMF", "/usr/bin/qemu"))

    root, notices = rewritten(DefinitionChanges(disks=RESTORED), exists)

    os_element = root.find("os")
    assert os_element.get("firmware") == "efi"
    assert os_element.find("loader") is None and os_element.find("nvram") is None
    assert root.find("devices/emulator") is None
    assert len(notices) == 2


def test_a_disk_the_saved_xml_does_not_have_is_an_error() -> None:
    with pytest.raises(VirtDupError, match="no disk vdz"):
        rewrite_definition(
            SAVED, DefinitionChanges(disks={"vdz": RestoredDisk("/x", "qcow2")}), everything_exists
        )


def test_in_place_only_the_disk_source_changes() -> None:
    xml = point_disks_at(SAVED, {"vdb": RestoredDisk("/i/vm01-data.qcow2", "qcow2")})

    assert disk_sources(xml) == {
        "vda": "/var/lib/libvirt/images/vm01.qcow2",
        "vdb": "/i/vm01-data.qcow2",
        "sda": "/srv/iso/install.iso",
    }
    assert etree.fromstring(xml).findtext("uuid") == "5e3c7d8a-9b0f-4c1d-a2e3-f40516273849"


def test_a_disk_that_was_not_restored_and_is_not_here_is_reported() -> None:
    def exists(path: str) -> bool:
        return path != "/var/lib/libvirt/images/vm01-data.qcow2"

    root, notices = rewritten(DefinitionChanges(disks=RESTORED), exists)

    assert notices == [
        "disk vdb: /var/lib/libvirt/images/vm01-data.qcow2 is not on this host (not restored)"
    ]
    assert len(root.findall("devices/disk")) == 3  # still defined: the user decides
