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
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt

from virt_dup.errors import LibvirtError, VirtDupError
from virt_dup.libvirt.connection import Hypervisor

#: Every checkpoint virt-dup makes starts so; the job's uuid follows.
CHECKPOINT_PREFIX = "virt-dup-"
#: How often the backup job is looked at while it runs.
POLL_S = 0.05


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
    """The checkpoints of one domain and changed-block reads from them."""

    def __init__(self, hypervisor: Hypervisor, domain: libvirt.virDomain) -> None:
        self.hypervisor = hypervisor
        self.domain = domain

    @property
    def _what(self) -> str:
        return f"domain {self.domain.name()}"

    def checkpoints(self, job_uuid: str) -> list[str]:
        """The names of ``job_uuid``'s checkpoints, oldest first."""
        prefix = f"{CHECKPOINT_PREFIX}{job_uuid}-"
        found = self.hypervisor.call(
            f"cannot list the checkpoints of {self._what}", self.domain.listAllCheckpoints, 0
        )
        names = [checkpoint.getName() for checkpoint in found]
        return sorted(name for name in names if name.startswith(prefix))

    def create_checkpoint(self, name: str, disks: Iterable[str], every_disk: Iterable[str]) -> None:
        """Start tracking the writes to ``disks`` from now on, as checkpoint ``name``."""
        self.hypervisor.call(
            f"cannot create checkpoint {name} of {self._what}",
            self.domain.checkpointCreateXML,
            checkpoint_xml(name, disks, every_disk),
            0,
        )

    def delete_checkpoint(self, name: str) -> None:
        """Delete a virt-dup checkpoint (libvirt merges its bitmap into the next one)."""
        if not name.startswith(CHECKPOINT_PREFIX):
            raise VirtDupError(f"{name}: not a virt-dup checkpoint; left alone")
        what = f"cannot delete checkpoint {name} of {self._what}"
        checkpoint = self.hypervisor.call(what, self.domain.checkpointLookupByName, name, 0)
        self.hypervisor.call(what, checkpoint.delete, 0)

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
        if since not in {c.getName() for c in self._all_checkpoints()}:
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

    def _all_checkpoints(self) -> list[libvirt.virDomainCheckpoint]:
        return self.hypervisor.call(
            f"cannot list the checkpoints of {self._what}", self.domain.listAllCheckpoints, 0
        )

    def _wait(self, timeout_s: float) -> None:
        """Until the domain's backup job ends; raises when it failed or took too long."""
        deadline = time.monotonic() + timeout_s
        while True:
            kind = self.hypervisor.call(
                f"cannot read the backup job of {self._what}", self.domain.jobInfo
            )[0]
            if kind == libvirt.VIR_DOMAIN_JOB_NONE:
                break
            if time.monotonic() > deadline:
                self.abort()
                raise LibvirtError(
                    f"{self._what}: the changed-block backup took longer than {timeout_s:g} s"
                )
            time.sleep(POLL_S)
        stats = self.hypervisor.call(
            f"cannot read the backup job of {self._what}",
            self.domain.jobStats,
            libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED,
        )
        if stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
            message = stats.get("errmsg") or f"job type {stats.get('type')}"
            raise LibvirtError(f"{self._what}: the changed-block backup failed: {message}")

    def abort(self) -> None:
        """Abort a backup job of the domain (one a killed run left, or one too slow)."""
        with contextlib.suppress(libvirt.libvirtError):  # no job (any more)
            self.domain.abortJob()
