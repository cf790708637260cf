"""The metadata folder of a backup: ``manifest.json``, ``domain.xml``, ``SHA256SUMS``.

Written here (:func:`write_metadata`) into the folder that is backed up with
the disks, and read here (:func:`parse_manifest`) when a backup is listed,
verified or restored: one :class:`Manifest`, made from the run's
:class:`~virt_dup.backup.plan.DiskPlan`, one JSON form.  ``manifest.json``
holds the domain, the job, and per disk its chain when the backup began (top
first), each file with its path, format, virtual size, backing file (the
string in its header), whether the job's depth selected it and, if so, its
SHA-256.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from virt_dup import __version__
from virt_dup.backup.plan import Plan
from virt_dup.errors import NotFoundError, VirtDupError
from virt_dup.files import sha256_files, write_atomically
from virt_dup.libvirt.metadata import is_valid_uuid, render_instance

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"


DOMAIN_XML = "domain.xml"


CHECKSUMS = "SHA256SUMS"


#: The manifest format this virt-dup writes and reads.
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
    actual_size: int | None = None
    #: Where the file is in the backup, when not at ``path`` (a symbolic link
    #: on the way: the backup holds the file itself).
    backed_up_as: str | None = None

    @property
    def stored(self) -> str:
        """The file's path inside the backup."""
        return self.backed_up_as or self.path

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "path": self.path,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "backing_file": self.backing_file,
            "backing_format": self.backing_format,
            "actual_size": self.actual_size,
            "selected": self.selected,
        }
        if self.sha256 is not None:
            entry["sha256"] = self.sha256
        if self.backed_up_as is not None:
            entry["backed_up_as"] = self.backed_up_as
        return entry

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> ManifestFile:
        actual_size = entry.get("actual_size")
        backing_format = entry.get("backing_format")
        selected = entry["selected"]
        if not isinstance(selected, bool):
            raise ValueError(f"selected {selected!r} is not true or false")
        sha256 = entry.get("sha256")
        if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
            raise ValueError(f"sha256 {_shown(sha256)} is not 64 hex digits")
        return cls(
            path=image_path(entry["path"], "file"),
            format=image_format(entry["format"], "format"),
            virtual_size=image_size(entry["virtual_size"], "virtual_size"),
            backing_file=backing_string(entry.get("backing_file")),
            backing_format=None
            if backing_format is None
            else image_format(backing_format, "backing_format"),
            selected=selected,
            sha256=sha256,
            actual_size=None if actual_size is None else image_size(actual_size, "actual_size"),
            backed_up_as=None
            if entry.get("backed_up_as") is None
            else image_path(entry["backed_up_as"], "backed_up_as"),
        )


@dataclass(frozen=True)
class ManifestDisk:
    """A disk of the domain: its target dev and its chain when the backup began, top first."""

    target: str
    top: str
    files: tuple[ManifestFile, ...]

    @property
    def selected(self) -> tuple[ManifestFile, ...]:
        return tuple(entry for entry in self.files if entry.selected)

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "top": self.top,
            "files": [entry.as_json() for entry in self.files],
        }

    @classmethod
    def from_json(cls, disk: Mapping[str, Any]) -> ManifestDisk:
        target = disk_name(disk["target"])
        if not isinstance(disk["files"], list) or not disk["files"]:
            raise ValueError(f"disk {target}: files {_shown(disk['files'])} is not a list of files")
        files = tuple(ManifestFile.from_json(entry) for entry in disk["files"])
        paths = [entry.path for entry in files]
        if len(set(paths)) != len(paths):
            raise ValueError(f"disk {target}: a file is in its chain twice")
        return cls(target=target, top=image_path(disk["top"], "top"), files=files)


@dataclass(frozen=True)
class ChangedDisk:
    """A disk of a changed-block set: the file holding the clusters its top's
    guest wrote since the previous set (docs/changed-blocks.md)."""

    target: str
    #: The top the changes apply to (as the base set recorded it).
    top: str
    #: Where the changes file is in the backup.
    stored: str
    sha256: str
    virtual_size: int

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "top": self.top,
            "stored": self.stored,
            "sha256": self.sha256,
            "virtual_size": self.virtual_size,
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> ChangedDisk:
        sha256 = entry["sha256"]
        if not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
            raise ValueError(f"sha256 {_shown(sha256)} is not 64 hex digits")
        return cls(
            target=disk_name(entry["target"]),
            top=image_path(entry["top"], "top"),
            stored=image_path(entry["stored"], "stored"),
            sha256=sha256,
            virtual_size=image_size(entry["virtual_size"], "virtual_size"),
        )


