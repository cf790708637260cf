"""``virt-dup status [DOMAIN|JOB_UUID]``: every job, its next run, its last
results and whether its backups are fresh; ``--check`` for Nagios/Icinga.

By default only what is local and quick is read: the jobs in the domain XML,
the status files in the state directory and the timers' next elapse from
systemd (none when no manager answers).  ``--backend`` also lists each
job's backups on its backend, which is slow (a network round trip or more
per job).

Freshness (ok / warn / crit) is decided in :mod:`virt_dup.backup.freshness`;
the metrics textfile (:mod:`virt_dup.backup.metrics`) is written from the
same rows after each run, verification and ``status --check``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from virt_dup.backup import freshness as fresh
from virt_dup.backup.metrics import JobMetrics, write_metrics
from virt_dup.backup.state import StateStore
from virt_dup.config.cron import describe
from virt_dup.config.load import Config
from virt_dup.errors import ConfigError, VirtDupError
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.libvirt.metadata import Job, is_valid_uuid
from virt_dup.systemd.generator import TIMER_KINDS
from virt_dup.systemd.manager import ServiceManager, SystemdError

log = logging.getLogger(__name__)

#: Nagios plugin exit codes (ok, warn, crit are freshness.MARKS' indexes).
CHECK_OK, CHECK_WARNING, CHECK_CRITICAL, CHECK_UNKNOWN = 0, 1, 2, 3
_CHECK_WORDS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")


@dataclass(frozen=True)
class BackendSummary:
    """What a job's backend holds (``--backend``)."""

    backups: int
    fulls: int
    size: int | None  # None: a volume size unknown
    latest: datetime | None


@dataclass(frozen=True)
class JobStatus:
    """One row of ``virt-dup status``."""

    domain: str
    job: str
    disks: tuple[str, ...]  # empty: every qcow2 disk
    schedule: str | None
    full_schedule: str | None
    phrase: str  # the schedules in words
    encrypted: bool
    next_run: datetime | None
    last_run: dict[str, Any] | None
    last_success: dict[str, Any] | None
    last_full: dict[str, Any] | None
    thresholds: fresh.Thresholds
    freshness: fresh.Freshness
    now: datetime
    backend: BackendSummary | None = None
    #: Each destination of a job with several (the first one too), by masked URL.
    destinations: tuple[DestinationStatus, ...] = ()

    @property
    def last_success_time(self) -> datetime | None:
        return _time(self.last_success, "finished")

    @property
    def age(self) -> timedelta | None:
        finished = self.last_success_time
        return None if finished is None else self.now - finished

    def problem_line(self) -> str:
        """``CRIT: job J of domain D: last success 4d ago (crit after 3d)``."""
        return (
            f"{self.freshness.mark.upper()}: job {self.job} of domain {self.domain}: "
            f"{self.freshness.reason}"
        )

    def metrics(self) -> JobMetrics:
        last = self.last_run or {}
        return JobMetrics(
            job=self.job,
            domain=self.domain,
            last_success=self.last_success_time,
            last_result=last.get("result"),
            last_action=last.get("action"),
            duration_seconds=_number(last.get("duration_seconds")),
            bytes_read=_number((self.last_success or {}).get("bytes_read")),
            bytes_uploaded=_number((self.last_success or {}).get("bytes_uploaded")),
            backups=None if self.backend is None else self.backend.backups,
            backend_size=None if self.backend is None else self.backend.size,
            freshness=self.freshness.mark,
        )

    def as_json(self) -> dict[str, Any]:
        age = self.age
        return {
            "domain": self.domain,
            "job": self.job,
            "disks": list(self.disks),
            "schedule": self.schedule,
            "full_schedule": self.full_schedule,
            "schedule_description": self.phrase,
            "encryption": self.encrypted,
            "next_run": None if self.next_run is None else self.next_run.isoformat(),
            "last_run": self.last_run,
            "last_success": self.last_success,
            "last_success_age_seconds": None if age is None else int(age.total_seconds()),
            "last_full": self.last_full,
            "freshness": {
                "state": self.freshness.mark,
                "reason": self.freshness.reason,
                "warn_after_seconds": _seconds(self.thresholds.warn),
                "crit_after_seconds": _seconds(self.thresholds.crit),
            },
            "destinations": {
                destination.backend: destination.as_json() for destination in self.destinations
            },
            "backend": None
            if self.backend is None
            else {
                "backups": self.backend.backups,
                "fulls": self.backend.fulls,
                "size": self.backend.size,
                "latest": None if self.backend.latest is None else self.backend.latest.isoformat(),
            },
        }


