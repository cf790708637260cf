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
  persistent definition when it is off; then deletes the overlay.  It is
  idempotent, so recovery calls it on whatever an interrupted run left.

Filesystem freezing goes through libvirt's ``VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE``:
libvirt freezes, snapshots and thaws again itself, also when the snapshot
fails, so there is no separate freeze/thaw to forget.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import libvirt
from lxml import etree

from virt_dup.chain import read_chain, run_qemu_img
from virt_dup.errors import CommandError, LibvirtError, NotFoundError, VirtDupError
from virt_dup.hypervisor import Disk, Hypervisor
from virt_dup.jobs import is_valid_uuid, parse_xml
from virt_dup.options import QUIESCE_POLICIES

log = logging.getLogger(__name__)

_OVERLAY_NAME = re.compile(
    r"\.virt-dup-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.qcow2$"
)
_SNAPSHOT_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
)
#: libvirt errors that mean "the guest agent cannot freeze now", not "the snapshot is wrong".
_AGENT_ERRORS = frozenset(
    {
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        libvirt.VIR_ERR_AGENT_UNSYNCED,
    }
)
#: Generic codes libvirt also uses for agent trouble ("QEMU guest agent is not configured",
#: a freeze command that failed or timed out in the guest).
_GENERIC_ERRORS = frozenset(
    {
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
        libvirt.VIR_ERR_OPERATION_FAILED,
        libvirt.VIR_ERR_OPERATION_TIMEOUT,
        libvirt.VIR_ERR_INTERNAL_ERROR,
    }
)
#: How often a blockcommit is asked whether it is ready to pivot.
_POLL_INTERVAL_S = 0.05
#: How long a failed block job call waits to see whether the domain is stopping.
_STOP_GRACE_S = 5.0
#: Rounds of merge_overlay: each power-state change during a merge costs one.
_MERGE_ROUNDS = 6


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
    name = domain.name()
    active = hypervisor.call(f"cannot read the state of domain {name}", domain.isActive)
    disks = hypervisor.disks(domain, inactive=not active)
    _check_can_overlay(hypervisor, domain, disks, overlays)
    snapshot_xml = _snapshot_xml([disk.target for disk in disks], overlays)
    started = time.monotonic()
    if not active:
        _snapshot(domain, snapshot_xml, _SNAPSHOT_FLAGS)
        result = QuiesceResult(frozen=False, domain_active=False, reason="domain is shut off")
    elif quiesce == "off":
        _snapshot(domain, snapshot_xml, _SNAPSHOT_FLAGS)
        result = QuiesceResult(frozen=False, domain_active=True, reason="quiesce is off")
    else:
        result = _snapshot_quiesced(domain, snapshot_xml, quiesce)
    log.info(
        "domain %s: overlay on %s in %.3fs (%s)",
        name,
        ", ".join(sorted(overlays)),
        time.monotonic() - started,
        "filesystems frozen" if result.frozen else result.reason,
    )
    return result


def _check_can_overlay(
    hypervisor: Hypervisor,
    domain: libvirt.virDomain,
    disks: list[Disk],
    overlays: Mapping[str, str],
) -> None:
    name = domain.name()
    by_target = {disk.target: disk for disk in disks}
    persistent: dict[str, Disk] = {}
    if domain.isPersistent():
        persistent = {disk.target: disk for disk in hypervisor.disks(domain, inactive=True)}
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


def _snapshot_xml(targets: list[str], overlays: Mapping[str, str]) -> str:
    """A ``<domainsnapshot>``: the overlays for the selected disks, ``snapshot='no'`` elsewhere."""
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


def _snapshot(domain: libvirt.virDomain, snapshot_xml: str, flags: int) -> None:
    try:
        domain.snapshotCreateXML(snapshot_xml, flags)
    except libvirt.libvirtError as error:
        raise LibvirtError(
            f"cannot create the virt-dup overlay of domain {domain.name()}: {_message(error)}"
        ) from None


