"""``virt-dup backups``: the restorable points of the jobs a command means."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virt_dup.config.load import Config
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.restore.sources import (
    BackupEntry,
    BackupMetadata,
    BackupSource,
    fetch_metadata,
    find_sources,
    list_backups,
)


# -- backups ----------------------------------------------------------------------------
@dataclass
class JobListing:
    source: BackupSource
    metadata: BackupMetadata | None
    backups: list[BackupEntry] | None  # None: only a summary was asked for

    def as_json(self) -> dict[str, Any]:
        manifest = self.metadata.manifest if self.metadata else None
        record: dict[str, Any] = {
            "job": self.source.job_uuid,
            "domain": None
            if manifest is None
            else {"name": manifest.domain_name, "uuid": manifest.domain_uuid},
            "backend": self.source.backend_url,
            "url": self.source.display_url,
        }
        if self.backups is not None:
            record["backups"] = [entry.as_json() for entry in self.backups]
        return record


def list_jobs_backups(
    config: Config,
    hypervisor: Callable[[], Hypervisor],
    domain_or_job: str | None,
    backend_url: str | None,
    report: Callable[[str], None] | None = None,
) -> list[JobListing]:
    """The backups of the jobs meant (see :func:`virt_dup.restore.sources.find_sources`)."""
    found = find_sources(config, hypervisor, domain_or_job, backend_url=backend_url, report=report)
    listings = []
    for source, metadata in found:
        backups = list_backups(config, source, report)
        if metadata is None and backups and backups[-1].disks is not None:
            metadata = fetch_metadata(config, source, backups[-1].id, report=report)
        listings.append(JobListing(source, metadata, backups))
    return listings
