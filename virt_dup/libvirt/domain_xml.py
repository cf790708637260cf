"""The domain XML, read and rewritten in one place.  Pure.

* :class:`Disk` and :func:`parse_disks`: the disks of a definition, as
  virt-dup needs them; :func:`select_disks`: the ones a job names;
* :func:`point_disk_at`: one disk of a definition on a new source file
  (overlays merged back, in-place restores);
* :func:`snapshot_xml`: the ``<domainsnapshot>`` of virt-dup's overlays;
* :func:`rewrite_definition`: the definition of a restored domain.

A backup keeps the domain's persistent XML as it was before the run
(``domain.xml`` of the metadata folder).  ``virt-dup restore --define``
defines the domain from it with :func:`rewrite_definition`:

* the restored disks point at the restored top files (``<source file>``,
  ``<driver type>``; any ``<backingStore>`` goes: libvirt reads the chain
  from the qcow2 headers);
* as the **same domain** (its UUID is free on this host: disaster
  recovery) the name, UUID, MAC addresses, NVRAM file and virt-dup jobs
  stay: the domain is back as it was, and its backups carry on;
* as a **copy** (the original is still defined here) it gets a new name,
  no ``<uuid>`` (libvirt makes a new one), no ``<mac>`` addresses (libvirt
  makes new ones: two guests must not share one), no NVRAM path (libvirt
  makes a fresh variable store from the template, named after the copy),
  no virt-dup jobs (two domains must not write into one job's
  collection), and none of the original's writable disks that were not
  restored (a copy must never write to the original's files);
* host-specific paths that do not exist on this host are adjusted: a
  missing ``<emulator>`` is dropped (libvirt picks its default); a missing
  pflash ``<loader>`` turns into firmware auto-selection
  (``<os firmware='efi'>``), without an NVRAM path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virt_dup import NAMESPACE
from virt_dup.errors import ConfigError, NotFoundError, VirtDupError, shown
from virt_dup.libvirt.metadata import DiskSelector, parse_xml


@dataclass(frozen=True)
class Disk:
    """A disk of a domain as its XML describes it."""

    target: str  # target dev, e.g. vda
    source: str | None  # source file (top of the chain); None for non-file disks
    driver_type: str | None  # qcow2, raw...
    device: str  # disk, cdrom...
    source_type: str  # file, block, network...

    @property
    def is_qcow2_file(self) -> bool:
        return (
            self.device == "disk"
            and self.source_type == "file"
            and self.driver_type == "qcow2"
            and self.source is not None
        )


def parse_disks(domain_xml: str | bytes, where: str) -> list[Disk]:
    """Every ``<disk>`` of a domain XML document, in document order."""
    root = parse_xml(domain_xml, where)
    disks = []
    for element in root.iterfind("devices/disk"):
        source = element.find("source")
        target = element.find("target")
        driver = element.find("driver")
        file_name = None
        if source is not None:
            file_name = source.get("file") or source.get("dev") or source.get("name")
        disks.append(
            Disk(
                target=target.get("dev", "") if target is not None else "",
                source=file_name,
                driver_type=driver.get("type") if driver is not None else None,
                device=element.get("device", "disk"),
                source_type=element.get("type", "file"),
            )
        )
    return disks


def real_path(path: str) -> str:
    """Absolute, symlink-free spelling of an image path (for comparing disks)."""
    return os.path.realpath(Path(path))


def select_disks(disks: Sequence[Disk], selector: DiskSelector, domain_name: str) -> list[Disk]:
    """The disks a selector names; every name must match a qcow2 file disk.

    Raises :class:`NotFoundError` for a dev or path that is no disk of the
    domain and :class:`ConfigError` for a disk virt-dup cannot back up.
    """
    by_target = {disk.target: disk for disk in disks}
    by_path = {
        real_path(disk.source): disk for disk in disks if disk.source_type == "file" and disk.source
    }
    chosen: list[Disk] = []
    for dev in selector.devs:
        if dev not in by_target:
            targets = ", ".join(by_target) or "none"
            raise NotFoundError(
                f"domain {domain_name} has no disk {shown(dev)} (its disks: {targets})"
            )
        chosen.append(by_target[dev])
    for path in selector.paths:
        disk = by_path.get(real_path(path))
        if disk is None:
            raise NotFoundError(f"{shown(path)} is not a disk of domain {domain_name}")
        chosen.append(disk)
    if selector.all_disks:
        chosen = [disk for disk in disks if disk.is_qcow2_file]
        if not chosen:
            raise ConfigError(f"domain {domain_name} has no qcow2 disk to back up")
    for disk in chosen:
        if not disk.is_qcow2_file:
            kind = disk.driver_type or disk.source_type
            raise ConfigError(
                f"disk {disk.target} of domain {domain_name} is not a qcow2 file ({kind}); "
                "virt-dup backs up qcow2 disks"
            )
    # A disk named twice (dev_name and path, the original's spelling) is one disk.
    return list({disk.target: disk for disk in chosen}.values())


@dataclass(frozen=True)
class RestoredDisk:
    """Where a restored disk's top file is, and its format."""

    top: str
    format: str