@dataclass(frozen=True)
class DestinationStatus:
    """How fresh one destination of a job is: its last run, its last success."""

    backend: str
    last_result: str | None
    last_success: datetime | None
    freshness: fresh.Freshness

    def as_json(self) -> dict[str, Any]:
        return {
            "last_result": self.last_result,
            "last_success": None if self.last_success is None else self.last_success.isoformat(),
            "freshness": {"state": self.freshness.mark, "reason": self.freshness.reason},
        }


def destination_statuses(
    recorded: object, limits: fresh.Thresholds, now: datetime
) -> tuple[DestinationStatus, ...]:
    """The destinations of a status file's ``destinations`` (a run records each)."""
    if not isinstance(recorded, dict):
        return ()
    found = []
    for backend, entry in sorted(recorded.items()):
        if not isinstance(entry, dict):
            continue
        last_run: dict[str, Any] = entry.get("last_run") or {}
        result = last_run.get("result") if isinstance(last_run, dict) else None
        last_result = result if isinstance(result, str) else None
        success = entry.get("last_success") if isinstance(entry.get("last_success"), dict) else None
        last_success = _time(success, "finished")
        found.append(
            DestinationStatus(
                str(backend),
                last_result,
                last_success,
                fresh.freshness(limits, last_success, last_result, now),
            )
        )
    return tuple(found)


@dataclass(frozen=True)
class StatusReport:
    """The rows, and what could not be read (each an UNKNOWN under ``--check``)."""

    jobs: tuple[JobStatus, ...]
    unknown: tuple[str, ...] = ()

    def check(self) -> tuple[int, list[str]]:
        """(Nagios exit code, one line per problem; a summary line when none)."""
        problems = [row for row in self.jobs if row.freshness.problem]
        lines = [row.problem_line() for row in problems]
        for row in self.jobs:
            lines += [
                f"{destination.freshness.mark.upper()}: job {row.job} of domain {row.domain}: "
                f"destination {destination.backend}: {destination.freshness.reason}"
                for destination in row.destinations
                if destination.freshness.problem and len(row.destinations) > 1
            ]
        lines += [f"UNKNOWN: {line}" for line in self.unknown]
        code = max((fresh.MARKS.index(row.freshness.mark) for row in problems), default=CHECK_OK)
        if self.unknown:
            code = CHECK_UNKNOWN
        if not lines:
            checked = sum(row.thresholds.checked for row in self.jobs)
            lines = [f"OK: {checked} job(s) fresh, {len(self.jobs)} job(s) in all"]
        return code, lines

    def as_json(self) -> dict[str, Any]:
        code, lines = self.check()
        return {
            "jobs": [row.as_json() for row in self.jobs],
            "unknown": list(self.unknown),
            "check": {"state": _CHECK_WORDS[code], "exit_code": code, "lines": lines},
        }


def _time(record: dict[str, Any] | None, key: str) -> datetime | None:
    if not record or not isinstance(record.get(key), str):
        return None
    try:
        when = datetime.fromisoformat(record[key])
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _seconds(length: timedelta | None) -> int | None:
    return None if length is None else int(length.total_seconds())


def selected_jobs(hypervisor: Hypervisor, domain_or_job: str | None) -> tuple[list[Job], list[str]]:
    """(the jobs meant, domains whose metadata cannot be read).

    ``domain_or_job``: a job uuid, a domain name or uuid, or None for every job.
    Raises :class:`~virt_dup.errors.NotFoundError` for neither.
    """
    if domain_or_job is None:
        jobs: list[Job] = []
        unreadable: list[str] = []
        for _domain, found in hypervisor.all_jobs():
            if isinstance(found, ConfigError):
                unreadable.append(str(found))
            else:
                jobs.extend(found)
        return jobs, unreadable
    if is_valid_uuid(domain_or_job.lower()):
        for _domain, found in hypervisor.all_jobs():
            if not isinstance(found, ConfigError):
                matching = [job for job in found if job.uuid == domain_or_job.lower()]
                if matching:
                    return matching, []
    return hypervisor.jobs(hypervisor.domain(domain_or_job)), []


