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
7. clear the record, apply retention, record the result.

A SIGTERM (systemd stopping the unit, its start timeout) becomes an
exception so step 6 still runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import libvirt

from virt_dup import __version__, duplicity, journal
from virt_dup.actions.jobs import select_disks
from virt_dup.chain import ChainFile, read_chain, select_chain
from virt_dup.config import Config
from virt_dup.errors import ConfigError, VirtDupError
from virt_dup.hypervisor import Hypervisor
from virt_dup.jobs import Job, render_instance
from virt_dup.options import JobOptions
from virt_dup.overlay import create_overlays, is_virt_dup_overlay, merge_overlay, overlay_path
from virt_dup.recovery import MERGE_TIMEOUT_SECONDS, recover_domain
from virt_dup.state import DiskPlan, RunRecord, StateStore, write_atomically

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DOMAIN_XML = "domain.xml"
CHECKSUMS = "SHA256SUMS"


class Interrupted(VirtDupError):
    """SIGTERM/SIGINT during a run: overlays are still merged before exiting."""


class RunFailed(VirtDupError):
    """A run failed; its result is recorded (status file, journal) already."""

    def __init__(self, result: RunResult, cause: VirtDupError) -> None:
        super().__init__(f"job {result.job_uuid} of domain {result.domain}: {cause}")
        self.result = result
        self.exit_code = cause.exit_code


@dataclass(frozen=True)
class DiskSelection:
    """One disk's part of the plan: its chain when the run began and what depth keeps."""

    target: str
    original_top: str
    chain: tuple[ChainFile, ...]  # top first
    selected: tuple[ChainFile, ...]
    overlay: str


@dataclass(frozen=True)
class Plan:
    """Everything decided before the domain is touched."""

    job: Job
    options: JobOptions
    domain_running: bool
    disks: tuple[DiskSelection, ...]
    backend_url: str
    full: bool
    target: duplicity.Target
    #: The job's collection before this run (after any partial set was discarded).
    collection: duplicity.Collection = field(default_factory=lambda: duplicity.Collection(()))
    #: An interrupted backup left a partial set (discarded unless this is a dry run).
    interrupted_backup: bool = False

    def describe(self) -> list[str]:
        lines = [
            f"job {self.job.uuid} of domain {self.job.domain_name} "
            f"({'running' if self.domain_running else 'shut off'})",
            f"backend: {self.backend_url} ({'full' if self.full else 'incremental'} backup)",
            f"depth: {self.options.depth}",
        ]
        if self.interrupted_backup:
            lines.append("an interrupted backup left a partial backup set: it will be deleted")
        for disk in self.disks:
            chain = " <- ".join(os.path.basename(f.path) for f in reversed(disk.chain))
            lines.append(f"disk {disk.target}: chain {chain}")
            lines.extend(f"  backs up {f.path}" for f in disk.selected)
        return lines


