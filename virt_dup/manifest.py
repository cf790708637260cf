"""``manifest.json``: what one backup holds, as ``virt-dup run`` recorded it.  Pure.

Written by :func:`virt_dup.run.write_metadata` into the metadata folder that
is backed up with the disks: the domain, the job, and per disk its chain
when the backup began (top first), each file with its path, format, virtual
size, backing file (the string in its header), whether the job's depth
selected it and, if so, its SHA-256.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from virt_dup.errors import NotFoundError, VirtDupError

#: The manifest format this virt-dup reads (``run.write_metadata`` writes it).
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ManifestFile:
    """One file of a disk's chain as the backup recorded it (``selected``: in the backup)."""

    path: str
    format: str
    virtual_size: int
    backing_file: str | None
    backing_format: str | None
    selected: bool
    sha256: str | None


@dataclass(frozen=True)
class ManifestDisk:
    """A disk of the domain: its target dev and its chain when the backup began, top first."""

    target: str
    top: str
    files: tuple[ManifestFile, ...]

    @property
    def selected(self) -> tuple[ManifestFile, ...]:
        return tuple(entry for entry in self.files if entry.selected)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of one backup: which domain, which job, which files."""

    domain_name: str
    domain_uuid: str
    job_uuid: str
    created: str
    full: bool
    host: str
    disks: tuple[ManifestDisk, ...]
    options: Mapping[str, Any] = field(default_factory=dict)

    def disk(self, target: str) -> ManifestDisk:
        for disk in self.disks:
            if disk.target == target:
                return disk
        known = ", ".join(disk.target for disk in self.disks)
        raise NotFoundError(
            f"the backup of domain {self.domain_name} has no disk {target} (it has {known})"
        )


def parse_manifest(text: str, where: str) -> Manifest:
    """A :class:`Manifest` from the text of ``manifest.json``.

    Raises :class:`VirtDupError` naming ``where`` when it is not a manifest
    this virt-dup can read.
    """
    try:
        data = json.loads(text)
        if data.get("format") != MANIFEST_FORMAT:
            raise VirtDupError(
                f"{where}: manifest format {data.get('format')!r}, this virt-dup reads "
                f"format {MANIFEST_FORMAT}"
            )
        disks = tuple(
            ManifestDisk(
                target=str(disk["target"]),
                top=str(disk["top"]),
                files=tuple(
                    ManifestFile(
                        path=str(entry["path"]),
                        format=str(entry["format"]),
                        virtual_size=int(entry["virtual_size"]),
                        backing_file=entry.get("backing_file"),
                        backing_format=entry.get("backing_format"),
                        selected=bool(entry["selected"]),
                        sha256=entry.get("sha256"),
                    )
                    for entry in disk["files"]
                ),
            )
            for disk in data["disks"]
        )
        return Manifest(
            domain_name=str(data["domain"]["name"]),
            domain_uuid=str(data["domain"]["uuid"]),
            job_uuid=str(data["job"]["uuid"]),
            created=str(data.get("created", "")),
            full=bool(data.get("full")),
            host=str(data.get("host", "")),
            disks=disks,
            options=dict(data["job"].get("options") or {}),
        )
    except VirtDupError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise VirtDupError(f"{where}: not a virt-dup manifest: {error!r}") from None