@dataclass(frozen=True)
class ChangesManifest:
    """What makes a backup a changed-block set: the set whose whole files it
    applies to (``base_set``), the set it continues (``previous_set``: the
    base, or the changed-block set before it), the checkpoints, its disks."""

    base_set: str
    previous_set: str
    since_checkpoint: str
    checkpoint: str
    disks: tuple[ChangedDisk, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "base_set": self.base_set,
            "previous_set": self.previous_set,
            "since_checkpoint": self.since_checkpoint,
            "checkpoint": self.checkpoint,
            "disks": [disk.as_json() for disk in self.disks],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChangesManifest:
        if not isinstance(data["disks"], list) or not data["disks"]:
            raise ValueError(f"changes disks {_shown(data['disks'])} is not a list of disks")
        disks = tuple(ChangedDisk.from_json(disk) for disk in data["disks"])
        if len({disk.target for disk in disks}) != len(disks):
            raise ValueError("changes: a disk is in it twice")
        return cls(
            base_set=set_id(data["base_set"], "base_set"),
            previous_set=set_id(data["previous_set"], "previous_set"),
            since_checkpoint=one_line(data["since_checkpoint"], "since_checkpoint"),
            checkpoint=one_line(data["checkpoint"], "checkpoint"),
            disks=disks,
        )


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
    #: The job's ``<virt-dup:instance>`` element, as it was.
    job_xml: str = ""
    virt_dup_version: str = ""
    #: Set for a changed-block set (its files are the changes, not the images).
    changes: ChangesManifest | None = None

    def disk(self, target: str) -> ManifestDisk:
        for disk in self.disks:
            if disk.target == target:
                return disk
        known = ", ".join(disk.target for disk in self.disks)
        raise NotFoundError(
            f"the backup of domain {self.domain_name} has no disk {target} (it has {known})"
        )

    def as_json(self) -> dict[str, Any]:
        data = {
            "format": MANIFEST_FORMAT,
            "virt_dup_version": self.virt_dup_version,
            "host": self.host,
            "created": self.created,
            "full": self.full,
            "domain": {"name": self.domain_name, "uuid": self.domain_uuid},
            "job": {"uuid": self.job_uuid, "xml": self.job_xml, "options": dict(self.options)},
            "disks": [disk.as_json() for disk in self.disks],
        }
        if self.changes is not None:
            data["changes"] = self.changes.as_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        if not isinstance(data["disks"], list):
            raise ValueError(f"disks {_shown(data['disks'])} is not a list")
        disks = tuple(ManifestDisk.from_json(disk) for disk in data["disks"])
        targets = [disk.target for disk in disks]
        if len(set(targets)) != len(targets):
            raise ValueError(f"disk targets {', '.join(targets)}: a disk is in it twice")
        options = data["job"].get("options") or {}
        if not isinstance(options, dict):
            raise ValueError(f"job options {_shown(options)} are not a mapping")
        return cls(
            domain_name=one_line(data["domain"]["name"], "domain name"),
            domain_uuid=uuid_text(data["domain"]["uuid"], "domain uuid"),
            job_uuid=uuid_text(data["job"]["uuid"], "job uuid"),
            created=str(data.get("created", "")),
            full=bool(data.get("full")),
            host=str(data.get("host", "")),
            disks=disks,
            options=options,
            job_xml=str(data["job"].get("xml") or ""),
            virt_dup_version=str(data.get("virt_dup_version", "")),
            changes=None
            if data.get("changes") is None
            else ChangesManifest.from_json(data["changes"]),
        )


#: A disk's target dev as virt-dup names directories after it (vda, sdb, nvme0n1).
_DISK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: What a file name in a backup may be: no directory, no NUL, bounded.
_FILE_NAME = re.compile(r"[^/\x00]{1,255}")
_MAX_PATH = 4096
#: qemu's format names (qcow2, raw, vmdk...): a word, never an option or a JSON spec.
_FORMAT = re.compile(r"[a-z][a-z0-9]{0,15}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: duplicity's time of a backup set, its id.
_SET_ID = re.compile(r"\d{8}T\d{6}Z")
#: No disk image is larger (qemu's own limit is 2**63 bytes).
_MAX_SIZE = 2**63 - 1


def _shown(value: object) -> str:
    """A value read from a backend as an error message quotes it: short."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:60]}... ({len(text)} characters)"


def image_size(value: object, what: str) -> int:
    """A size in bytes read from a backup: an integer from 0 to 2**63-1; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_SIZE:
        raise ValueError(f"{what} {_shown(value)} is not a size in bytes")
    return value


def image_format(value: object, what: str) -> str:
    """An image format name read from a backup (``qcow2``, ``raw``); ValueError otherwise."""
    if not isinstance(value, str) or not _FORMAT.fullmatch(value):
        raise ValueError(f"{what} {_shown(value)} is not an image format name")
    return value


def backing_string(value: object) -> str | None:
    """The backing file string of an image header, as a backup recorded it: text of
    at most 4096 bytes without control characters (qemu's header holds no more)."""
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or len(value.encode()) > _MAX_PATH
        or any(ord(character) < 32 or ord(character) == 127 for character in value)
    ):
        raise ValueError(f"backing_file {_shown(value)} is not a backing file name")
    return value


def set_id(value: object, what: str) -> str:
    """A backup set id read from a backup (``20261202T020000Z``); ValueError otherwise."""
    if not isinstance(value, str) or not _SET_ID.fullmatch(value):
        raise ValueError(f"{what} {_shown(value)} is not a backup id")
    return value


def one_line(value: object, what: str) -> str:
    """Text read from a backup that messages show: one line, bounded."""
    if (
        not isinstance(value, str)
        or len(value) > 1024
        or any(ord(character) < 32 or ord(character) == 127 for character in value)
    ):
        raise ValueError(f"{what} {_shown(value)} is not one line of text")
    return value


def uuid_text(value: object, what: str) -> str:
    """A UUID read from a backup (job ids name cache directories); ValueError otherwise."""
    if not isinstance(value, str) or not is_valid_uuid(value):
        raise ValueError(f"{what} {_shown(value)} is not a UUID")
    return value.lower()


def disk_name(value: object) -> str:
    """A disk target read from a backup, as a safe name (letters, digits, ``._-``,
    no ``..``); ValueError otherwise: a backend is not trusted to name paths."""
    if not isinstance(value, str) or not _DISK_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"disk target {_shown(value)} is not a name (letters, digits, ._-)")
    return value


