"""The metrics textfile: node_exporter's textfile collector format, per job.

Written with ``prometheus_client`` (a registry of its own, rendered by
``generate_latest``) and replaced atomically, so node_exporter never reads
half a file.  Every sample carries the labels ``job_uuid`` and ``domain``
(not ``job``: Prometheus sets that label itself, to the scrape job).

=====================================================  =======================================
``virt_dup_last_success_timestamp_seconds``            end of the last successful backup
``virt_dup_last_run_success``                          1 when the last run succeeded, else 0
``virt_dup_last_run_duration_seconds``                 how long the last run took
``virt_dup_last_backup_read_bytes``                    bytes the last successful backup read
``virt_dup_last_backup_uploaded_bytes``                bytes it uploaded
``virt_dup_backend_backups``                           backups on the backend (when known)
``virt_dup_backend_size_bytes``                        their size (when known)
``virt_dup_freshness``                                 0 ok, 1 warn, 2 crit, -1 not checked
``virt_dup_freshness_state{state=...}``                1 for the job's state, 0 for the others
=====================================================  =======================================
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from virt_dup.backup.freshness import CRIT, MARKS, OK, UNCHECKED, WARN
from virt_dup.files import write_atomically

LABELS = ("job_uuid", "domain")


@dataclass(frozen=True)
class JobMetrics:
    """What the textfile says about one job (None: unknown, left out)."""

    job: str
    domain: str
    last_success: datetime | None
    last_result: str | None
    last_action: str | None
    duration_seconds: float | None
    bytes_read: float | None
    bytes_uploaded: float | None
    backups: int | None
    backend_size: int | None
    freshness: str


def render_metrics(jobs: Iterable[JobMetrics]) -> str:
    """The textfile for ``jobs``; families without any sample are still declared."""
    registry = CollectorRegistry(auto_describe=True)

    def gauge(name: str, documentation: str, extra: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, documentation, [*LABELS, *extra], registry=registry)

    last_success = gauge(
        "virt_dup_last_success_timestamp_seconds",
        "When the job's last successful backup finished (Unix time).",
    )
    last_ok = gauge(
        "virt_dup_last_run_success",
        "1 when the job's last run succeeded (or was skipped), 0 when it failed.",
    )
    duration = gauge("virt_dup_last_run_duration_seconds", "How long the job's last run took.")
    read = gauge("virt_dup_last_backup_read_bytes", "Bytes the last successful backup read.")
    uploaded = gauge(
        "virt_dup_last_backup_uploaded_bytes", "Bytes the last successful backup uploaded."
    )
    backups = gauge("virt_dup_backend_backups", "Backups of the job on its backend (when known).")
    size = gauge("virt_dup_backend_size_bytes", "Size of the job's backups on its backend.")
    freshness = gauge(
        "virt_dup_freshness",
        "Freshness of the last successful backup: 0 ok, 1 warn, 2 crit, -1 not checked.",
    )
    states = gauge(
        "virt_dup_freshness_state", "1 for the job's freshness state, 0 for the others.", ("state",)
    )
    for job in jobs:
        labels = (job.job, job.domain)
        if job.last_success is not None:
            last_success.labels(*labels).set(job.last_success.timestamp())
        if job.last_result is not None:
            last_ok.labels(*labels).set(0 if job.last_result == "failed" else 1)
        for metric, value in (
            (duration, job.duration_seconds),
            (read, job.bytes_read),
            (uploaded, job.bytes_uploaded),
            (backups, job.backups),
            (size, job.backend_size),
        ):
            if value is not None:
                metric.labels(*labels).set(value)
        freshness.labels(*labels).set(MARKS.index(job.freshness) if job.freshness in MARKS else -1)
        for state in (OK, WARN, CRIT, UNCHECKED):
            name = "unchecked" if state == UNCHECKED else state
            states.labels(*labels, name).set(1 if job.freshness == state else 0)
    return generate_latest(registry).decode()


def write_metrics(path: Path, jobs: Iterable[JobMetrics]) -> None:
    """Replace the textfile at ``path`` (readable by node_exporter: mode 0644).
    Raises OSError."""
    write_atomically(path, render_metrics(jobs), mode=0o644, directory_mode=0o755)
