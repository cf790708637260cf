"""Whether a run may read changed blocks, and what it remembers for the next one
(docs/changed-blocks.md).  Pure, except :func:`file_identity`.

After every successful run of a running domain, the job's
:class:`ChangesRecord` says which checkpoint the next read starts from, which
set of the main collection holds the whole tops (the *base*), which set the
next delta continues (the *previous*), and the identity of every selected
file.  :func:`decide` compares that with the run's plan and the domain's
checkpoints; every mismatch is a reason for the whole-file path, never a
failure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: (device, inode) of a disk's top: a top replaced by another file differs (its
#: size, mtime and ctime change with every guest write and are not compared).
TopIdentity = tuple[int, int]
#: (device, inode, size, mtime ns, ctime ns) of a file below the top: it must not
#: have changed at all since the base set read it.
FileIdentity = tuple[int, int, int, int, int]

#: The two ways a run reads a disk.
WHOLE = "whole"
CHANGES = "changes"


def file_identity(path: str) -> FileIdentity:
    status = os.stat(path)
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


@dataclass(frozen=True)
class DiskRecord:
    """One disk as the last run left it."""

    top: str
    top_identity: TopIdentity
    #: The top's virtual size: a resized disk is read whole (a delta is of one size).
    virtual_size: int = 0
    #: The selected files below the top, path -> identity.
    below: Mapping[str, FileIdentity] = field(default_factory=dict)


@dataclass(frozen=True)
class ChangesRecord:
    """What the next changed-block read of a job starts from."""

    checkpoint: str
    base_set: str
    previous_set: str
    disks: Mapping[str, DiskRecord]

    def as_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "base_set": self.base_set,
            "previous_set": self.previous_set,
            "disks": {
                dev: {
                    "top": disk.top,
                    "top_identity": list(disk.top_identity),
                    "virtual_size": disk.virtual_size,
                    "below": {path: list(identity) for path, identity in disk.below.items()},
                }
                for dev, disk in self.disks.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChangesRecord:
        """Raises KeyError, TypeError or ValueError for data that is not a record."""
        disks = {}
        for dev, disk in dict(data["disks"]).items():
            top_identity = tuple(int(value) for value in disk["top_identity"])
            below = {
                str(path): tuple(int(value) for value in identity)
                for path, identity in dict(disk["below"]).items()
            }
            if len(top_identity) != 2 or any(len(identity) != 5 for identity in below.values()):
                raise ValueError(f"disk {dev}: identities of the wrong length")
            disks[str(dev)] = DiskRecord(
                str(disk["top"]),
                top_identity,
                int(disk["virtual_size"]),
                below,  # type: ignore[arg-type]
            )
        return cls(str(data["checkpoint"]), str(data["base_set"]), str(data["previous_set"]), disks)


def load_record(path: Path) -> ChangesRecord | None:
    """The record in ``path``; None when there is none or it cannot be read (the
    whole-file path then: a record is an optimisation, never a requirement)."""
    try:
        return ChangesRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class PlannedDisk:
    """What :func:`decide` needs of a disk of the plan."""

    target: str
    top: str
    below: Sequence[str]
    virtual_size: int = 0


@dataclass(frozen=True)
class Decision:
    read: str  # WHOLE or CHANGES
    reason: str = ""  # why the whole-file path, in words


def decide(
    *,
    enabled: bool,
    running: bool,
    full: bool,
    record: ChangesRecord | None,
    checkpoints: Collection[str],
    disks: Sequence[PlannedDisk],
    top_identity: Callable[[str], TopIdentity],
    identity: Callable[[str], FileIdentity] = file_identity,
) -> Decision:
    """Whether this run reads changed blocks (see the module): the first reason
    found against it makes it the whole-file path."""
    reasons = _reasons(
        enabled,
        running=running,
        full=full,
        record=record,
        checkpoints=checkpoints,
        disks=disks,
        top_identity=top_identity,
        identity=identity,
    )
    reason = next(reasons, None)
    return Decision(CHANGES) if reason is None else Decision(WHOLE, reason)


def _reasons(
    enabled: bool,
    *,
    running: bool,
    full: bool,
    record: ChangesRecord | None,
    checkpoints: Collection[str],
    disks: Sequence[PlannedDisk],
    top_identity: Callable[[str], TopIdentity],
    identity: Callable[[str], FileIdentity],
) -> Iterator[str]:
    if not enabled:
        yield "changed_blocks is off"
    if full:
        yield "a full backup reads every file"
    if not running:
        yield "the domain is shut off (bitmaps are read from a running QEMU only)"
    if record is None:
        yield "no earlier run left a checkpoint to start from"
        return
    if record.checkpoint not in checkpoints:
        yield f"checkpoint {record.checkpoint} is gone (deleted, or lost with its host)"
    if {disk.target for disk in disks} != set(record.disks):
        yield "the job's disks are not the ones the checkpoint tracks"
        return
    for disk in disks:
        yield from _disk_reasons(disk, record.disks[disk.target], top_identity, identity)


def _disk_reasons(
    disk: PlannedDisk,
    known: DiskRecord,
    top_identity: Callable[[str], TopIdentity],
    identity: Callable[[str], FileIdentity],
) -> Iterator[str]:
    if disk.top != known.top or top_identity(disk.top) != known.top_identity:
        yield f"disk {disk.target}: its top is another file than at the last run"
    if disk.virtual_size != known.virtual_size:
        yield f"disk {disk.target}: resized since the last run"
    if set(disk.below) != set(known.below):
        yield f"disk {disk.target}: its chain below the top changed"
        return
    for path in disk.below:
        if identity(path) != known.below[path]:
            yield f"disk {disk.target}: {path} changed since it was backed up"


def top_identity_of(path: str) -> TopIdentity:
    """(device, inode) of a disk's top: the same file, whatever the guest wrote."""
    status = os.stat(path)
    return (status.st_dev, status.st_ino)


def changes_file(top: str, job_uuid: str) -> Path:
    """Where libvirt writes a disk's changed blocks: next to its top, as overlays go
    (QEMU may write there; the job's cache is root's alone)."""
    path = Path(top)
    return path.with_name(f"{path.stem}.virt-dup-{job_uuid}.changes.qcow2")
