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

import contextlib
import json
import logging
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from virt_dup.backup.plan import Plan
from virt_dup.errors import VirtDupError
from virt_dup.files import write_atomically
from virt_dup.libvirt.checkpoints import ChangedBlocks, checkpoint_name

log = logging.getLogger(__name__)

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


# -- one run's changed-block side ------------------------------------------------------
@dataclass
class ChangedBlockRun:
    """The changed-block side of one run of a running domain whose job reads
    changed blocks: the checkpoint it makes, the read, the record it leaves."""

    blocks: ChangedBlocks
    job_uuid: str
    #: Every disk of the domain (those a checkpoint or read leaves out are named too).
    every_disk: Sequence[str]
    record_path: Path
    record: ChangesRecord | None
    decision: Decision
    new_checkpoint: str | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def checkpoint_now(self, disks: Sequence[str]) -> None:
        """Start the checkpoint the next read starts from; before the overlays, so
        that the bitmap holds a superset of what the next backup needs.  A
        checkpoint libvirt refuses costs the next run its changed blocks, not
        this backup."""
        name = checkpoint_name(self.job_uuid, _stamp())
        try:
            self.blocks.create_checkpoint(name, disks, self.every_disk)
        except VirtDupError as error:
            log.warning(
                "job %s: no checkpoint (the next run reads whole files): %s", self.job_uuid, error
            )
            return
        self.new_checkpoint = name

    def read_changes(self, disks: Sequence[PlannedDisk], timeout_s: float) -> dict[str, Path]:
        """The clusters of each disk written since the record's checkpoint, in a file
        of its own next to its top; raises :class:`ChangesUnavailable` (nothing made)."""
        assert self.record is not None
        self.files = {disk.target: changes_file(disk.top, self.job_uuid) for disk in disks}
        for path in self.files.values():
            path.unlink(missing_ok=True)  # a killed run's (the name is virt-dup's)
        name = checkpoint_name(self.job_uuid, _stamp())
        self.blocks.back_up_changes(
            self.record.checkpoint, name, self.files, self.every_disk, timeout_s
        )
        self.new_checkpoint = name
        return self.files

    def succeeded(self, record: ChangesRecord | None) -> None:
        """The set is on the backend: keep ``record`` for the next run (None: there
        is nothing to start from) and drop every other checkpoint of the job."""
        self._remove_files()
        if record is None or self.new_checkpoint is None:
            self.record_path.unlink(missing_ok=True)
            return
        write_atomically(self.record_path, json.dumps(record.as_json(), indent=1), mode=0o600)
        for name in self.blocks.checkpoints(self.job_uuid):
            if name != self.new_checkpoint:
                self._drop(name)

    def failed(self) -> None:
        """The run failed: its checkpoint goes (its bitmap merges into the one the
        record names, which the next run starts from), and its files."""
        self._remove_files()
        if self.new_checkpoint is not None:
            self._drop(self.new_checkpoint)
            self.new_checkpoint = None

    def _drop(self, name: str) -> None:
        """Delete a checkpoint of the job; one libvirt keeps is a warning (the next
        run deletes every checkpoint of the job but its own).  One whose bitmap
        QEMU lost or marks inconsistent (QEMU was killed) cannot be deleted so
        (measured: "bitmap ... not found in backing chain"): its metadata goes,
        nothing reads from it again."""
        try:
            self.blocks.delete_checkpoint(name)
        except VirtDupError as error:
            if not _bitmap_broken(str(error)):
                log.warning("job %s: %s", self.job_uuid, error)
                return
            try:
                self.blocks.forget_checkpoint(name)
            except VirtDupError as second:
                log.warning("job %s: %s", self.job_uuid, second)
                return
            log.warning("job %s: %s: deleted its metadata only", self.job_uuid, error)

    def _remove_files(self) -> None:
        for path in self.files.values():
            with contextlib.suppress(OSError):
                path.unlink()


def _bitmap_broken(message: str) -> bool:
    """Whether libvirt refused to delete a checkpoint because its bitmap is gone
    or inconsistent."""
    return "not found in backing chain" in message or "inconsistent" in message


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def record_of(
    checkpoint: str, base_set: str, previous_set: str, disks: Sequence[PlannedDisk]
) -> ChangesRecord:
    """The record a run leaves, from the files as they are now."""
    return ChangesRecord(
        checkpoint,
        base_set,
        previous_set,
        {
            disk.target: DiskRecord(
                disk.top,
                top_identity_of(disk.top),
                disk.virtual_size,
                {path: file_identity(path) for path in disk.below},
            )
            for disk in disks
        },
    )


def planned_disks(plan: Plan) -> list[PlannedDisk]:
    """The disks of a run's plan as :func:`decide` and the record see them."""
    return [
        PlannedDisk(
            disk.target,
            disk.original_top,
            [
                chain_file.path
                for chain_file in disk.selected
                if chain_file.path != disk.original_top
            ],
            disk.chain[0].virtual_size,
        )
        for disk in plan.disks
    ]
