"""The definition of a restored domain: the saved XML, rewritten.  Pure.

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lxml import etree

from virt_dup import NAMESPACE
from virt_dup.errors import VirtDupError
from virt_dup.jobs import parse_xml


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
    """Target dev -> source file of every disk in ``domain_xml``."""
    root = parse_xml(domain_xml, "the domain XML")
    sources: dict[str, str | None] = {}
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        if target is not None and target.get("dev"):
            sources[target.get("dev", "")] = source.get("file") if source is not None else None
    return sources


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
        disk.set("type", "file")
        source = disk.find("source")
        if source is None:
            source = etree.SubElement(disk, "source")
        for name in list(source.attrib):
            del source.attrib[name]
        source.set("file", restored.top)
        for child in list(source):
            source.remove(child)
        for backing_store in disk.findall("backingStore"):
            disk.remove(backing_store)
        driver = disk.find("driver")
        if driver is None:
            driver = etree.SubElement(disk, "driver", name="qemu")
        driver.set("type", restored.format)
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
