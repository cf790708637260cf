"""``virt-dup run JOB_UUID``: one backup of one job, start to finish.

The order matters and is the design's:

1. find the job through libvirt (the live XML is authoritative), take the
   domain's lock;
2. recover whatever an earlier run left (never stack overlays);
3. decide everything that can fail *before* touching the domain: disks,
   chains, depth selection, backend, keys, full or incremental;
4. record the plan, then put an overlay on every selected disk;
5. write the metadata folder, back up the selected files with duplicity;
6. merge every overlay back — always, also when the backup failed;
7. clear the record, apply retention, record the result (status file,
   journal, the metrics textfile).

A SIGTERM (systemd stopping the unit, its start timeout) becomes an
exception so step 6 still runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import libvirt

from virt_dup.actions.status import refresh_metrics
from virt_dup.alerts.send import Pings
from virt_dup.backup.changes import (
    CHANGES,
    WHOLE,
    ChangedBlockRun,
    changes_file,
    decide,
    load_record,
    planned_disks,
    record_of,
    top_identity_of,
)
from virt_dup.backup.checksums import ChecksumCache
from virt_dup.backup.manifest import (
    ChangedDisk,
    ChangesManifest,
    write_changes_metadata,
    write_metadata,
)
from virt_dup.backup.overlay import (
    MERGE_TIMEOUT_SECONDS,
    OverlayRefused,
    create_overlays,
    merge_overlay,
)
from virt_dup.backup.plan import (
    Destination,
    DiskPlan,
    Plan,
    check_complete,
    make_plan,
    wait_past_last_backup,
)
from virt_dup.backup.recovery import PendingMerge, pending_recovery, recover_domain
from virt_dup.backup.state import RunRecord, StateStore
from virt_dup.config.load import Config
from virt_dup.config.options import JobOptions, interval_length, masked_url
from virt_dup.duplicity.collection import Collection
from virt_dup.duplicity.copy import collection_of, copy_collection, listing, prune_changes
from virt_dup.duplicity.protocol import BackupProgress, BackupStats
from virt_dup.duplicity.runner import Duplicity
from virt_dup.duplicity.target import Target, changes_target
from virt_dup.duplicity.times import format_time
from virt_dup.errors import LibvirtError, VirtDupError
from virt_dup.files import (
    file_errors_reported,
    human_size,
    interruptible,
    sha256_files,
    signals_deferred,
)
from virt_dup.libvirt.checkpoints import ChangedBlocks, ChangesUnavailable
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.libvirt.domain_xml import parse_disks
from virt_dup.libvirt.locality import require_local_disks
from virt_dup.libvirt.metadata import Job
from virt_dup.restore.sources import keep_own_metadata
from virt_dup.systemd import journal

log = logging.getLogger(__name__)

#: How long a run waits for one of the host's run slots (``max_parallel_runs``):
#: below the run units' TimeoutStartSec=12h, so the run says why it gave up.
RUN_SLOT_WAIT_S = 11 * 3600.0
#: How long libvirt may take to write the changed blocks of one run.
CHANGES_TIMEOUT_S = 3600.0
#: Merges of one disk, when libvirtd went away during one (reconnecting in between).
_MERGE_ATTEMPTS = 3


class RunFailed(VirtDupError):
    """A run failed; its result is recorded (status file, journal) already."""

    def __init__(self, result: RunResult, cause: VirtDupError) -> None:
        super().__init__(f"job {result.job_uuid} of domain {result.domain}: {cause}")
        self.result = result
        self.exit_code = cause.exit_code


@dataclass
class RunResult(journal.Outcome):
    """What a run did; becomes the journal record and the status file."""

    ACTION = "backup"
    MESSAGE_ID = journal.MESSAGE_BACKUP_DONE
    FAILED_MESSAGE_ID = journal.MESSAGE_BACKUP_FAILED

    full: bool | None = None
    disks: list[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_uploaded: int = 0
    #: Bytes of image files read for their checksums (untouched ones are remembered).
    bytes_hashed: int = 0
    #: ``changes`` (only what the guest wrote since the last backup) or ``whole``.
    read: str = WHOLE
    #: Why a job that reads changed blocks read whole files this time.
    read_reason: str = ""
    backup_time: str | None = None
    #: Per destination (its masked URL): ``result`` and ``message`` of this run.
    destinations: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def kind(self) -> str | None:
        return {True: "full", False: "incremental", None: None}[self.full]

    def success_line(self) -> str:
        return (
            f"job {self.job_uuid} of domain {self.domain}: {self.kind} backup of "
            f"{', '.join(self.disks)} done in {self.duration_seconds:.1f} s, "
            f"{human_size(self.bytes_read)} read, "
            f"{human_size(self.bytes_uploaded)} uploaded"
        )

    def details(self) -> dict[str, object]:
        return {
            "BACKUP_TYPE": self.kind,
            "DISKS": ",".join(self.disks) or None,
            "BYTES_READ": self.bytes_read,
            "BYTES_UPLOADED": self.bytes_uploaded,
            "BYTES_HASHED": self.bytes_hashed,
            "READ": self.read if self.full is not None else None,
            "READ_REASON": self.read_reason or None,
        }


def _now() -> datetime:
    return datetime.now(UTC)


def run_job(
    config: Config,
    hypervisor: Hypervisor,
    job_uuid: str,
    *,
    force_full: bool = False,
    report: Callable[[str], None] = print,
    progress: Callable[[BackupProgress], None] | None = None,
    duplicity: Duplicity | None = None,
    lock_wait_seconds: float = 600.0,
) -> RunResult:
    """Run one backup of a job; returns the result.

    Every failure is recorded (status file, journal) and raised as
    :class:`RunFailed`, after every overlay is merged back.  With
    ``alerts.ping_url``, the start, success or failure is pinged too
    (bounded, never a reason for the run to fail).
    """
    require_local_disks(config.libvirt_uri)
    pings = Pings(config, job_uuid)
    pings.start()
    try:
        result = _run_job(
            config,
            hypervisor,
            job_uuid,
            force_full=force_full,
            report=report,
            progress=progress,
            duplicity=duplicity,
            lock_wait_seconds=lock_wait_seconds,
        )
    except RunFailed as failed:
        pings.failure(failed.result.summary())
        raise
    except VirtDupError as error:  # before the run began: no such job, no libvirt
        pings.failure(str(error))
        raise
    pings.success(result.summary())
    return result


def _run_job(
    config: Config,
    hypervisor: Hypervisor,
    job_uuid: str,
    *,
    force_full: bool,
    report: Callable[[str], None],
    progress: Callable[[BackupProgress], None] | None,
    duplicity: Duplicity | None,
    lock_wait_seconds: float,
) -> RunResult:
    domain, job = hypervisor.find_job(job_uuid)
    store = StateStore.of(config)
    result = RunResult(job.uuid, domain.name())
    run = _Run(config, hypervisor, store, domain, job, duplicity or Duplicity(), report, progress)
    try:
        with (
            journal.recorded(
                result,
                lambda done: _write_status(store, done),
                lambda _done: refresh_metrics(config, hypervisor),
            ),
            file_errors_reported(),
            store.domain_lock(domain.UUIDString(), domain.name(), lock_wait_seconds),
        ):
            run.locked(result, force_full=force_full)
    except VirtDupError as error:
        raise RunFailed(result, error) from None
    return result


@dataclass(frozen=True)
class DryRun:
    """What ``run`` would do now (``run --dry-run``)."""

    job_uuid: str
    domain: str
    #: The pid of a run of this domain in progress (None: none runs).
    busy: str | None = None
    #: What recovery would merge back first.
    recovery: tuple[PendingMerge, ...] = ()
    #: Why the run would be skipped (disable_if_powered_off), else None.
    skipped: str | None = None
    plan: Plan | None = None

    def lines(self) -> list[str]:
        lines = []
        if self.busy is not None:
            lines.append(
                f"domain {self.domain}: a run (pid {self.busy}) holds its lock; this run "
                "would wait for it"
            )
        lines += [pending.line() for pending in self.recovery]
        if self.skipped is not None:
            lines.append(f"job {self.job_uuid}: skipped: {self.skipped}")
        if self.plan is not None:
            lines += self.plan.describe()
        return lines

    def as_json(self) -> dict[str, object]:
        return {
            "job": self.job_uuid,
            "domain": self.domain,
            "busy_pid": self.busy,
            "recovery": [dataclasses.asdict(pending) for pending in self.recovery],
            "skipped": self.skipped,
            "plan": None if self.plan is None else self.plan.as_json(),
        }


def plan_job(
    config: Config,
    hypervisor: Hypervisor,
    job_uuid: str,
    *,
    force_full: bool = False,
    duplicity: Duplicity | None = None,
) -> DryRun:
    """What :func:`run_job` would do now, doing none of it.

    Nothing is written or held: no lock (only asked who holds it), no
    recovery (only what it would merge), no run record, no status, no journal
    record, nothing in the job's duplicity cache, nothing on the backend.  A
    disk that recovery would take off an overlay is planned on the file below
    it, as the run will find it.  Raises what planning raises.
    """
    domain, job = hypervisor.find_job(job_uuid)
    store = StateStore.of(config)
    name = domain.name()
    busy = store.lock_holder(domain.UUIDString())
    # The overlays on the domain now, and the files below them.  A live run's
    # are not for recovery (that run merges them), but the plan looks below
    # them all the same.
    overlays = tuple(pending_recovery(hypervisor, store, domain))
    recovery = () if busy else overlays
    running = bool(hypervisor.call(f"cannot read the state of domain {name}", domain.isActive))
    if job.options.over(config.defaults).disable_if_powered_off and not running:
        reason = f"domain {name} is shut off (disable_if_powered_off)"
        return DryRun(job.uuid, name, busy, recovery, skipped=reason)
    xml = hypervisor.domain_xml(domain) if running else hypervisor.domain_xml(domain, inactive=True)
    originals = {pending.target: pending.original_top for pending in overlays}
    disks = [
        dataclasses.replace(disk, source=originals[disk.target])
        if disk.target in originals
        else disk
        for disk in parse_disks(xml, f"domain {name}")
    ]
    plan = make_plan(
        config, duplicity or Duplicity(), disks, running, job, force_full, dry_run=True
    )
    return DryRun(job.uuid, name, busy, recovery, plan=plan)


def _write_status(store: StateStore, result: RunResult) -> None:
    with file_errors_reported():
        store.record_result(result.job_uuid, result.as_status())


@dataclass
class _Run:
    """One run of one job, with what it needs."""

    config: Config
    hypervisor: Hypervisor
    store: StateStore
    domain: libvirt.virDomain
    job: Job
    duplicity: Duplicity
    report: Callable[[str], None]
    progress: Callable[[BackupProgress], None] | None

    def locked(self, result: RunResult, *, force_full: bool) -> None:
        """Steps 2-7 of the module docstring, under the domain's lock."""
        domain, hypervisor = self.domain, self.hypervisor
        for line in recover_domain(hypervisor, self.store, domain):
            self.report(f"recovered: {line}")
        name = domain.name()
        running = bool(hypervisor.call(f"cannot read the state of domain {name}", domain.isActive))
        if self.job.options.over(self.config.defaults).disable_if_powered_off and not running:
            result.result = "skipped"
            result.message = f"domain {name} is shut off (disable_if_powered_off)"
            return
        # The definition is read once: it is saved in the backup, and its disks
        # (or the running domain's) are what the plan selects from.
        domain_xml = hypervisor.domain_xml(domain, inactive=True)
        current_xml = hypervisor.domain_xml(domain) if running else domain_xml
        disks = parse_disks(current_xml, f"domain {name}")
        plan = make_plan(self.config, self.duplicity, disks, running, self.job, force_full)
        result.full = plan.full
        result.disks = [disk.target for disk in plan.disks]
        changed = self._changed_blocks(plan, running, [disk.target for disk in disks])
        if changed is not None and changed.decision.read == WHOLE:
            result.read_reason = changed.decision.reason
        # Recovery above never waits for a slot; the backup does, before any overlay.
        with self.store.run_slot(
            self.config.max_parallel_runs,
            RUN_SLOT_WAIT_S,
            lambda: log.info(
                "domain %s: waiting for a free run slot (max_parallel_runs: %d)",
                name,
                self.config.max_parallel_runs,
            ),
        ):
            wait_past_last_backup(plan.collection)
            self.back_up(plan, result, domain_xml, changed)

    def _changed_blocks(
        self, plan: Plan, running: bool, every_disk: list[str]
    ) -> ChangedBlockRun | None:
        """The changed-block side of this run: None when the job reads whole files
        only (``changed_blocks: off``) or the domain is shut off."""
        if plan.options.changed_blocks != "auto" or not running:
            return None
        blocks = ChangedBlocks(self.hypervisor, self.domain)
        record_path = self.store.directory / "changed-blocks" / f"{plan.job.uuid}.json"
        record = load_record(record_path)
        try:
            checkpoints = blocks.checkpoints(plan.job.uuid)
        except VirtDupError as error:
            log.warning("job %s: cannot list checkpoints: %s", plan.job.uuid, error)
            checkpoints = []
        disks = planned_disks(plan)
        # A run killed during its read left libvirt's job writing its files: it goes
        # first (this run holds the domain's lock; the job would block this one).
        blocks.abort_leftover(changes_file(disk.top, plan.job.uuid) for disk in disks)
        decision = decide(
            enabled=True,
            running=running,
            full=plan.full,
            record=record,
            checkpoints=checkpoints,
            disks=disks,
            top_identity=top_identity_of,
        )
        return ChangedBlockRun(blocks, plan.job.uuid, every_disk, record_path, record, decision)

    def back_up(
        self,
        plan: Plan,
        result: RunResult,
        domain_xml: str,
        changed: ChangedBlockRun | None = None,
    ) -> None:
        """Steps 4-7: the backup (changed blocks, or overlays on, whole files, merge
        back), retention, copies to the other destinations."""
        collection_after: Collection | None = plan.collection
        whole = True
        if changed is not None and changed.decision.read == CHANGES:
            try:
                self._back_up_changes(plan, result, domain_xml, changed)
                whole = False
            except ChangesUnavailable as error:
                log.warning("job %s: %s; reading the whole files", plan.job.uuid, error)
                result.read_reason = str(error)
        if whole:
            collection_after = self._back_up_whole(plan, result, domain_xml, changed)
        applied = self.duplicity.apply_retention(
            plan.target, plan.retention or plan.options, collection=collection_after
        )
        if plan.options.changed_blocks == "auto":
            self._changes_retention(
                plan.target,
                plan.retention or plan.options,
                None if applied else collection_after,
            )
        shown = masked_url(plan.backend_url)
        result.destinations[shown] = {"result": "success", "message": "backed up"}
        outcomes = [self._copy_to(plan, mirror, result) for mirror in plan.mirrors]
        failed = [line for line in outcomes if line is not None]
        if failed:
            # The backup itself is whole on the first destination (and on every
            # mirror not named): the run fails so that the unit and its alert say
            # that a destination lacks it.
            raise VirtDupError(
                f"backed up {', '.join(result.disks)} to {shown}, but not to " + "; ".join(failed)
            )
        result.result = "success"
        result.message = f"backed up {', '.join(result.disks)} to " + ", ".join(result.destinations)

    def _back_up_whole(
        self,
        plan: Plan,
        result: RunResult,
        domain_xml: str,
        changed: ChangedBlockRun | None,
    ) -> Collection | None:
        """Overlays on, the whole files backed up, merged back; returns the collection
        after it (None: unknown).  With ``changed``, a checkpoint first, and the
        record the next changed-block read starts from after."""
        try:
            if changed is not None:
                changed.checkpoint_now([disk.target for disk in plan.disks])
            collection_after = self._back_up_overlaid(plan, result, domain_xml)
        except BaseException:
            if changed is not None:
                changed.failed()
            raise
        if changed is not None:
            last = None if collection_after is None else collection_after.last_backup_time
            new = changed.new_checkpoint
            record = None
            if last is not None and new is not None:
                set_id = format_time(last)
                record = record_of(new, set_id, set_id, planned_disks(plan))
            changed.succeeded(record)
        return collection_after

    def _back_up_overlaid(
        self, plan: Plan, result: RunResult, domain_xml: str
    ) -> Collection | None:
        """Record the plan, overlays on, back up the whole files, merge back."""
        # The checkpoint just made may have met a restarted libvirtd and reconnected.
        self.domain = self.hypervisor.current(self.domain, self.domain.UUIDString())
        record = RunRecord(
            job_uuid=plan.job.uuid,
            domain_uuid=self.domain.UUIDString(),
            domain_name=self.domain.name(),
            started=_now().isoformat(),
            pid=os.getpid(),
            full=plan.full,
            phase="planned",
            disks=plan.disks,
        )
        self.store.save_run(record)  # before the first overlay: recovery's guide
        backup_error: VirtDupError | None = None
        collection_after: Collection | None = None  # None: unknown, apply every rule
        refused = False
        try:
            with interruptible("merging overlays back"):
                collection_after = self._copy(plan, record, result, domain_xml)
        except OverlayRefused:
            refused = True  # nothing was made: nothing may be merged or deleted
            raise
        except VirtDupError as error:
            backup_error = error
        finally:
            if refused:
                self._save(record, clear=True)
            else:
                # Merge even after a failure or an interruption, and let no signal
                # cut the merge short: a VM must never be left on an overlay.
                with signals_deferred("the overlays are merged back"):
                    self._merge_back(plan, record)
        if backup_error is not None:
            raise backup_error
        return collection_after

    def _back_up_changes(
        self, plan: Plan, result: RunResult, domain_xml: str, changed: ChangedBlockRun
    ) -> None:
        """The clusters written since the last backup, as a set of the job's changes
        collection (docs/changed-blocks.md): no overlay, no run record.  Raises
        :class:`ChangesUnavailable` before anything is made when libvirt cannot
        read them (the whole-file path answers that)."""
        record = changed.record
        assert record is not None
        disks = planned_disks(plan)
        with interruptible("deleting the changed-block files"):
            files = changed.read_changes(disks, CHANGES_TIMEOUT_S)
            try:
                stats = self._store_changes(plan, result, domain_xml, changed, files)
            except BaseException:
                changed.failed()
                raise
        result.read = CHANGES
        result.read_reason = ""
        set_id = None if stats.time is None else format_time(stats.time)
        next_record = None
        if set_id is not None and changed.new_checkpoint is not None:
            next_record = record_of(changed.new_checkpoint, record.base_set, set_id, disks)
        changed.succeeded(next_record)

    def _store_changes(
        self,
        plan: Plan,
        result: RunResult,
        domain_xml: str,
        changed: ChangedBlockRun,
        files: dict[str, Path],
    ) -> BackupStats:
        record = changed.record
        assert record is not None and changed.new_checkpoint is not None
        sizes = {disk.target: disk.chain[0].virtual_size for disk in plan.disks}
        tops = {disk.target: disk.original_top for disk in plan.disks}
        stored = {target: os.path.realpath(path) for target, path in files.items()}
        digests = sha256_files(stored.values())
        changes = ChangesManifest(
            base_set=record.base_set,
            previous_set=record.previous_set,
            since_checkpoint=record.checkpoint,
            checkpoint=changed.new_checkpoint,
            disks=tuple(
                ChangedDisk(target, tops[target], path, digests[path], sizes[target])
                for target, path in stored.items()
            ),
        )
        metadata = Path(os.path.realpath(self.store.metadata_dir(plan.job.uuid)))
        write_changes_metadata(metadata, plan, domain_xml, changes)
        expected = {path: os.stat(path).st_size for path in stored.values()}
        expected |= {os.fspath(path): path.stat().st_size for path in metadata.iterdir()}
        stall = plan.options.stall_timeout
        stats = self.duplicity.backup(
            changes_target(plan.target),
            [*stored.values(), os.fspath(metadata)],
            full=True,
            stall_seconds=interval_length(stall).total_seconds() if stall else None,
        )
        check_complete(stats, expected)
        if stats.time is not None:
            keep_own_metadata(self.config, plan.job.uuid, format_time(stats.time), metadata)
        result.bytes_read = stats.bytes_read
        result.bytes_uploaded = stats.bytes_uploaded
        result.bytes_hashed = sum(expected[path] for path in stored.values())
        return stats

    def _changes_retention(
        self, target: Target, retention: JobOptions, main: Collection | None
    ) -> None:
        """Delete the changed-block sets whose base chain the main collection's
        retention removed, or which belong to chains that keep no incrementals.
        ``main``: the main collection as it is now (None: read it again)."""
        keep = retention.incremental_retention
        if main is not None and not (keep and len(main.chains) > keep):
            return  # no chain went, and every chain keeps its incrementals
        changes = changes_target(target)
        try:
            if main is None:
                main = self.duplicity.collection_status(target)
            deleted = prune_changes(changes, main, keep)
        except VirtDupError as error:
            log.warning("job %s: changed-block sets not pruned: %s", target.name, error)
            return
        if deleted:
            log.info(
                "job %s: deleted %d changed-block set(s) of pruned chains", target.name, deleted
            )

    def _copy_to(self, plan: Plan, mirror: Destination, result: RunResult) -> str | None:
        """Copy the first destination's new sets to ``mirror``, then apply its
        retention; returns a line saying why it failed (None: it did not)."""
        shown = masked_url(mirror.url)
        try:
            copied = copy_collection(
                plan.target, mirror.target, self.config.cache_directory / mirror.target.name
            )
            self.duplicity.apply_retention(
                mirror.target, mirror.retention, collection=copied.collection
            )
            if plan.options.changed_blocks == "auto":
                # Its changed-block sets too, after the sets they apply to.
                mirror_changes = changes_target(mirror.target)
                copy_collection(
                    changes_target(plan.target),
                    mirror_changes,
                    self.config.cache_directory / mirror_changes.name,
                )
                kept = collection_of(list(listing(mirror.target)))  # after its retention
                prune_changes(mirror_changes, kept, mirror.retention.incremental_retention)
        except VirtDupError as error:
            result.destinations[shown] = {"result": "failed", "message": str(error)}
            return f"{shown} ({error})"
        message = f"copied {copied.sets} backup set(s), {human_size(copied.bytes)}"
        if copied.skipped:
            message += (
                f"; {len(copied.skipped)} older set(s) could not be copied: the sets they "
                "continue are gone from the first destination"
            )
            log.warning("job %s: destination %s: %s", plan.job.uuid, shown, message)
        result.destinations[shown] = {"result": "success", "message": message}
        return None

    def _copy(
        self, plan: Plan, record: RunRecord, result: RunResult, domain_xml: str
    ) -> Collection | None:
        """Overlays on, then the backup; returns the collection after it (None: unknown)."""
        # create_overlays logs a warning when the backup is only crash-consistent
        create_overlays(
            self.hypervisor,
            self.domain,
            {disk.target: disk.overlay for disk in plan.disks},
            plan.options.quiesce or "auto",
        )
        record.phase = "backup"
        self.store.save_run(record)
        # The files themselves, never a symbolic link to them: duplicity backs up
        # a link as a link.
        metadata = Path(os.path.realpath(self.store.metadata_dir(plan.job.uuid)))
        checksums = ChecksumCache(self.store.directory / "checksums" / f"{plan.job.uuid}.json")
        write_metadata(metadata, plan, domain_xml, checksums.digests)
        checksums.save()
        result.bytes_hashed = sum(os.stat(path).st_size for path in checksums.hashed)
        files = {f.file: os.stat(f.file).st_size for disk in plan.disks for f in disk.selected}
        files |= {os.fspath(path): path.stat().st_size for path in metadata.iterdir()}
        includes = [*dict.fromkeys(f.file for disk in plan.disks for f in disk.selected)]
        stall = plan.options.stall_timeout
        progress = None
        if self.progress is not None:
            on_progress, total = self.progress, sum(files.values())

            def progress(read: BackupProgress) -> None:
                on_progress(dataclasses.replace(read, total_bytes=total))

        stats = self.duplicity.backup(
            plan.target,
            [*includes, os.fspath(metadata)],
            full=plan.full,
            progress=progress,
            stall_seconds=interval_length(stall).total_seconds() if stall else None,
        )
        check_complete(stats, files)
        result.bytes_read = stats.bytes_read
        result.bytes_uploaded = stats.bytes_uploaded
        if stats.time is None:
            return None
        keep_own_metadata(self.config, plan.job.uuid, format_time(stats.time), metadata)
        return plan.collection.with_backup(stats.kind, stats.time)

    def _merge_back(self, plan: Plan, record: RunRecord) -> None:
        """Every overlay merged back, then the record cleared; raises when one is not
        (the record then stays: the next run or the boot unit finishes the merge)."""
        record.phase = "merge"
        self._save(record)
        merge_errors = []
        for disk in plan.disks:
            try:
                self._merge_disk(disk, record)
            except VirtDupError as error:
                merge_errors.append(f"disk {disk.target}: {error}")
        if merge_errors:
            raise VirtDupError(
                "overlays not merged back, recovery will retry: " + "; ".join(merge_errors)
            )
        self._save(record, clear=True)
        self._warn_of_a_definition_written_again(record)

    def _warn_of_a_definition_written_again(self, record: RunRecord) -> None:
        """Say so when libvirt keeps a definition file of a domain that is transient
        after the merge (undefined while the run read it): libvirt 9.0 writes the
        file again when it pivots the domain back to its top, and at its next
        start libvirtd defines the domain anew from it (virt-dup-generator makes
        its timers from it meanwhile).  virt-dup never touches libvirt's files."""
        try:
            transient = not self.domain.isPersistent()
        except libvirt.libvirtError:
            return  # gone, or libvirtd away: nothing to say about its definition
        try:
            path = self.config.libvirt_config_dir / f"{record.domain_name}.xml"
            written = transient and record.domain_uuid in path.read_text(errors="replace")
        except (OSError, RuntimeError):  # RuntimeError: a session URI and no home
            return
        if written:
            log.warning(
                "domain %s was undefined during the backup, but libvirt wrote its definition "
                "%s again when the overlay was merged: libvirtd defines the domain again from "
                "it when it next starts; delete that file to keep the domain undefined",
                record.domain_name,
                path,
            )

    def _merge_disk(self, disk: DiskPlan, record: RunRecord) -> None:
        """Merge one disk back; a libvirtd restarted meanwhile (an upgrade, an admin)
        is reconnected to, for a bounded time, and the merge tried again."""

        def committed() -> None:
            record.committed.append(disk.target)
            self._save(record)

        for attempt in range(_MERGE_ATTEMPTS):
            try:
                merge_overlay(
                    self.hypervisor,
                    self.domain,
                    disk.target,
                    disk.overlay,
                    disk.original_top,
                    MERGE_TIMEOUT_SECONDS,
                    committed=disk.target in record.committed,
                    on_committed=committed,
                )
                return
            except LibvirtError:
                if self.hypervisor.alive() or attempt + 1 == _MERGE_ATTEMPTS:
                    raise
            log.warning("libvirt went away during the merge of disk %s; reconnecting", disk.target)
            self.hypervisor.reconnect()
            self.domain = self.hypervisor.domain(record.domain_uuid)

    def _save(self, record: RunRecord, *, clear: bool = False) -> None:
        """Write (or ``clear``) the run record where nothing may depend on it: the
        merge goes on when the state directory is full or broken."""
        try:
            if clear:
                self.store.clear_run(record.domain_uuid)
            else:
                self.store.save_run(record)
        except OSError as error:
            log.warning(
                "cannot write the run record of domain %s (%s): %s; going on",
                record.domain_name,
                error.filename,
                error.strerror,
            )
