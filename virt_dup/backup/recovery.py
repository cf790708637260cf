"""Finish or roll back what a crashed run left behind.

Two sources tell that a run did not finish:

* its record in the state directory (written before the first overlay);
* a disk whose current source is a virt-dup overlay (found by its file
  name), which covers a lost or wiped state directory.

Either way the answer is the same: merge the overlay back into the file it
sits on, so every guest write is kept and the domain runs on its original
top image again, then delete the overlay and the record.  Recovery runs at
the start of every ``virt-dup run`` (under the domain's lock) and from the
boot-time unit (``virt-dup recover``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import libvirt

from virt_dup.backup.overlay import MERGE_TIMEOUT_SECONDS, is_virt_dup_overlay, merge_overlay
from virt_dup.backup.state import StateStore
from virt_dup.errors import VirtDupError
from virt_dup.files import signals_deferred
from virt_dup.images.chain import read_chain
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.systemd import journal

log = logging.getLogger(__name__)


def recover_domain(
    hypervisor: Hypervisor,
    store: StateStore,
    domain: libvirt.virDomain,
    timeout_seconds: float = MERGE_TIMEOUT_SECONDS,
) -> list[str]:
    """Merge every virt-dup overlay of one domain; returns what was done (one line each).

    The caller holds the domain's lock.  Raises :class:`VirtDupError` when an
    overlay cannot be merged (the record then stays for the next attempt).
    SIGTERM/SIGINT wait until the domain is merged (no block job is left
    mirroring), then raise :class:`~virt_dup.files.Interrupted`.
    """
    try:
        with signals_deferred("recovery stopped after merging"):
            done = _recover_domain(hypervisor, store, domain, timeout_seconds)
    except VirtDupError as error:
        _record_recovery(domain, "failed", f"recovery of domain {domain.name()} failed: {error}")
        raise
    if done:
        line = f"recovery of domain {domain.name()}: {'; '.join(done)}"
        _record_recovery(domain, "success", line)
    return done


def _record_recovery(domain: libvirt.virDomain, result: str, message: str) -> None:
    """The journal record of a recovery that did something, or failed."""
    journal.record(
        message,
        priority=journal.PRIORITY_ERR if result == "failed" else journal.PRIORITY_NOTICE,
        MESSAGE_ID=journal.MESSAGE_RECOVERY,
        ACTION="recover",
        RESULT=result,
        DOMAIN=domain.name(),
        DOMAIN_UUID=domain.UUIDString(),
    )


def _recover_domain(
    hypervisor: Hypervisor,
    store: StateStore,
    domain: libvirt.virDomain,
    timeout_seconds: float,
) -> list[str]:
    done: list[str] = []
    record = store.load_run(domain.UUIDString())
    if record is not None:
        for planned in record.disks:

            def committed(target: str = planned.target) -> None:
                record.committed.append(target)
                store.save_run(record)

            merge_overlay(
                hypervisor,
                domain,
                planned.target,
                planned.overlay,
                planned.original_top,
                timeout_seconds,
                committed=planned.target in record.committed,
                on_committed=committed,
            )
            done.append(
                f"domain {domain.name()}: disk {planned.target} back on {planned.original_top} "
                f"(run of job {record.job_uuid} started {record.started} did not finish)"
            )
        store.clear_run(record.domain_uuid)
    # Overlays without a record (the state directory was lost).
    for inactive in (False, True):
        for disk in hypervisor.disks(domain, inactive=inactive):
            if disk.source is None or is_virt_dup_overlay(disk.source) is None:
                continue
            chain = read_chain(disk.source)
            if len(chain) < 2:
                raise VirtDupError(
                    f"domain {domain.name()}: disk {disk.target} runs on {disk.source}, a "
                    "virt-dup overlay without a backing file; merge it by hand"
                )
            original_top = chain[1].path
            merge_overlay(
                hypervisor, domain, disk.target, disk.source, original_top, timeout_seconds
            )
            done.append(
                f"domain {domain.name()}: disk {disk.target} back on {original_top} "
                f"(left-over overlay {disk.source})"
            )
    return done


@dataclass(frozen=True)
class PendingMerge:
    """An overlay that recovery would merge back (what ``run --dry-run`` reports)."""

    target: str
    overlay: str
    original_top: str
    why: str

    def line(self) -> str:
        return f"disk {self.target}: recovery first merges {self.overlay} back into " + (
            f"{self.original_top} ({self.why})"
        )


def pending_recovery(
    hypervisor: Hypervisor, store: StateStore, domain: libvirt.virDomain
) -> list[PendingMerge]:
    """What :func:`recover_domain` would merge, found the same two ways, changing
    nothing (no lock, no record written).  Raises :class:`VirtDupError` for an
    overlay recovery could not merge either."""
    pending: dict[str, PendingMerge] = {}
    record = store.load_run(domain.UUIDString())
    if record is not None:
        for planned in record.disks:
            pending[planned.target] = PendingMerge(
                planned.target,
                planned.overlay,
                planned.original_top,
                f"run of job {record.job_uuid} started {record.started} did not finish",
            )
    for inactive in (False, True):
        for disk in hypervisor.disks(domain, inactive=inactive):
            if disk.target in pending or disk.source is None:
                continue
            if is_virt_dup_overlay(disk.source) is None:
                continue
            chain = read_chain(disk.source)
            if len(chain) < 2:
                raise VirtDupError(
                    f"domain {domain.name()}: disk {disk.target} runs on {disk.source}, a "
                    "virt-dup overlay without a backing file; merge it by hand"
                )
            pending[disk.target] = PendingMerge(
                disk.target, disk.source, chain[1].path, "left-over overlay"
            )
    return list(pending.values())
