"""add-job, remove-job, remove-all-jobs, list-jobs: jobs in domain XML.

Each action validates everything before it writes anything: a bad value,
an unknown disk or backend leaves the domain XML untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import libvirt

from virt_dup.backup.state import StateStore
from virt_dup.config.load import PLACEHOLDER_KEY, Config, check_policy
from virt_dup.config.options import OPTIONS_BY_NAME, JobOptions
from virt_dup.duplicity.gpg import Keyring
from virt_dup.errors import ConfigError, LibvirtError, UsageError, VirtDupError
from virt_dup.images.qemu_img import bitmaps_of, chain_of, remove_bitmap
from virt_dup.libvirt.checkpoints import ChangedBlocks
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.libvirt.domain_xml import Disk, select_disks
from virt_dup.libvirt.locality import require_local_disks, require_sources_exist
from virt_dup.libvirt.metadata import DiskSelector, Job, duplicate_job_message, is_valid_uuid

log = logging.getLogger(__name__)


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


def add_job(config: Config, hypervisor: Hypervisor, request: AddJobRequest) -> Job:
    """Validate a new job and write it into the domain's XML (live and persistent).

    Returns the job as written.  Raises before writing anything when the
    domain, a disk, a backend or a value is wrong, when the libvirt URI names
    another host or a selected disk's source file is not on this one.
    """
    require_local_disks(config.libvirt_uri)
    domain = hypervisor.domain(request.domain)
    if not domain.isPersistent():
        raise UsageError(
            f"domain {domain.name()} is transient: jobs must live in a persistent "
            "definition (virsh define)"
        )
    options = parse_requested_options(request.option_values)
    for backend in options.backends or ():
        config.backend_url(backend)
    check_policy(config, options, "the job")
    check_keys_exist(config, options)
    selector = DiskSelector(tuple(request.devs), tuple(request.paths))
    # The persistent definition is what later runs start from.
    selected = select_disks(hypervisor.disks(domain, inactive=True), selector, domain.name())
    require_sources_exist(
        ((disk.target, disk.source) for disk in selected if disk.source), domain.name()
    )
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


def check_keys_exist(config: Config, options: JobOptions) -> None:
    """Raises :class:`ConfigError` when a key the job's backups would be encrypted
    to is the example's placeholder, or is not in the GnuPG home: its first run
    would fail, unattended, at its first scheduled time."""
    effective = options.over(config.defaults)
    if effective.encryption != "gpg":
        return
    keys = effective.encryption_keys or config.encryption.keys
    if not keys:
        return  # the run says so; add-job's handler gives a notice
    keyring = Keyring(config.gnupg_directory)
    for key_id in keys:
        if key_id == PLACEHOLDER_KEY:
            raise ConfigError(
                f"the job would be encrypted to {key_id}, the placeholder key of the example "
                f"{config.path}: run 'virt-dup init' first; nothing was written"
            )
        key = keyring.find(key_id)
        if key is None or key.problem is not None or not key.can_encrypt:
            why = (
                "is not in"
                if key is None
                else f"is {key.problem} in"
                if key.problem
                else "cannot encrypt in"
            )
            raise ConfigError(
                f"the job would be encrypted to key {key_id}, which {why} the GnuPG home "
                f"{keyring.home}: run 'virt-dup init' (or 'virt-dup init --import FILE'), "
                "then add the job; nothing was written"
            )


@dataclass(frozen=True)
class EditJobRequest:
    """What ``edit-job`` was asked for, as text from the command line."""

    job_uuid: str
    option_values: Mapping[str, object]  # option name -> str or list[str]
    #: Option names to unset (the job then inherits them again).
    unset: tuple[str, ...] = ()
    #: A new disk selection (replaces the old one when either is given).
    devs: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()


#: What ``edit-job --unset`` takes besides the option names.
UNSET_DISKS = "disks"


def option_name(text: str) -> str:
    """An option's name from ``--unset`` text: ``full_retention``,
    ``full-retention`` or ``--full-retention`` (its add-job flag); ``disks``."""
    if text == UNSET_DISKS:
        return text
    for name, option in OPTIONS_BY_NAME.items():
        if text in (name, name.replace("_", "-"), option.command_line_flag):
            return name
    known = ", ".join([*OPTIONS_BY_NAME, UNSET_DISKS])
    raise UsageError(f"--unset: no job option {text[:60]!r} (one of: {known})")


def edit_job(config: Config, hypervisor: Hypervisor, request: EditJobRequest) -> tuple[Job, Job]:
    """Change a job in its domain's XML (live and persistent), keeping its uuid and
    so its backup collection; returns (the job before, the job as written).

    Raises before writing anything when the job, a disk, a backend or a value
    is wrong, or when the request changes nothing it could name.
    """
    domain, job = hypervisor.find_job(request.job_uuid)
    unset = {option_name(text) for text in request.unset}
    both = unset.intersection(request.option_values)
    if both:
        raise UsageError(f"--unset {sorted(both)[0]} and its flag exclude each other")
    new_disks = bool(request.devs or request.paths)
    if new_disks and UNSET_DISKS in unset:
        raise UsageError("--dev/--path and --unset disks exclude each other")
    if not (request.option_values or unset or new_disks):
        raise UsageError("nothing to change: give job option flags, --dev/--path or --unset")
    changed = parse_requested_options(request.option_values).set_values()
    values = {**job.options.set_values(), **changed}
    for name in unset - {UNSET_DISKS}:
        values.pop(name, None)
    options = JobOptions(**values)
    for backend in options.backends or ():
        config.backend_url(backend)
    check_policy(config, options, f"job {job.uuid}")
    check_keys_exist(config, options)
    if new_disks:
        selector = DiskSelector(tuple(request.devs), tuple(request.paths))
    elif UNSET_DISKS in unset:
        selector = DiskSelector()
    else:
        selector = job.disks
    selected = select_disks(hypervisor.disks(domain, inactive=True), selector, domain.name())
    require_sources_exist(
        ((disk.target, disk.source) for disk in selected if disk.source), domain.name()
    )
    edited = dataclasses.replace(job, disks=selector, options=options, uuid_derived=False)
    jobs = hypervisor.jobs(domain)  # refuses to overwrite malformed metadata
    hypervisor.write_jobs(domain, [edited if other.uuid == job.uuid else other for other in jobs])
    return job, edited


def job_changes(before: Job, after: Job) -> list[str]:
    """What an edit changed, one line per option (``depth: 0 -> -1``, ``depth: -1 ->
    inherited``), and the disks; "nothing changed" when the values were the same."""
    old, new = before.options.set_values(), after.options.set_values()

    def shown(values: dict[str, Any], name: str) -> str:
        if name not in values:
            return "inherited"
        value = values[name]
        return ",".join(value) if isinstance(value, tuple) else str(value)

    lines = [
        f"{name}: {shown(old, name)} -> {shown(new, name)}"
        for name in OPTIONS_BY_NAME
        if old.get(name) != new.get(name)
    ]
    if before.disks != after.disks:

        def disks(selector: DiskSelector) -> str:
            return ",".join([*selector.devs, *selector.paths]) or "every qcow2 disk"

        lines.append(f"disks: {disks(before.disks)} -> {disks(after.disks)}")
    return lines or ["nothing changed"]


def remove_job(hypervisor: Hypervisor, job_uuid: str) -> Job:
    """Remove one job from whichever domain holds it; returns the removed job."""
    domain, job = hypervisor.find_job(job_uuid)
    remaining = [other for other in hypervisor.jobs(domain) if other.uuid != job.uuid]
    hypervisor.write_jobs(domain, remaining)
    remove_checkpoints(hypervisor, domain, [job])
    return job


def remove_checkpoints(
    hypervisor: Hypervisor, domain: libvirt.virDomain, jobs: Sequence[Job]
) -> None:
    """Delete the checkpoints virt-dup made for ``jobs`` (their bitmaps would track
    writes for nobody); one that cannot go is a warning, the job is gone anyway.

    libvirt deletes a checkpoint of a running domain only; for a shut-off one
    the bitmaps are removed from its image files with qemu-img, then libvirt's
    metadata (a domain with checkpoints cannot be undefined without a flag)."""
    blocks = ChangedBlocks(hypervisor, domain)
    running = bool(hypervisor.call("cannot read the domain's state", domain.isActive))
    for job in jobs:
        try:
            for name in blocks.checkpoints(job.uuid):
                if running:
                    blocks.delete_checkpoint(name)
                else:
                    _remove_bitmaps(hypervisor.disks(domain, inactive=True), name)
                    blocks.forget_checkpoint(name)
        except VirtDupError as error:
            log.warning("job %s: its checkpoints stay: %s", job.uuid, error)


def _remove_bitmaps(disks: Sequence[Disk], name: str) -> None:
    """Bitmap ``name`` out of every qcow2 file of every disk's chain."""
    for disk in disks:
        if not disk.is_qcow2_file or disk.source is None:
            continue
        for path in chain_of(disk.source):
            if name in bitmaps_of(path):
                remove_bitmap(path, name)


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
    for domain, jobs in targets:
        hypervisor.write_jobs(domain, [])
        remove_checkpoints(hypervisor, domain, jobs)
    return removed