@dataclass
class RunResult:
    """What a run did; becomes the journal record and the status file."""

    job_uuid: str
    domain: str
    result: str  # success, failed, skipped
    full: bool | None = None
    disks: list[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_uploaded: int = 0
    duration_seconds: float = 0.0
    message: str = ""
    finished: str = ""
    backup_time: str | None = None
    #: systemd's $INVOCATION_ID when a unit runs us: ties the result to the journal.
    invocation_id: str | None = field(default_factory=lambda: os.environ.get("INVOCATION_ID"))

    def summary(self) -> str:
        """One line for the terminal and the journal's MESSAGE=."""
        kind = {True: "full", False: "incremental", None: ""}[self.full]
        if self.result == "success":
            return (
                f"job {self.job_uuid} of domain {self.domain}: {kind} backup of "
                f"{', '.join(self.disks)} done in {self.duration_seconds:.1f} s, "
                f"{self.bytes_read} bytes read, {self.bytes_uploaded} bytes uploaded"
            )
        return f"job {self.job_uuid} of domain {self.domain}: {self.result}: {self.message}"


def _now() -> datetime:
    return datetime.now(UTC)


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM/SIGINT into :class:`Interrupted` for the duration."""

    def interrupt(number: int, _frame: FrameType | None) -> None:
        raise Interrupted(f"stopped by {signal.Signals(number).name}; merging overlays back")

    previous = {
        number: signal.signal(number, interrupt) for number in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def job_backend_url(backend_url: str, job_uuid: str) -> str:
    """Each job is its own duplicity collection: a directory named by the job uuid.

    Jobs sharing a backend never mix their volumes, and ``virt-dup backups
    --backend URL`` finds every job on a backend by listing it.
    """
    return backend_url.rstrip("/") + "/" + job_uuid


def duplicity_target(
    config: Config, job: Job, options: JobOptions, backend_url: str
) -> duplicity.Target:
    """The duplicity side of a job: URL, cache, keys (ConfigError when keys are missing)."""
    keys: tuple[str, ...] = ()
    if options.encryption == "gpg":
        keys = options.encryption_keys or config.encryption.keys
        if not keys:
            raise ConfigError(
                f"job {job.uuid}: backups are encrypted (encryption: gpg) but no key is "
                f"configured: set encryption.keys in {config.path} or encryption=none on the job"
            )
    return duplicity.Target(
        url=job_backend_url(backend_url, job.uuid),
        # duplicity keeps its cache in <archive_dir>/<name>
        archive_dir=config.cache_directory,
        name=job.uuid,
        # Volumes are staged in the job's own cache, not /tmp: what a killed
        # duplicity leaves there is found and removed by the next run.
        tempdir=config.cache_directory / job.uuid,
        encryption=options.encryption or "gpg",
        encrypt_keys=keys,
        sign_key=config.encryption.sign_key,
        gnupg_home=config.encryption.gnupg_home,
        passphrase=read_passphrase(config),
    )


def read_passphrase(config: Config) -> str | None:
    """The GPG passphrase from its root-only file, or None when none is configured."""
    path = config.encryption.passphrase_file
    if path is None:
        return None
    try:
        status = path.stat()
        if status.st_mode & 0o077:
            raise ConfigError(
                f"{path}: the passphrase file is readable by others (mode "
                f"{status.st_mode & 0o777:o}); chmod 600 it"
            )
        return path.read_text().rstrip("\n")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the passphrase file: {error.strerror}") from None


def make_plan(
    config: Config,
    hypervisor: Hypervisor,
    domain: libvirt.virDomain,
    job: Job,
    force_full: bool,
    *,
    dry_run: bool = False,
) -> Plan:
    """Decide the run without touching the domain; raises on every problem found.

    Unless ``dry_run``, what an interrupted backup of the job left in its
    cache and on its backend is deleted first (it must never be resumed:
    :func:`virt_dup.duplicity.discard_interrupted_backup`), so that full or
    incremental is decided on the collection as the backup will find it.
    """
    options = job.options.over(config.defaults)
    running = bool(domain.isActive())
    disks = select_disks(hypervisor.disks(domain, inactive=not running), job.disks, domain.name())
    selections = []
    for disk in disks:
        assert disk.source is not None  # select_disks returns qcow2 file disks only
        if is_virt_dup_overlay(disk.source):
            raise VirtDupError(
                f"domain {domain.name()}: disk {disk.target} still runs on a virt-dup overlay "
                f"({disk.source}) after recovery"
            )
        chain = read_chain(disk.source)
        selected = select_chain(chain, options.depth or 0, disk.target)
        selections.append(
            DiskSelection(
                target=disk.target,
                original_top=chain[0].path,
                chain=chain,
                selected=selected,
                overlay=overlay_path(chain[0].path, job.uuid),
            )
        )
    backends = options.backends or ()
    if not backends:
        raise ConfigError(
            f"job {job.uuid}: no backend: set backends on the job or defaults.backends in "
            f"{config.path}"
        )
    backend_url = config.backend_url(backends[0])
    target = duplicity_target(config, job, options, backend_url)
    interrupted = duplicity.partial_files(target)
    if dry_run:
        collection = duplicity.collection_status(target)
    else:
        collection = duplicity.discard_interrupted_backup(target)
    full = force_full or duplicity.full_is_due_in(collection, options.full_every)
    return Plan(
        job,
        options,
        running,
        tuple(selections),
        backend_url,
        full,
        target,
        collection=collection,
        interrupted_backup=bool(interrupted or collection.incomplete_sets),
    )


def wait_past_last_backup(
    collection: duplicity.Collection,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Wait (at most a second) until the clock has left the second of the last backup.

    duplicity names a backup set by the second it starts in: a set started
    in the same second as the last one would share its time (an incremental
    that ends when the next chain begins confuses retention; two fulls share
    their file names).  Returns the seconds waited.
    """
    last = collection.last_backup_time
    if last is None:
        return 0.0
    wait = min(last.timestamp() + 1.0 - clock(), 1.0)
    if wait <= 0:
        return 0.0
    sleep(wait)
    return wait


def sha256_file(path: str, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_metadata(directory: Path, plan: Plan, domain_xml: str) -> None:
    """The metadata folder backed up with the disks: XML, job, chain layout, checksums."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    checksums: dict[str, str] = {}
    disks = []
    for disk in plan.disks:
        selected = {f.path for f in disk.selected}
        files = []
        for chain_file in disk.chain:
            entry: dict[str, Any] = asdict(chain_file)
            entry["selected"] = chain_file.path in selected
            if entry["selected"]:
                checksums[chain_file.path] = sha256_file(chain_file.path)
                entry["sha256"] = checksums[chain_file.path]
            files.append(entry)
        disks.append({"target": disk.target, "top": disk.original_top, "files": files})
    manifest = {
        "format": 1,
        "virt_dup_version": __version__,
        "host": socket.gethostname(),
        "created": _now().isoformat(),
        "full": plan.full,
        "domain": {"name": plan.job.domain_name, "uuid": plan.job.domain_uuid},
        "job": {
            "uuid": plan.job.uuid,
            "xml": render_instance([plan.job]),
            "options": {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in plan.options.set_values().items()
            },
        },
        "disks": disks,
    }
    write_atomically(directory / MANIFEST, json.dumps(manifest, indent=2))
    write_atomically(directory / DOMAIN_XML, domain_xml)
    write_atomically(
        directory / CHECKSUMS, "".join(f"{digest}  {path}\n" for path, digest in checksums.items())
    )


def run_job(
    config: Config,
    hypervisor: Hypervisor,
    job_uuid: str,
    *,
    force_full: bool = False,
    dry_run: bool = False,
    report: Callable[[str], None] = print,
    progress: Callable[[duplicity.BackupProgress], None] | None = None,
    lock_wait_seconds: float = 600.0,
) -> RunResult:
    """Run one backup of a job; returns the result (also when it failed).

    Expected failures before the domain is touched raise; failures after it
    return a failed :class:`RunResult` once every overlay is merged back.
    """
    started = time.monotonic()
    domain, job = hypervisor.find_job(job_uuid)
    store = StateStore(config.state_directory)
    result = RunResult(job_uuid=job.uuid, domain=domain.name(), result="failed")
    try:
        with store.domain_lock(domain.UUIDString(), domain.name(), lock_wait_seconds):
            for line in recover_domain(hypervisor, store, domain):
                report(f"recovered: {line}")
            options = job.options.over(config.defaults)
            if options.disable_if_powered_off and not domain.isActive():
                result.result = "skipped"
                result.message = f"domain {domain.name()} is shut off (disable_if_powered_off)"
                return _finish(store, result, started)
            plan = make_plan(config, hypervisor, domain, job, force_full, dry_run=dry_run)
            if dry_run:
                for line in plan.describe():
                    report(line)
                result.result = "dry-run"
                return result
            result.full = plan.full
            result.disks = [disk.target for disk in plan.disks]
            wait_past_last_backup(plan.collection)
            with _signals_raise():
                _back_up(config, hypervisor, store, domain, plan, result, progress)
    except VirtDupError as error:
        result.result = "failed"
        result.message = str(error)
        _finish(store, result, started)
        raise RunFailed(result, error) from None
    return _finish(store, result, started)


def _back_up(
    config: Config,
    hypervisor: Hypervisor,
    store: StateStore,
    domain: libvirt.virDomain,
    plan: Plan,
    result: RunResult,
    progress: Callable[[duplicity.BackupProgress], None] | None,
) -> None:
    domain_xml = hypervisor.domain_xml(domain, inactive=True)
    record = RunRecord(
        job_uuid=plan.job.uuid,
        domain_uuid=domain.UUIDString(),
        domain_name=domain.name(),
        started=_now().isoformat(),
        pid=os.getpid(),
        full=plan.full,
        phase="planned",
        disks=[
            DiskPlan(
                target=disk.target,
                original_top=disk.original_top,
                overlay=disk.overlay,
                chain=[f.path for f in disk.chain],
                selected=[f.path for f in disk.selected],
            )
            for disk in plan.disks
        ],
    )
    store.save_run(record)
    backup_error: VirtDupError | None = None
    collection_after: duplicity.Collection | None = None  # None: unknown, apply every rule
    try:
        # create_overlays logs a warning when the backup is only crash-consistent
        create_overlays(
            hypervisor,
            domain,
            {disk.target: disk.overlay for disk in plan.disks},
            plan.options.quiesce or "auto",
        )
        record.phase = "backup"
        store.save_run(record)
        metadata = store.metadata_dir(plan.job.uuid)
        write_metadata(metadata, plan, domain_xml)
        includes = [f.path for disk in plan.disks for f in disk.selected] + [str(metadata)]
        stats = duplicity.backup(
            plan.target,
            full=plan.full,
            include_paths=includes,
            full_if_older_than=plan.options.full_every,
            progress=progress,
        )
        result.bytes_read = stats.bytes_read
        result.bytes_uploaded = stats.bytes_uploaded
        if stats.time is not None and stats.kind in ("full", "incremental"):
            collection_after = plan.collection.with_backup(stats.kind, stats.time)
    except VirtDupError as error:
        backup_error = error
    finally:
        record.phase = "merge"
        store.save_run(record)
        # Merge even after a failure or an interruption: a VM must never be
        # left running on a temporary overlay.
        merge_errors = []
        for disk in plan.disks:
            try:
                merge_overlay(
                    hypervisor,
                    domain,
                    disk.target,
                    disk.overlay,
                    disk.original_top,
                    MERGE_TIMEOUT_SECONDS,
                )
            except VirtDupError as error:
                merge_errors.append(f"disk {disk.target}: {error}")
        if merge_errors:
            # The record stays: the next run or the boot unit finishes the merge.
            raise VirtDupError(
                "overlays not merged back, recovery will retry: " + "; ".join(merge_errors)
            )
        store.clear_run(domain.UUIDString())
    if backup_error is not None:
        raise backup_error
    duplicity.apply_retention(plan.target, plan.options, collection=collection_after)
    result.result = "success"
    result.message = f"backed up {', '.join(result.disks)} to {plan.backend_url}"


def _finish(store: StateStore, result: RunResult, started: float) -> RunResult:
    """Record the result: the job's status file and one journal record."""
    result.duration_seconds = round(time.monotonic() - started, 3)
    result.finished = _now().isoformat()
    try:
        store.record_result(result.job_uuid, asdict(result))
    finally:
        journal.record(
            result.summary(),
            priority=journal.PRIORITY_ERR if result.result == "failed" else journal.PRIORITY_INFO,
            JOB_UUID=result.job_uuid,
            DOMAIN=result.domain,
            RESULT=result.result,
            BACKUP_TYPE={True: "full", False: "incremental", None: None}[result.full],
            DISKS=",".join(result.disks) or None,
            BYTES_READ=result.bytes_read,
            BYTES_UPLOADED=result.bytes_uploaded,
            DURATION_SEC=result.duration_seconds,
        )
    return result