@dataclass(frozen=True)
class DefinitionChanges:
    """How the saved XML becomes the restored domain's.

    ``name``: the new name (``None``: keep).  ``copy``: a copy next to the
    original (see the module docstring).  ``disks``: target dev -> the
    restored disk.
    """

    disks: Mapping[str, RestoredDisk]
    name: str | None = None
    copy: bool = False


def rewrite_definition(
    saved_xml: str,
    changes: DefinitionChanges,
    path_exists: Callable[[str], bool],
) -> tuple[str, list[str]]:
    """The XML to define, and notices (one line each) about what was changed.

    ``path_exists`` says whether a host path exists (``os.path.exists``;
    injected for tests).  Raises :class:`VirtDupError` when a restored disk
    is not in the saved XML.
    """
    root = parse_xml(saved_xml, "the saved domain XML")
    notices: list[str] = []
    original_name = root.findtext("name") or ""
    if changes.name is not None and changes.name != original_name:
        _set_text(root, "name", changes.name)
    if changes.copy:
        _remove_all(root, "uuid")
        for mac in root.findall("devices/interface/mac"):
            _detach(mac)
        _remove_jobs(root, notices)
    _point_disks(root, changes, notices, path_exists)
    _firmware(root, changes.copy, path_exists, notices)
    emulator = root.find("devices/emulator")
    if emulator is not None and emulator.text and not path_exists(emulator.text.strip()):
        notices.append(f"emulator {emulator.text.strip()} is not on this host: libvirt's default")
        _detach(emulator)
    return etree.tostring(root, encoding="unicode"), notices


def point_disks_at(domain_xml: str, disks: Mapping[str, RestoredDisk]) -> str:
    """``domain_xml`` with the disks ``disks`` on their restored tops (in-place restore)."""
    root = parse_xml(domain_xml, "the domain XML")
    _point_disks(root, DefinitionChanges(disks=disks), [])
    return etree.tostring(root, encoding="unicode")


def disk_sources(domain_xml: str) -> dict[str, str | None]:
    """Target dev -> source (file, device or volume name) of every disk in ``domain_xml``."""
    disks = parse_disks(domain_xml, "the domain XML")
    return {disk.target: disk.source for disk in disks if disk.target}


def snapshot_xml(targets: Sequence[str], overlays: Mapping[str, str]) -> str:
    """A ``<domainsnapshot>`` of virt-dup's overlays: ``overlays`` (target dev ->
    overlay file) are external qcow2 snapshots, every other disk of ``targets``
    is ``snapshot='no'``."""
    root = etree.Element("domainsnapshot")
    etree.SubElement(root, "description").text = "virt-dup temporary overlay"
    disks = etree.SubElement(root, "disks")
    for target in targets:
        if target in overlays:
            disk = etree.SubElement(disks, "disk", name=target, snapshot="external", type="file")
            etree.SubElement(disk, "driver", type="qcow2")
            etree.SubElement(disk, "source", file=overlays[target])
        else:
            etree.SubElement(disks, "disk", name=target, snapshot="no")
    return str(etree.tostring(root, encoding="unicode"))


def disk_element(root: etree._Element, target: str) -> etree._Element | None:
    """The ``<disk>`` of a domain XML tree whose target dev is ``target``."""
    for disk in root.iterfind("devices/disk"):
        if disk.xpath("string(target/@dev)") == target:
            return disk
    return None


def point_disk_at(disk: etree._Element, path: str, image_format: str | None = None) -> None:
    """Make one ``<disk>`` element read the file ``path``.

    The disk becomes ``type='file'`` with ``<source file=PATH>``: a source of
    another kind (a block device, a volume, a network image) loses its
    attributes and children, a file source keeps its children (its
    ``<seclabel>``...).  ``<backingStore>`` goes: libvirt reads the chain
    from the image headers again.  With ``image_format`` the driver gets that
    type.  Every other setting of the disk is kept.
    """
    was_file = disk.get("type", "file") == "file"
    disk.set("type", "file")
    source = disk.find("source")
    if source is None:
        source = etree.SubElement(disk, "source")
    if not was_file:
        source.attrib.clear()
        for child in list(source):
            source.remove(child)
    source.set("file", path)
    for backing_store in disk.findall("backingStore"):
        disk.remove(backing_store)
    if image_format is not None:
        driver = disk.find("driver")
        if driver is None:
            driver = etree.SubElement(disk, "driver", name="qemu")
        driver.set("type", image_format)


