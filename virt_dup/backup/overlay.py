"""virt-dup's temporary external overlays, made and merged back through libvirt.

While a backup reads a disk's chain, the domain writes to an overlay put on
top of it: ``<top dir>/<top name>.virt-dup-<job uuid>.qcow2`` (the name says
virt-dup and the job, so recovery recognises it without any other record).

* :func:`create_overlays` takes one atomic, disk-only snapshot without
  libvirt metadata for all selected disks at once, on a running domain (with
  guest filesystems frozen through the QEMU guest agent when asked and
  possible) or a shut-off one (the persistent definition then points at the
  overlay, so a power-on during the backup writes there).
* :func:`merge_overlay` puts a disk back on its original top image with every
  write kept, whatever the domain's power state has become since: active
  shallow blockcommit + pivot when it runs, ``qemu-img commit`` + a new
  persistent definition when it is off; then deletes the overlay -- only
  one whose every write is in the top (safety rule 1 of DESIGN.md), else it
  is kept and reported.  It is idempotent, so recovery calls it on whatever
  an interrupted run left.

Filesystem freezing goes through libvirt's ``VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE``:
libvirt freezes, snapshots and thaws again itself, also when the snapshot
fails, so there is no separate freeze/thaw to forget.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import libvirt

from virt_dup.config.options import QUIESCE_POLICIES
from virt_dup.errors import CommandError, LibvirtError, NotFoundError, VirtDupError
from virt_dup.images.chain import read_chain
from virt_dup.images.qemu_img import run_qemu_img, same_content
from virt_dup.libvirt.connection import ACTIVE_COMMIT, DiskOperations, Hypervisor, is_agent_error
from virt_dup.libvirt.domain_xml import (
    Disk,
    definition_pointed_at,
    disk_pointed_at,
    parse_disks,
    snapshot_xml,
)
from virt_dup.libvirt.metadata import is_valid_uuid

log = logging.getLogger(__name__)

_OVERLAY_NAME = re.compile(
    r"\.virt-dup-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.qcow2$"
)
#: How often a blockcommit is asked whether it is ready to pivot.
_POLL_INTERVAL_S = 0.05
#: How long a failed block job call waits to see whether the domain is stopping.
_STOP_GRACE_S = 5.0
#: How long an offline commit retries while a QEMU that just exited still holds
#: the image's lock (it takes QEMU 1-1.5 s here to exit after a destroy).
_LOCK_RETRY_S = 10.0
#: Rounds of merge_overlay: each power-state change during a merge costs one.
_MERGE_ROUNDS = 6
#: How long a blockcommit may take to reach READY before a merge gives up (and
#: leaves the disk on the overlay, with every write, for the next attempt).
MERGE_TIMEOUT_SECONDS = 3600.0


class MergeNotReady(LibvirtError):
    """An active commit did not reach READY in time; it was aborted (nothing lost)."""


class BlockJobBusy(LibvirtError):
    """Another block job runs on the disk: the overlay cannot be merged now."""


class OverlayRefused(LibvirtError):
    """No overlay was made (and none may be merged or deleted): a disk already runs
    on one, an overlay-named file is in the way, the disk is no qcow2 file, or
    the guest could not be frozen when that is required."""

    def __init__(self, message: str, exit_code: int = VirtDupError.exit_code) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class OverlayKept(VirtDupError):
    """An overlay no definition uses any more but that may hold guest writes the
    original top does not: it is kept, for an admin to look at."""


# --- names ---------------------------------------------------------------------------


def overlay_path(top: str, job_uuid: str) -> str:
    """The overlay file virt-dup puts on ``top`` for job ``job_uuid``.

    Next to ``top`` (same filesystem, same permissions as the chain):
    ``/d/vm.qcow2`` -> ``/d/vm.virt-dup-<job uuid>.qcow2``; a top not named
    ``*.qcow2`` keeps its whole name (``/d/disk.img.virt-dup-<uuid>.qcow2``).
    Raises :class:`ValueError` for a job id that is not a UUID.
    """
    if not is_valid_uuid(job_uuid):
        raise ValueError(f"job id {job_uuid!r} is not a UUID")
    job_uuid = job_uuid.lower()  # the only spelling is_virt_dup_overlay recognises
    directory, name = os.path.split(os.path.abspath(top))
    stem = name.removesuffix(".qcow2") or name
    return os.path.join(directory, f"{stem}.virt-dup-{job_uuid}.qcow2")


def is_virt_dup_overlay(path: str) -> str | None:
    """The job uuid if ``path`` is named like a virt-dup overlay, else ``None``."""
    match = _OVERLAY_NAME.search(os.path.basename(path))
    return match.group(1) if match else None


# --- creating ------------------------------------------------------------------------


@dataclass(frozen=True)
class QuiesceResult:
    """How consistent the point in time the overlays captured is.

    ``frozen``: guest filesystems were frozen (and thawed again) around the
    snapshot.  ``domain_active``: the domain ran (or was paused) when it was
    taken.  ``reason``: why nothing was frozen (the agent's error, "quiesce
    is off", "domain is shut off"), ``None`` when frozen.
    """

    frozen: bool
    domain_active: bool
    reason: str | None = None

    @property
    def crash_consistent_only(self) -> bool:
        """The disks were taken from a running guest without freezing it."""
        return self.domain_active and not self.frozen


def create_overlays(
    hypervisor: Hypervisor,
    domain: libvirt.virDomain,
    overlays: Mapping[str, str],
    quiesce: str,
) -> QuiesceResult:
    """Put an overlay on each disk of ``overlays`` ({target dev: overlay file}).

    One atomic disk-only snapshot without libvirt metadata: either every
    selected disk moves to its overlay or none does; every other disk of the
    domain is left alone.  On a running domain ``quiesce`` decides on
    freezing guest filesystems: ``auto`` tries and falls back to a
    crash-consistent snapshot (with a warning) when the guest agent is not
    configured, not connected or cannot freeze; ``required`` fails instead,
    creating nothing; ``off`` never tries.  A shut-off domain has nothing to
    freeze: its persistent definition is repointed at the overlays.

    Returns a :class:`QuiesceResult`.  Raises :class:`VirtDupError` when a
    selected disk already runs on a virt-dup overlay (recover first: overlays
    are never stacked) or an overlay file already exists,
    :class:`NotFoundError` for an unknown target, :class:`LibvirtError` when
    libvirt refuses the snapshot.
    """
    if quiesce not in QUIESCE_POLICIES:
        raise ValueError(f"quiesce must be one of {', '.join(QUIESCE_POLICIES)}, not {quiesce!r}")
    if not overlays:
        raise ValueError("create_overlays needs at least one disk")
    operations = DiskOperations(hypervisor, domain)
    name = operations.name
    active = operations.is_active()
    disks = operations.disks(inactive=not active)
    try:
        _check_can_overlay(operations, disks, overlays)
    except VirtDupError as error:
        raise OverlayRefused(str(error), error.exit_code) from error
    xml = snapshot_xml([disk.target for disk in disks], overlays)
    started = time.monotonic()
    if not active:
        operations.snapshot_disks(xml, quiesce=False)
        result = QuiesceResult(frozen=False, domain_active=False, reason="domain is shut off")
    elif quiesce == "off":
        operations.snapshot_disks(xml, quiesce=False)
        result = QuiesceResult(frozen=False, domain_active=True, reason="quiesce is off")
    else:
        result = _snapshot_quiesced(operations, xml, quiesce)
    log.info(
        "domain %s: overlay on %s in %.3fs (%s)",
        name,
        ", ".join(sorted(overlays)),
        time.monotonic() - started,
        "filesystems frozen" if result.frozen else result.reason,
    )
    return result


def _check_can_overlay(
    operations: DiskOperations, disks: list[Disk], overlays: Mapping[str, str]
) -> None:
    name = operations.name
    by_target = {disk.target: disk for disk in disks}
    persistent: dict[str, Disk] = {}
    if operations.is_persistent():
        persistent = {disk.target: disk for disk in operations.disks(inactive=True)}
    if len(set(map(os.path.normpath, overlays.values()))) != len(overlays):
        raise VirtDupError(
            f"domain {name}: two disks would share one overlay file ({overlays}): "
            "their top images have the same name apart from the .qcow2 suffix"
        )
    for target, overlay in overlays.items():
        disk = by_target.get(target)
        if disk is None:
            raise NotFoundError(f"domain {name} has no disk {target}")
        if not disk.is_qcow2_file:
            raise VirtDupError(
                f"domain {name}: disk {target} is not a qcow2 file ({disk.source_type} "
                f"{disk.driver_type}); virt-dup puts overlays on qcow2 files only"
            )
        for current in (disk, persistent.get(target)):
            if current is not None and current.source and is_virt_dup_overlay(current.source):
                raise VirtDupError(
                    f"domain {name}: disk {target} already runs on the virt-dup overlay "
                    f"{current.source}; recover it first (overlays are never stacked)"
                )
        if os.path.lexists(overlay):
            raise VirtDupError(
                f"domain {name}: overlay file {overlay} for disk {target} already exists "
                "(left by an interrupted run?); recover first"
            )


def _snapshot_quiesced(operations: DiskOperations, xml: str, quiesce: str) -> QuiesceResult:
    name = operations.name
    try:
        operations.snapshot_disks(xml, quiesce=True)
        return QuiesceResult(frozen=True, domain_active=True)
    except LibvirtError as error:
        if not is_agent_error(error):
            raise
        reason = error.reason
    if quiesce == "required":
        raise OverlayRefused(
            f"domain {name}: cannot freeze guest filesystems and quiesce is required: {reason}; "
            "no overlay was created"
        )
    # ATOMIC: the failed attempt created nothing, so the same snapshot can be retried.
    log.warning(
        "domain %s: guest filesystems not frozen (%s): the backup is crash-consistent",
        name,
        reason,
    )
    operations.snapshot_disks(xml, quiesce=False)
    return QuiesceResult(frozen=False, domain_active=True, reason=reason)


# --- merging -------------------------------------------------------------------------


def merge_overlay(
    hypervisor: Hypervisor,
    domain: libvirt.virDomain,
    target: str,
    overlay_path: str,
    original_top: str,
    timeout_s: float = MERGE_TIMEOUT_SECONDS,
    *,
    bandwidth: int = 0,
    committed: bool = False,
    on_committed: Callable[[], None] | None = None,
) -> None:
    """Put disk ``target`` back on ``original_top`` with every write kept; delete the overlay.

    Whatever the power state is now: a running (or paused) domain gets an
    active shallow blockcommit of ``overlay_path`` into ``original_top``,
    waited for up to ``timeout_s`` seconds, then a pivot; a shut-off one gets
    ``qemu-img commit`` and a persistent definition pointing at
    ``original_top`` again.  A domain that starts or stops in the middle is
    handled by the other way.  The persistent definition always ends on
    ``original_top`` too.  ``bandwidth`` limits the blockcommit (bytes/s,
    0 = unlimited).

    Idempotent: a blockcommit already running on the disk is waited for
    rather than started again, and a disk already on ``original_top`` only
    loses a left-over overlay file -- but only an overlay whose writes are
    in ``original_top``: one this call committed, one the caller knows was
    committed (``committed``: a run record says so), or one whose content
    ``qemu-img compare`` finds equal to ``original_top``'s.  Any other
    overlay is kept (:class:`OverlayKept`): no definition uses it, yet it
    may hold guest writes (a shut-off domain started and stopped during the
    backup, then defined on its original top by someone else).
    ``on_committed`` is called as soon as the commit is done (the pivot, or
    ``qemu-img commit``), before any definition is changed and before the
    overlay is deleted: the run records it, so a merge interrupted after it
    deletes the overlay without a look.

    Raises :class:`LibvirtError` (blockcommit not ready in time: aborted,
    the disk stays on the overlay, a later call retries), :class:`CommandError`
    (qemu-img failed) or :class:`VirtDupError` when the disk runs on neither
    file or the overlay is not on ``original_top``: then nothing is deleted.
    """
    operations = DiskOperations(hypervisor, domain)
    name = operations.name
    deadline = time.monotonic() + timeout_s
    for _round in range(_MERGE_ROUNDS):
        active = operations.is_active()
        live = _source(operations, target, inactive=False) if active else None
        persistent = (
            _source(operations, target, inactive=True) if operations.is_persistent() else None
        )
        if live is not None and _same_file(live, overlay_path):
            _require_overlay_file(name, target, overlay_path, original_top)
            if _commit_live(operations, target, deadline, timeout_s, bandwidth):
                committed = True
                if on_committed is not None:
                    on_committed()
        elif persistent is not None and _same_file(persistent, overlay_path):
            if not active:
                _require_overlay_file(name, target, overlay_path, original_top)
                if not _commit_offline(operations, overlay_path, timeout_s):
                    continue  # started meanwhile: the next round commits live
                committed = True
                if on_committed is not None:
                    on_committed()
                _point_saved_state_at(operations, target, overlay_path, original_top)
            # Live already on original_top (or just committed offline): fix the definition.
            _point_definition_at(operations, target, original_top)
        else:
            _check_back_on(name, target, original_top, live=live, persistent=persistent)
            if os.path.lexists(overlay_path):
                _check_merged(name, target, overlay_path, original_top, committed)
                _delete(overlay_path)
            return
    raise LibvirtError(
        f"domain {name}: disk {target} is still on the overlay {overlay_path} after "
        f"{_MERGE_ROUNDS} attempts (the domain kept starting and stopping?); retry later"
    )


def _source(operations: DiskOperations, target: str, *, inactive: bool) -> str | None:
    for disk in operations.disks(inactive=inactive):
        if disk.target == target:
            return disk.source
    raise NotFoundError(f"domain {operations.name} has no disk {target}")


def _require_overlay_file(domain_name: str, target: str, overlay: str, original_top: str) -> None:
    """The overlay exists and its backing file is ``original_top`` (else merging is wrong)."""
    if not os.path.exists(overlay):
        raise VirtDupError(
            f"domain {domain_name}: disk {target} runs on the overlay {overlay}, which does "
            "not exist; repair the disk by hand"
        )
    chain = read_chain(overlay)
    if len(chain) < 2 or not _same_file(chain[1].path, original_top):
        backing = chain[1].path if len(chain) > 1 else "nothing"
        raise VirtDupError(
            f"domain {domain_name}: disk {target}: the overlay {overlay} is on {backing}, "
            f"not on {original_top}; merge it by hand"
        )


def _commit_live(
    operations: DiskOperations, target: str, deadline: float, timeout_s: float, bandwidth: int
) -> bool:
    """Active shallow blockcommit of the top into its backing file, then pivot.

    Returns True once pivoted; False when the domain stops on the way (the
    caller then merges offline) or the job vanished.  Raises
    :class:`MergeNotReady` when the job is not ready by ``deadline`` (it is
    aborted; the disk stays on the overlay).
    """
    name = operations.name
    what = f"domain {name}: disk {target}: blockcommit of the overlay failed"
    started = time.monotonic()
    try:
        info = operations.block_job(target, what)
        if info is None:
            operations.start_active_commit(target, bandwidth, what)
        elif info.get("type") != ACTIVE_COMMIT:
            raise BlockJobBusy(
                f"domain {name}: disk {target} is busy with another block job "
                f"(type {info.get('type')}); cannot merge the overlay now"
            )
        if not _pivot_when_ready(operations, target, deadline, timeout_s, what):
            if not operations.is_active():
                return False  # stopped meanwhile: the caller merges offline
            raise LibvirtError(
                f"domain {name}: disk {target}: the blockcommit of the overlay ended without "
                "a pivot (aborted, or failed in QEMU: see the domain's log); the disk stays "
                "on the overlay until the next attempt"
            )
    except (MergeNotReady, BlockJobBusy):
        raise
    except LibvirtError:
        if _stops_soon(operations):
            log.info(
                "domain %s stopped during the blockcommit of %s; merging offline", name, target
            )
            return False
        raise
    log.info(
        "domain %s: disk %s committed and pivoted in %.3fs",
        name,
        target,
        time.monotonic() - started,
    )
    return True


def _pivot_when_ready(
    operations: DiskOperations, target: str, deadline: float, timeout_s: float, what: str
) -> bool:
    """Wait for the active commit on ``target`` to be ready, then pivot to its base.

    Returns False when the job disappeared before it could pivot.  Raises
    :class:`MergeNotReady` after aborting the job when it is not ready by
    ``deadline``; libvirt errors go to the caller.
    """
    while True:
        info = operations.block_job(target, what)
        if info is None:
            return False
        # The pivot is asked for at every look, not only when cur == end: under
        # sustained guest writes QEMU's job is READY (and can pivot) while cur
        # keeps trailing end.  libvirt refuses it ("not ready for pivot yet")
        # until QEMU has reported READY.
        if operations.pivot(target, what):
            return True
        if time.monotonic() > deadline:
            operations.abort_block_job(target, what)
            raise MergeNotReady(
                f"domain {operations.name}: disk {target}: blockcommit not ready after "
                f"{timeout_s:.0f}s ({info['cur']}/{info['end']} bytes); aborted, the disk "
                "stays on the overlay until the next attempt"
            )
        time.sleep(_POLL_INTERVAL_S)


def _commit_offline(operations: DiskOperations, overlay: str, timeout_s: float) -> bool:
    """``qemu-img commit`` the overlay into its backing file; False if the domain started.

    A commit killed by the timeout is harmless: the overlay still holds every
    write and the definition still points at it; the next attempt finishes.
    """
    started = time.monotonic()
    attempt_until = started + _LOCK_RETRY_S
    while True:
        try:
            run_qemu_img("commit", "-q", "-f", "qcow2", overlay, timeout_s=timeout_s)
            break
        except CommandError as error:
            # A domain started meanwhile holds the overlay's lock: commit it live.
            if operations.is_active():
                return False
            # A QEMU that was just destroyed may hold its image locks a moment longer.
            if "lock" not in str(error) or time.monotonic() > attempt_until:
                raise
            time.sleep(_POLL_INTERVAL_S * 4)
    log.info(
        "domain %s: overlay %s committed offline in %.3fs",
        operations.name,
        overlay,
        time.monotonic() - started,
    )
    return True


def _point_saved_state_at(
    operations: DiskOperations, target: str, overlay: str, original_top: str
) -> None:
    """A domain managed-saved during the backup (``virsh managedsave``,
    libvirt-guests suspending it) resumes from a saved state whose definition
    names the overlay: once the overlay is committed, that definition names
    ``original_top`` instead, so the guest's memory is kept and the overlay can
    go.  (The committed ``original_top`` shows the guest exactly the data the
    overlay showed.)"""
    if not operations.has_managed_save():
        return
    saved = operations.managed_save_xml()
    where = f"the saved state of domain {operations.name}"
    for disk in parse_disks(saved, where):
        if disk.target == target and disk.source and _same_file(disk.source, overlay):
            xml = definition_pointed_at(saved, target, original_top, where)
            operations.define_managed_save(xml, f"cannot point {where} at {original_top}")
            log.info("domain %s: saved state now on %s", operations.name, original_top)


def _point_definition_at(operations: DiskOperations, target: str, source: str) -> None:
    """Make the persistent definition of disk ``target`` read ``source``
    (:func:`~virt_dup.libvirt.domain_xml.disk_pointed_at`)."""
    name = operations.name
    definition = operations.hypervisor.domain_xml(operations.domain, inactive=True)
    disk_xml = disk_pointed_at(definition, target, source, f"domain {name}")
    operations.define_disk(
        disk_xml, f"cannot point disk {target} of domain {name} back at {source}"
    )


def _check_back_on(
    domain_name: str, target: str, original_top: str, *, live: str | None, persistent: str | None
) -> None:
    """Neither definition uses the overlay any more: both must be on ``original_top``."""
    for where, source in (("runs", live), ("is defined", persistent)):
        if source is not None and not _same_file(source, original_top):
            raise VirtDupError(
                f"domain {domain_name}: disk {target} {where} on {source}, which is neither "
                f"{original_top} nor the virt-dup overlay; the overlay is kept, merge by hand"
            )


def _check_merged(
    domain_name: str, target: str, overlay: str, original_top: str, committed: bool
) -> None:
    """Raises :class:`OverlayKept` unless every write in ``overlay`` is in ``original_top``."""
    if committed:
        return
    try:
        if same_content(overlay, original_top):
            return
        reason = "its content differs from"
    except CommandError as error:
        reason = f"it cannot be compared ({error}) with"
    raise OverlayKept(
        f"domain {domain_name}: disk {target} is back on {original_top}, but the overlay "
        f"{overlay} was not merged by virt-dup and {reason} {original_top}: it may hold "
        "guest writes (was the domain defined anew during the backup?); it is kept: "
        f"'qemu-img commit {overlay}' puts them into {original_top}, when no domain uses it"
    )


def _delete(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise VirtDupError(f"cannot delete the merged overlay {path}: {error.strerror}") from None
    log.info("deleted the merged overlay %s", path)


def _stops_soon(operations: DiskOperations) -> bool:
    """Whether the domain is (about to be) shut off: a block job call that failed
    because QEMU went away ("Unable to read from monitor") can come a moment
    before libvirt reports the domain inactive.
    """
    deadline = time.monotonic() + _STOP_GRACE_S
    while True:
        try:
            if not operations.is_active():
                return True
        except LibvirtError:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_INTERVAL_S)


def _same_file(first: str, second: str) -> bool:
    if os.path.normpath(first) == os.path.normpath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False