# -- list-jobs ----------------------------------------------------------------
def job_record(job: Job, config: Config, domain_state: str | None = None) -> dict[str, Any]:
    """A job with its effective options (defaults applied) and its last results;
    ``domain_state``: "running" or "shut off", when known."""
    effective = job.options.over(config.defaults)
    status = StateStore.of(config).load_status(job.uuid)
    record: dict[str, Any] = {
        "domain": job.domain_name,
        "domain_uuid": job.domain_uuid,
        "job": job.uuid,
        "uuid_derived": job.uuid_derived,
        "disks": {"devs": list(job.disks.devs), "paths": list(job.disks.paths)},
        "options": {name: _jsonable(value) for name, value in effective.shown_values().items()},
        "set_on_job": sorted(job.options.set_values()),
        "timer": bool(effective.schedule or effective.full_schedule),
        "last_run": status.get("last_run"),
        "last_success": status.get("last_success"),
        "last_error": status.get("last_error"),
    }
    if domain_state is not None:
        record["domain_state"] = domain_state
    return record


def domain_state(hypervisor: Hypervisor, domain: libvirt.virDomain) -> str:
    """ "running" or "shut off".  Raises :class:`LibvirtError`."""
    active = hypervisor.call(f"cannot ask the state of domain {domain.name()}", domain.isActive)
    return "running" if active else "shut off"


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
        state = domain_state(hypervisor, domain)
        return [job_record(job, config, state) for job in hypervisor.jobs(domain)], []
    holders: dict[str, list[str]] = {}
    for domain, jobs in hypervisor.all_jobs():
        if isinstance(jobs, ConfigError):
            warnings.append(f"skipped: {jobs}")
            continue
        try:
            state = domain_state(hypervisor, domain)
        except LibvirtError:
            if hypervisor.find_domain(domain.UUIDString()) is None:
                continue  # undefined since it was listed: it has no jobs any more
            raise
        records.extend(job_record(job, config, state) for job in jobs)
        for job in jobs:
            holders.setdefault(job.uuid, []).append(job.domain_name)
    warnings += [
        duplicate_job_message(job_uuid, names)
        for job_uuid, names in holders.items()
        if len(names) > 1
    ]
    return records, warnings