def definition_pointed_at(domain_xml: str, target: str, path: str, where: str) -> str:
    """The whole ``domain_xml`` with disk ``target`` on the file ``path``
    (:func:`point_disk_at`); raises :class:`NotFoundError` without such a disk."""
    root, _disk = _pointed_at(domain_xml, target, path, where)
    return str(etree.tostring(root, encoding="unicode"))


def disk_pointed_at(domain_xml: str, target: str, path: str, where: str) -> str:
    """The ``<disk>`` ``target`` of ``domain_xml`` on the file ``path``
    (:func:`point_disk_at`), as XML for libvirt's device update.

    Raises :class:`NotFoundError` when the definition has no such disk.
    """
    _root, disk = _pointed_at(domain_xml, target, path, where)
    return str(etree.tostring(disk, encoding="unicode"))


def _pointed_at(
    domain_xml: str, target: str, path: str, where: str
) -> tuple[etree._Element, etree._Element]:
    root = parse_xml(domain_xml, where)
    disk = disk_element(root, target)
    if disk is None:
        raise NotFoundError(f"{where} has no disk {target}")
    point_disk_at(disk, path)
    return root, disk


def _detach(element: etree._Element) -> None:
    parent = element.getparent()
    if parent is not None:
        parent.remove(element)


def _set_text(root: etree._Element, tag: str, text: str) -> None:
    element = root.find(tag)
    if element is None:
        element = etree.SubElement(root, tag)
    element.text = text


def _remove_all(root: etree._Element, path: str) -> None:
    for element in root.findall(path):
        _detach(element)


def _remove_jobs(root: etree._Element, notices: list[str]) -> None:
    metadata = root.find("metadata")
    if metadata is None:
        return
    for child in list(metadata):
        if isinstance(child.tag, str) and etree.QName(child).namespace == NAMESPACE:
            metadata.remove(child)
            notices.append("the copy has no virt-dup jobs (add them with virt-dup add-job)")


def _point_disks(
    root: etree._Element,
    changes: DefinitionChanges,
    notices: list[str],
    path_exists: Callable[[str], bool] = lambda _path: True,
) -> None:
    seen = set()
    for disk in root.findall("devices/disk"):
        target_element = disk.find("target")
        target = target_element.get("dev", "") if target_element is not None else ""
        restored = changes.disks.get(target)
        if restored is None:
            if changes.copy and _writable_file_disk(disk):
                _detach(disk)
                notices.append(
                    f"disk {target} was not restored: the copy leaves it out (it is the original's)"
                )
            else:
                source = disk.find("source")
                path = source.get("file") if source is not None else None
                if path and not path_exists(path):
                    notices.append(f"disk {target}: {path} is not on this host (not restored)")
            continue
        seen.add(target)
        point_disk_at(disk, restored.top, restored.format)
    missing = sorted(set(changes.disks) - seen)
    if missing:
        raise VirtDupError(f"the saved domain XML has no disk {', '.join(missing)}")


def _writable_file_disk(disk: etree._Element) -> bool:
    if disk.get("device", "disk") != "disk":
        return False
    if disk.find("readonly") is not None or disk.find("shareable") is not None:
        return False
    return disk.get("type", "file") in ("file", "block", "volume")


def _firmware(
    root: etree._Element, copy: bool, path_exists: Callable[[str], bool], notices: list[str]
) -> None:
    os_element = root.find("os")
    if os_element is None:
        return
    loader = os_element.find("loader")
    nvram = os_element.find("nvram")
    loader_path = (loader.text or "").strip() if loader is not None else ""
    if loader is not None and loader_path and not path_exists(loader_path):
        os_element.remove(loader)
        if loader.get("type") == "pflash":
            notices.append(
                f"firmware {loader_path} is not on this host: libvirt selects UEFI firmware "
                "(os firmware='efi')"
            )
            if nvram is not None:
                os_element.remove(nvram)
                nvram = None
            os_element.set("firmware", "efi")
        else:
            notices.append(f"firmware {loader_path} is not on this host: libvirt's default")
    if nvram is not None and copy and (nvram.text or "").strip():
        notices.append(
            f"the copy gets its own UEFI variable store (not {(nvram.text or '').strip()})"
        )
        nvram.text = None
        if not nvram.attrib:
            os_element.remove(nvram)