def job_status(
    config: Config,
    store: StateStore,
    job: Job,
    now: datetime,
    next_run: Callable[[Job], datetime | None] = lambda _job: None,
    backend: Callable[[Job], BackendSummary | None] = lambda _job: None,
) -> JobStatus:
    """The row of one job (``now``: aware); schedules were validated when the job was read."""
    options = job.options.over(config.defaults)
    status = store.load_status(job.uuid)
    last_run, last_success = status.get("last_run"), status.get("last_success")
    limits = fresh.thresholds(options, now.astimezone().date())
    last_result = last_run.get("result") if isinstance(last_run, dict) else None
    mark = fresh.freshness(limits, _time(last_success, "finished"), last_result, now)
    phrases = [describe(options.schedule)] if options.schedule else []
    if options.full_schedule:
        phrases.append(f"full {describe(options.full_schedule)}")
    return JobStatus(
        domain=job.domain_name,
        job=job.uuid,
        disks=(*job.disks.devs, *job.disks.paths),
        schedule=options.schedule,
        full_schedule=options.full_schedule,
        phrase="; ".join(phrases) or "no schedule (runs by hand)",
        encrypted=options.encryption != "none",
        next_run=next_run(job),
        last_run=last_run if isinstance(last_run, dict) else None,
        last_success=last_success if isinstance(last_success, dict) else None,
        last_full=status.get("last_full") if isinstance(status.get("last_full"), dict) else None,
        thresholds=limits,
        freshness=mark,
        now=now,
        backend=backend(job),
        destinations=destination_statuses(status.get("destinations"), limits, now),
    )


def next_run_from(manager: ServiceManager | None) -> Callable[[Job], datetime | None]:
    """When the job's backup timers (incremental, full) fire next; None without a
    manager or a timer."""

    def next_run(job: Job) -> datetime | None:
        if manager is None:
            return None
        elapses = []
        for kind in TIMER_KINDS[:2]:  # the backups; verification makes none
            try:
                elapse = manager.next_elapse(f"{kind.prefix}@{job.uuid}.timer")
            except SystemdError as error:
                log.debug("%s", error)
                continue
            if elapse is not None:
                elapses.append(elapse)
        return min(elapses, default=None)

    return next_run


def backend_summary_from(
    config: Config, hypervisor: Hypervisor, unknown: list[str]
) -> Callable[[Job], BackendSummary | None]:
    """What each job's backend holds; a backend that cannot be read is one
    ``unknown`` line, and no summary."""
    from virt_dup.actions.backups import list_jobs_backups

    def summary(job: Job) -> BackendSummary | None:
        try:
            listings = list_jobs_backups(config, lambda: hypervisor, job.uuid, None)
        except VirtDupError as error:
            unknown.append(f"job {job.uuid} of domain {job.domain_name}: backend: {error}")
            return None
        entries = [entry for listing in listings for entry in listing.backups or ()]
        sizes = [entry.size for entry in entries]
        return BackendSummary(
            backups=len(entries),
            fulls=sum(entry.kind == "full" for entry in entries),
            size=None if any(size is None for size in sizes) else sum(s or 0 for s in sizes),
            latest=max((entry.time for entry in entries), default=None),
        )

    return summary


def status(
    config: Config,
    hypervisor: Hypervisor,
    domain_or_job: str | None = None,
    *,
    manager: ServiceManager | None = None,
    backend: bool = False,
    now: datetime | None = None,
) -> StatusReport:
    """The status of the jobs meant (see :func:`selected_jobs`)."""
    now = now or datetime.now(UTC)
    jobs, unknown = selected_jobs(hypervisor, domain_or_job)
    store = StateStore.of(config)
    summaries = backend_summary_from(config, hypervisor, unknown) if backend else None
    rows = [
        job_status(
            config,
            store,
            job,
            now,
            next_run_from(manager),
            summaries or (lambda _job: None),
        )
        for job in jobs
    ]
    rows.sort(key=lambda row: (row.domain, row.job))
    return StatusReport(tuple(rows), tuple(unknown))


def refresh_metrics(config: Config, hypervisor: Hypervisor, rows: Iterable[JobStatus] = ()) -> None:
    """Rewrite the metrics textfile for every job (``rows`` when given, else read
    now, without systemd or the backend).  Never raises: a metrics file that
    cannot be written is a warning, never a failed run."""
    try:
        rows = list(rows) or list(status(config, hypervisor).jobs)
        write_metrics(config.metrics_path, [row.metrics() for row in rows])
    except Exception as error:  # a bug here must not fail the run that called it either
        log.warning("cannot write the metrics file %s: %s", config.metrics_path, error)