def image_path(value: object, what: str) -> str:
    """An image path read from a backup: absolute, normalized (no ``..``), no
    NUL, a file name of at most 255 bytes, at most 4096 in all; ValueError
    otherwise."""
    if (
        not isinstance(value, str)
        or len(value) > _MAX_PATH
        or not value.startswith("/")
        or os.path.normpath(value) != value
        or not _FILE_NAME.fullmatch(os.path.basename(value))
        or os.path.basename(value) in (".", "..")
    ):
        raise ValueError(f"{what} {_shown(value)} is not an absolute, normalized file path")
    return value


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
        return Manifest.from_json(data)
    except VirtDupError:
        raise
    except RecursionError:
        raise VirtDupError(f"{where}: not a virt-dup manifest: nested too deeply") from None
    except ValueError as error:
        raise VirtDupError(f"{where}: not a virt-dup manifest: {error}") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise VirtDupError(f"{where}: not a virt-dup manifest: {error!r}") from None


def manifest_of(plan: Plan, checksums: Mapping[str, str]) -> Manifest:
    """What a backup of ``plan`` holds; ``checksums``: path -> SHA-256 of each
    selected file."""
    disks = []
    for disk in plan.disks:
        selected = {chain_file.path for chain_file in disk.selected}
        files = tuple(
            ManifestFile(
                path=chain_file.path,
                format=chain_file.format,
                virtual_size=chain_file.virtual_size,
                backing_file=chain_file.backing_file,
                backing_format=chain_file.backing_format,
                selected=chain_file.path in selected,
                sha256=checksums.get(chain_file.path) if chain_file.path in selected else None,
                actual_size=chain_file.actual_size,
                backed_up_as=chain_file.real_path
                if chain_file.path in selected and chain_file.real_path
                else None,
            )
            for chain_file in disk.chain
        )
        disks.append(ManifestDisk(disk.target, disk.original_top, files))
    options = plan.options.shown_values()
    return Manifest(
        domain_name=plan.job.domain_name,
        domain_uuid=plan.job.domain_uuid,
        job_uuid=plan.job.uuid,
        created=datetime.now(UTC).isoformat(),
        full=plan.full,
        host=socket.gethostname(),
        disks=tuple(disks),
        options={k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        job_xml=render_instance([plan.job]),
        virt_dup_version=__version__,
    )


def write_metadata(
    directory: Path,
    plan: Plan,
    domain_xml: str,
    checksum: Callable[[list[str]], Mapping[str, str]] = sha256_files,
) -> Manifest:
    """The metadata folder backed up with the disks: the manifest (the domain,
    the job, the chain layout, checksums: ``checksum`` of the files, by file), the
    domain XML and ``SHA256SUMS``.  Returns the manifest."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    selected = [chain_file for disk in plan.disks for chain_file in disk.selected]
    digests = checksum([chain_file.file for chain_file in selected])
    checksums = {chain_file.path: digests[chain_file.file] for chain_file in selected}
    manifest = manifest_of(plan, checksums)
    write_atomically(directory / MANIFEST, json.dumps(manifest.as_json(), indent=2))
    write_atomically(directory / DOMAIN_XML, domain_xml)
    write_atomically(
        directory / CHECKSUMS, "".join(f"{digest}  {path}\n" for path, digest in checksums.items())
    )
    return manifest


def write_changes_metadata(
    directory: Path, plan: Plan, domain_xml: str, changes: ChangesManifest
) -> Manifest:
    """The metadata folder of a changed-block set: the manifest (the chain layout
    as in any set, no checksums of images it does not hold, and ``changes``),
    the domain XML and ``SHA256SUMS`` of the changes files."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    manifest = dataclasses.replace(manifest_of(plan, {}), changes=changes)
    write_atomically(directory / MANIFEST, json.dumps(manifest.as_json(), indent=2))
    write_atomically(directory / DOMAIN_XML, domain_xml)
    write_atomically(
        directory / CHECKSUMS,
        "".join(f"{disk.sha256}  {disk.stored}\n" for disk in changes.disks),
    )
    return manifest