def _snapshot_quiesced(domain: libvirt.virDomain, snapshot_xml: str, quiesce: str) -> QuiesceResult:
    name = domain.name()
    try:
        domain.snapshotCreateXML(
            snapshot_xml, _SNAPSHOT_FLAGS | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        )
        return QuiesceResult(frozen=True, domain_active=True)
    except libvirt.libvirtError as error:
        reason = _message(error)
        if not _is_agent_error(error):
            raise LibvirtError(
                f"cannot create the virt-dup overlay of domain {name}: {reason}"
            ) from None
    if quiesce == "required":
        raise LibvirtError(
            f"domain {name}: cannot freeze guest filesystems and quiesce is required: {reason}; "
            "no overlay was created"
        )
    # ATOMIC: the failed attempt created nothing, so the same snapshot can be retried.
    log.warning(
        "domain %s: guest filesystems not frozen (%s): the backup is crash-consistent",
        name,
        reason,
    )
    _snapshot(domain, snapshot_xml, _SNAPSHOT_FLAGS)
    return QuiesceResult(frozen=False, domain_active=True, reason=reason)


def _is_agent_error(error: libvirt.libvirtError) -> bool:
    code = error.get_error_code()
    if code in _AGENT_ERRORS:
        return True
    return code in _GENERIC_ERRORS and "agent" in _message(error).lower()


# --- merging -------------------------------------------------------------------------


