"""libvirt checkpoints and changed-block reads of a running domain (docs/changed-blocks.md).

A checkpoint is a point in time libvirt tracks writes from (a persistent
dirty bitmap in each disk's qcow2).  :meth:`ChangedBlocks.back_up_changes`
starts a push-mode ``backup-begin`` with ``<incremental>``: libvirt writes a
qcow2 per disk holding only the clusters the guest wrote since that
checkpoint, as they were at the start of the job (a point-in-time read: no
overlay needed), and creates the next checkpoint at that same instant.

Only checkpoints named ``virt-dup-<job uuid>-...`` are virt-dup's; nothing
else is ever deleted.  Every case where the bitmaps cannot be used raises
:class:`ChangesUnavailable`, which the caller answers with the whole-file
path, never with a failed backup.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar
from xml.sax.saxutils import quoteattr

import libvirt

from virt_dup.errors import LibvirtError, VirtDupError
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.libvirt.metadata import parse_xml

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Every checkpoint virt-dup makes starts so; the job's uuid follows.
CHECKPOINT_PREFIX = "virt-dup-"
#: How often the backup job is looked at while it runs.
POLL_S = 0.05
#: How long an aborted backup job may take to end.
ABORT_WAIT_S = 30.0


class ChangesUnavailable(VirtDupError):
    """The changed blocks cannot be read (no such checkpoint, a bitmap QEMU lost or
    marks inconsistent, a disk without one): read the whole files instead."""


def checkpoint_name(job_uuid: str, set_time: str) -> str:
    """The checkpoint of ``job_uuid``'s backup set made at ``set_time`` (duplicity's
    ``20261202T020000Z``)."""
    return f"{CHECKPOINT_PREFIX}{job_uuid}-{set_time}"


def checkpoint_xml(name: str, disks: Iterable[str], every_disk: Iterable[str]) -> str:
    """A ``<domaincheckpoint>`` tracking ``disks`` (target devs) and no other disk."""
    tracked = set(disks)
    entries = "".join(
        f"<disk name={quoteattr(dev)} checkpoint='{'bitmap' if dev in tracked else 'no'}'/>"
        for dev in every_disk
    )
    return (
        f"<domaincheckpoint><name>{_text(name)}</name><disks>{entries}</disks></domaincheckpoint>"
    )


def backup_xml(since: str, targets: Mapping[str, Path], every_disk: Iterable[str]) -> str:
    """A push-mode ``<domainbackup>`` of the changes since checkpoint ``since``: one
    qcow2 per disk of ``targets`` (target dev -> file), no other disk."""
    entries = []
    for dev in every_disk:
        if dev in targets:
            entries.append(
                f"<disk name={quoteattr(dev)} type='file'><driver type='qcow2'/>"
                f"<target file={quoteattr(str(targets[dev]))}/></disk>"
            )
        else:
            entries.append(f"<disk name={quoteattr(dev)} backup='no'/>")
    return (
        f"<domainbackup mode='push'><incremental>{_text(since)}</incremental>"
        f"<disks>{''.join(entries)}</disks></domainbackup>"
    )


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class ChangedBlocks:
    """The checkpoints of one domain and changed-block reads from them.

    Every call survives a libvirtd restarted meanwhile (a package upgrade, an
    admin): a connection found dead is opened again, for a bounded time, and
    the domain looked up anew (:meth:`_call`).
    """

    def __init__(self, hypervisor: Hypervisor, domain: libvirt.virDomain) -> None:
        self.hypervisor = hypervisor
        self.domain = domain
        self._uuid = domain.UUIDString()

    @property
    def _what(self) -> str:
        return f"domain {self.domain.name()}"

    def _call(self, what: str, call: Callable[[libvirt.virDomain], T]) -> T:
        """``call(domain)``; when libvirtd went away, reconnect and call again.
        Raises :class:`LibvirtError` naming ``what``."""
        self.domain = self.hypervisor.current(self.domain, self._uuid)
        try:
            return self.hypervisor.call(what, call, self.domain)
        except LibvirtError:
            if self.hypervisor.alive():
                raise
        log.warning("libvirt went away (%s); reconnecting", what)
        self.hypervisor.reconnect()
        self.domain = self.hypervisor.current(self.domain, self._uuid)
        return self.hypervisor.call(what, call, self.domain)

    def checkpoints(self, job_uuid: str) -> list[str]:
        """The names of ``job_uuid``'s checkpoints, oldest first."""
        prefix = f"{CHECKPOINT_PREFIX}{job_uuid}-"
        names = self._call(
            f"cannot list the checkpoints of {self._what}",
            lambda domain: [checkpoint.getName() for checkpoint in domain.listAllCheckpoints(0)],
        )
        return sorted(name for name in names if name.startswith(prefix))

    def create_checkpoint(self, name: str, disks: Iterable[str], every_disk: Iterable[str]) -> None:
        """Start tracking the writes to ``disks`` from now on, as checkpoint ``name``."""
        xml = checkpoint_xml(name, disks, every_disk)
        self._call(
            f"cannot create checkpoint {name} of {self._what}",
            lambda domain: domain.checkpointCreateXML(xml, 0),
        )

    def delete_checkpoint(self, name: str) -> None:
        """Delete a virt-dup checkpoint (libvirt merges its bitmap into the next one)."""
        if not name.startswith(CHECKPOINT_PREFIX):
            raise VirtDupError(f"{name}: not a virt-dup checkpoint; left alone")
        self._call(
            f"cannot delete checkpoint {name} of {self._what}",
            lambda domain: domain.checkpointLookupByName(name, 0).delete(0),
        )

    def forget_checkpoint(self, name: str) -> None:
        """Delete a virt-dup checkpoint's metadata only (its bitmaps stay in the
        qcow2 files): what libvirt allows for a shut-off domain."""
        if not name.startswith(CHECKPOINT_PREFIX):
            raise VirtDupError(f"{name}: not a virt-dup checkpoint; left alone")
        self._call(
            f"cannot delete checkpoint {name} of {self._what}",
            lambda domain: domain.checkpointLookupByName(name, 0).delete(
                libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
            ),
        )

    def back_up_changes(
        self,
        since: str,
        checkpoint: str,
        targets: Mapping[str, Path],
        every_disk: Iterable[str],
        timeout_s: float,
    ) -> None:
        """Write the clusters of each disk in ``targets`` changed since checkpoint
        ``since`` into its file (new files: libvirt creates them), and make
        ``checkpoint`` at the same instant.  Waits for the job, at most
        ``timeout_s`` (then aborts it).

        Raises :class:`ChangesUnavailable` when libvirt cannot read changes from
        ``since`` (the whole-file path answers that); :class:`LibvirtError` when
        the job fails otherwise.
        """
        disks = list(every_disk)
        known = self._call(
            f"cannot list the checkpoints of {self._what}",
            lambda domain: {checkpoint.getName() for checkpoint in domain.listAllCheckpoints(0)},
        )
        if since not in known:
            raise ChangesUnavailable(f"{self._what} has no checkpoint {since}")
        try:
            self.domain.backupBegin(
                backup_xml(since, targets, disks),
                checkpoint_xml(checkpoint, targets, disks),
                0,
            )
        except libvirt.libvirtError as error:
            raise ChangesUnavailable(
                f"{self._what}: libvirt cannot read the changes since {since}: "
                f"{error.get_error_message()}"
            ) from None
        self._wait(timeout_s)

    def _wait(self, timeout_s: float) -> None:
        """Until the domain's backup job ends; raises when it failed or took too long."""
        if not self._ended(timeout_s):
            self.abort()
            raise LibvirtError(
                f"{self._what}: the changed-block backup took longer than {timeout_s:g} s"
            )
        stats = self._call(
            f"cannot read the backup job of {self._what}",
            lambda domain: domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED),
        )
        if stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
            message = stats.get("errmsg") or f"job type {stats.get('type')}"
            raise LibvirtError(f"{self._what}: the changed-block backup failed: {message}")

    def _ended(self, timeout_s: float) -> bool:
        """Whether the domain's job ended within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                kind = self._call(
                    f"cannot read the backup job of {self._what}",
                    lambda domain: domain.jobInfo()[0],
                )
            except LibvirtError as error:
                # libvirt 9.0 between a backup's end and its job's: a job, still.
                if "backup job data missing" not in str(error):
                    raise
                kind = libvirt.VIR_DOMAIN_JOB_UNBOUNDED
            if kind == libvirt.VIR_DOMAIN_JOB_NONE:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)

    def abort(self) -> None:
        """Abort a backup job of the domain (one a killed run left, or one too slow)."""
        with contextlib.suppress(libvirt.libvirtError):  # no job (any more)
            self.domain.abortJob()

    def abort_leftover(self, files: Iterable[Path]) -> bool:
        """Abort the domain's backup job when it writes one of ``files`` (a killed
        run's: the names are virt-dup's, and the caller holds the domain's lock);
        True when there was one.  A job of anyone else is left alone."""
        try:
            xml = self.domain.backupGetXMLDesc(0)
        except libvirt.libvirtError:
            return False  # no backup job
        root = parse_xml(xml, f"the backup job of {self._what}")
        targets = {target.get("file") for target in root.iterfind("disks/disk/target")}
        if not targets & {str(path) for path in files}:
            return False
        log.warning("%s: aborting the changed-block backup a killed run left", self._what)
        self.abort()
        if not self._ended(ABORT_WAIT_S):
            raise LibvirtError(f"{self._what}: a killed run's backup job does not end")
        return True
