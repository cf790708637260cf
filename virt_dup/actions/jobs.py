"""add-job, remove-job, remove-all-jobs, list-jobs: jobs in domain XML.

Each action validates everything before it writes anything: a bad value,
an unknown disk or backend leaves the domain XML untouched.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import libvirt

from virt_dup.config import Config
from virt_dup.errors import ConfigError, NotFoundError, UsageError, VirtDupError
from virt_dup.hypervisor import Disk, Hypervisor, real_path
from virt_dup.jobs import DiskSelector, Job, is_valid_uuid
from virt_dup.options import OPTIONS_BY_NAME, JobOptions
from virt_dup.state import StateStore


@dataclass(frozen=True)
class AddJobRequest:
    """What ``add-job`` was asked for, as text from the command line."""

    domain: str
    option_values: Mapping[str, object]  # option name -> str or list[str]
    devs: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    job_uuid: str | None = None


def parse_requested_options(values: Mapping[str, object]) -> JobOptions:
    """Typed options from command-line text; ConfigError names the flag."""
    parsed: dict[str, Any] = {}
    for name, value in values.items():
        option = OPTIONS_BY_NAME[name]
        parsed[name] = option.parse(value, option.command_line_flag)
    return JobOptions(**parsed)


def select_disks(disks: list[Disk], selector: DiskSelector, domain_name: str) -> list[Disk]:
    """The disks a selector names; every name must match a qcow2 file disk.

    Raises :class:`NotFoundError` for a dev or path that is no disk of the
    domain and :class:`ConfigError` for a disk virt-dup cannot back up.
    """
    by_target = {disk.target: disk for disk in disks}
    by_path = {
        real_path(disk.source): disk for disk in disks if disk.source_type == "file" and disk.source
    }
    chosen: list[Disk] = []
    for dev in selector.devs:
        if dev not in by_target:
            targets = ", ".join(by_target) or "none"
            raise NotFoundError(f"domain {domain_name} has no disk {dev} (its disks: {targets})")
        chosen.append(by_target[dev])
    for path in selector.paths:
        disk = by_path.get(real_path(path))
        if disk is None:
            raise NotFoundError(f"{path} is not a disk of domain {domain_name}")
        chosen.append(disk)
    if selector.all_disks:
        chosen = [disk for disk in disks if disk.is_qcow2_file]
        if not chosen:
            raise ConfigError(f"domain {domain_name} has no qcow2 disk to back up")
    for disk in chosen:
        if not disk.is_qcow2_file:
            kind = disk.driver_type or disk.source_type
            raise ConfigError(
                f"disk {disk.target} of domain {domain_name} is not a qcow2 file ({kind}); "
                "virt-dup backs up qcow2 disks"
            )
    return chosen


def add_job(config: Config, hypervisor: Hypervisor, request: AddJobRequest) -> Job:
    """Validate a new job and write it into the domain's XML (live and persistent).

    Returns the job as written.  Raises before writing anything when the
    domain, a disk, a backend or a value is wrong.
    """
    domain = hypervisor.domain(request.domain)
    if not domain.isPersistent():
        raise UsageError(
            f"domain {domain.name()} is transient: jobs must live in a persistent "
            "definition (virsh define)"
        )
    options = parse_requested_options(request.option_values)
    for backend in options.backends or ():
        config.backend_url(backend)
    selector = DiskSelector(tuple(request.devs), tuple(request.paths))
    # The persistent definition is what later runs start from.
    select_disks(hypervisor.disks(domain, inactive=True), selector, domain.name())
    existing = hypervisor.jobs(domain)  # refuses to overwrite malformed metadata
    if request.job_uuid is not None:
        if not is_valid_uuid(request.job_uuid.lower()):
            raise UsageError(f"--uuid: expected a UUID, got {request.job_uuid!r}")
        job_uuid = request.job_uuid.lower()
        for _domain, jobs in hypervisor.all_jobs():
            if not isinstance(jobs, ConfigError) and any(job.uuid == job_uuid for job in jobs):
                raise UsageError(f"a job {job_uuid} exists already")
    else:
        job_uuid = str(uuid.uuid4())
    job = Job(
        uuid=job_uuid,
        domain_name=domain.name(),
        domain_uuid=domain.UUIDString(),
        disks=selector,
        options=options,
    )
    hypervisor.write_jobs(domain, [*existing, job])
    return job


def remove_job(hypervisor: Hypervisor, job_uuid: str) -> Job:
    """Remove one job from whichever domain holds it; returns the removed job."""
    domain, job = hypervisor.find_job(job_uuid)
    remaining = [other for other in hypervisor.jobs(domain) if other.uuid != job.uuid]
    hypervisor.write_jobs(domain, remaining)
    return job


def remove_all_jobs(
    hypervisor: Hypervisor,
    domain_name: str | None,
    confirm: Callable[[str], bool],
) -> list[Job]:
    """Remove every job of one domain, or of every domain; returns what was removed.

    ``confirm`` is asked once with a description of what will go; when it
    says no, nothing changes.
    """
    if domain_name is not None:
        domain = hypervisor.domain(domain_name)
        targets = [(domain, hypervisor.jobs(domain))]
    else:
        targets = []
        for domain, jobs in hypervisor.all_jobs():
            if isinstance(jobs, ConfigError):
                # Malformed metadata still belongs to virt-dup: removing it is the fix.
                targets.append((domain, []))
            elif jobs:
                targets.append((domain, jobs))
        if not targets:
            return []
    removed = [job for _domain, jobs in targets for job in jobs]
    where = domain_name if domain_name else f"{len(targets)} domain(s)"
    if not confirm(f"remove {len(removed)} job(s) from {where}?"):
        raise VirtDupError("nothing removed")
    for domain, _jobs in targets:
        hypervisor.write_jobs(domain, [])
    return removed


# -- list-jobs ----------------------------------------------------------------
def job_record(job: Job, config: Config, domain: libvirt.virDomain | None = None) -> dict[str, Any]:
    """A job with its effective options (defaults applied) and its last results."""
    effective = job.options.over(config.defaults)
    status = StateStore(config.state_directory).load_status(job.uuid)
    record: dict[str, Any] = {
        "domain": job.domain_name,
        "domain_uuid": job.domain_uuid,
        "job": job.uuid,
        "uuid_derived": job.uuid_derived,
        "disks": {"devs": list(job.disks.devs), "paths": list(job.disks.paths)},
        "options": {name: _jsonable(value) for name, value in effective.set_values().items()},
        "set_on_job": sorted(job.options.set_values()),
        "timer": bool(effective.schedule or effective.full_schedule),
        "last_run": status.get("last_run"),
        "last_success": status.get("last_success"),
        "last_error": status.get("last_error"),
    }
    if domain is not None:
        record["domain_state"] = "running" if domain.isActive() else "shut off"
    return record


def _last_run(last_run: dict[str, Any] | None) -> str:
    if not last_run:
        return "never"
    when = str(last_run.get("finished", ""))[:16].replace("T", " ")
    return f"{last_run.get('result', '?')} {when}".strip()


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def list_jobs(
    config: Config, hypervisor: Hypervisor, domain_name: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """(job records, warnings for domains whose metadata cannot be read)."""
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    if domain_name is not None:
        domain = hypervisor.domain(domain_name)
        return [job_record(job, config, domain) for job in hypervisor.jobs(domain)], []
    for domain, jobs in hypervisor.all_jobs():
        if isinstance(jobs, ConfigError):
            warnings.append(f"skipped: {jobs}")
            continue
        records.extend(job_record(job, config, domain) for job in jobs)
    return records, warnings


def print_jobs(records: list[dict[str, Any]], as_json: bool, out: TextIO = sys.stdout) -> None:
    if as_json:
        json.dump(records, out, indent=2)
        out.write("\n")
        return
    if not records:
        out.write("no jobs\n")
        return
    header = ("DOMAIN", "JOB", "DISKS", "SCHEDULE", "DEPTH", "BACKEND", "LAST RUN")
    rows = [header]
    for record in records:
        options = record["options"]
        disks = record["disks"]["devs"] + record["disks"]["paths"]
        schedule = options.get("schedule") or "(none: no timer)"
        if options.get("full_schedule"):
            schedule += f" full: {options['full_schedule']}"
        rows.append(
            (
                record["domain"],
                record["job"],
                ",".join(disks) or "all",
                schedule,
                str(options.get("depth", 0)),
                ",".join(options.get("backends") or []) or "(none)",
                _last_run(record.get("last_run")),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