def merge_overlay(
    hypervisor: Hypervisor,
    domain: libvirt.virDomain,
    target: str,
    overlay_path: str,
    original_top: str,
    timeout_s: float,
    bandwidth: int = 0,
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

    Idempotent: a disk already on ``original_top`` only loses the left-over
    overlay file (if any); a blockcommit already running on the disk is
    waited for rather than started again.

    Raises :class:`LibvirtError` (blockcommit not ready in time: aborted,
    the disk stays on the overlay, a later call retries), :class:`CommandError`
    (qemu-img failed) or :class:`VirtDupError` when the disk runs on neither
    file or the overlay is not on ``original_top``: then nothing is deleted.
    """
    name = domain.name()
    deadline = time.monotonic() + timeout_s
    for _round in range(_MERGE_ROUNDS):
        active = hypervisor.call(f"cannot read the state of domain {name}", domain.isActive)
        live = _source(hypervisor, domain, target, inactive=False) if active else None
        persistent = (
            _source(hypervisor, domain, target, inactive=True) if domain.isPersistent() else None
        )
        if live is not None and _same_file(live, overlay_path):
            _require_overlay_file(name, target, overlay_path, original_top)
            _commit_live(hypervisor, domain, target, deadline, timeout_s, bandwidth)
        elif persistent is not None and _same_file(persistent, overlay_path):
            if not active:
                _require_overlay_file(name, target, overlay_path, original_top)
                if not _commit_offline(hypervisor, domain, overlay_path, timeout_s):
                    continue  # started meanwhile: the next round commits live
            # Live already on original_top (or just committed offline): fix the definition.
            _point_definition_at(hypervisor, domain, target, original_top)
        else:
            _check_back_on(name, target, original_top, live=live, persistent=persistent)
            _delete(overlay_path)
            return
    raise LibvirtError(
        f"domain {name}: disk {target} is still on the overlay {overlay_path} after "
        f"{_MERGE_ROUNDS} attempts (the domain kept starting and stopping?); retry later"
    )


def _source(
    hypervisor: Hypervisor, domain: libvirt.virDomain, target: str, *, inactive: bool
) -> str | None:
    for disk in hypervisor.disks(domain, inactive=inactive):
        if disk.target == target:
            return disk.source
    raise NotFoundError(f"domain {domain.name()} has no disk {target}")


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
    hypervisor: Hypervisor,
    domain: libvirt.virDomain,
    target: str,
    deadline: float,
    timeout_s: float,
    bandwidth: int,
) -> None:
    """Active shallow blockcommit of the top into its backing file, then pivot.

    Returns quietly when the domain stops on the way (the caller then merges
    offline).  Raises :class:`LibvirtError` when the job is not ready by
    ``deadline`` (it is aborted; the disk stays on the overlay).
    """
    name = domain.name()
    started = time.monotonic()
    try:
        info = domain.blockJobInfo(target, 0)
        if not info:
            flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
            if bandwidth:
                flags |= libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES
            domain.blockCommit(target, None, None, bandwidth, flags)
        elif info.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT:
            raise LibvirtError(
                f"domain {name}: disk {target} is busy with another block job "
                f"(type {info.get('type')}); cannot merge the overlay now"
            )
        if not _pivot_when_ready(domain, target, deadline, timeout_s):
            return  # the job vanished (aborted by someone): the caller looks again
    except libvirt.libvirtError as error:
        if _stops_soon(domain):
            log.info(
                "domain %s stopped during the blockcommit of %s; merging offline", name, target
            )
            return
        raise LibvirtError(
            f"domain {name}: disk {target}: blockcommit of the overlay failed: {_message(error)}"
        ) from None
    log.info(
        "domain %s: disk %s committed and pivoted in %.3fs",
        name,
        target,
        time.monotonic() - started,
    )


def _pivot_when_ready(
    domain: libvirt.virDomain, target: str, deadline: float, timeout_s: float
) -> bool:
    """Wait for the active commit on ``target`` to be ready, then pivot to its base.

    Returns False when the job disappeared before it could pivot.  Raises
    :class:`LibvirtError` after aborting the job when it is not ready by
    ``deadline``; libvirt errors go to the caller.
    """
    while True:
        info = domain.blockJobInfo(target, 0)
        if not info:
            return False
        # libvirt reports cur == end once QEMU has mirrored everything; it may
        # still refuse the pivot ("not ready for pivot yet", BLOCK_COPY_ACTIVE)
        # for a moment, until it has handled QEMU's READY event.
        if info["cur"] == info["end"]:
            try:
                domain.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                return True
            except libvirt.libvirtError as error:
                if error.get_error_code() != libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                    raise
        if time.monotonic() > deadline:
            domain.blockJobAbort(target, 0)
            raise LibvirtError(
                f"domain {domain.name()}: disk {target}: blockcommit not ready after "
                f"{timeout_s:.0f}s ({info['cur']}/{info['end']} bytes); aborted, the disk "
                "stays on the overlay until the next attempt"
            )
        time.sleep(_POLL_INTERVAL_S)


def _commit_offline(
    hypervisor: Hypervisor, domain: libvirt.virDomain, overlay: str, timeout_s: float
) -> bool:
    """``qemu-img commit`` the overlay into its backing file; False if the domain started.

    A commit killed by the timeout is harmless: the overlay still holds every
    write and the definition still points at it; the next attempt finishes.
    """
    started = time.monotonic()
    try:
        run_qemu_img("commit", "-q", "-f", "qcow2", overlay, timeout_s=timeout_s)
    except CommandError:
        # A domain started meanwhile holds the overlay's lock; commit it live instead.
        if hypervisor.call(f"cannot read the state of domain {domain.name()}", domain.isActive):
            return False
        raise
    log.info(
        "domain %s: overlay %s committed offline in %.3fs",
        domain.name(),
        overlay,
        time.monotonic() - started,
    )
    return True


def _point_definition_at(
    hypervisor: Hypervisor, domain: libvirt.virDomain, target: str, source: str
) -> None:
    """Make the persistent definition of disk ``target`` read ``source``.

    Every other setting of the disk is kept; the ``<backingStore>`` is dropped
    for libvirt to detect again from the image headers.
    """
    name = domain.name()
    root = parse_xml(hypervisor.domain_xml(domain, inactive=True), f"domain {name}")
    disk = next(
        (
            element
            for element in root.iterfind("devices/disk")
            if element.xpath("string(target/@dev)") == target
        ),
        None,
    )
    if disk is None:
        raise NotFoundError(f"domain {name} has no disk {target} in its persistent definition")
    for backing_store in disk.findall("backingStore"):
        disk.remove(backing_store)
    source_element = disk.find("source")
    if source_element is None:
        source_element = etree.SubElement(disk, "source")
    source_element.set("file", source)
    hypervisor.call(
        f"cannot point disk {target} of domain {name} back at {source}",
        domain.updateDeviceFlags,
        etree.tostring(disk, encoding="unicode"),
        libvirt.VIR_DOMAIN_AFFECT_CONFIG,
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


def _delete(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise VirtDupError(f"cannot delete the merged overlay {path}: {error.strerror}") from None
    log.info("deleted the merged overlay %s", path)


def _stops_soon(domain: libvirt.virDomain) -> bool:
    """Whether the domain is (about to be) shut off: a block job call that failed
    because QEMU went away ("Unable to read from monitor") can come a moment
    before libvirt reports the domain inactive.
    """
    deadline = time.monotonic() + _STOP_GRACE_S
    while True:
        try:
            if not domain.isActive():
                return True
        except libvirt.libvirtError:
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


def _message(error: libvirt.libvirtError) -> str:
    return (error.get_error_message() or str(error)).strip()
