"""``virt-dup doctor``: what would stop a backup on this host, found before a run.

``check-config`` proves virt-dup.yml works (programs, keys, passphrase,
backends); the doctor starts with that and looks at the host around it, as
the first run at 02:00 would meet it: libvirt and
its security driver, each job's disks (qcow2 files, room for the overlays
next to them, a directory libvirtd can create them in), the guest agent the
quiesce policy wants, room in the cache and on ``file://`` backends, the
systemd units and timers, and whether the generator sees the jobs the CLI
sees.  Each finding is one line with what to do; nothing is changed (a probe
file created in a disk's directory is removed at once).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt

from virt_dup.actions.check_config import check_config
from virt_dup.config.load import Config
from virt_dup.duplicity.target import DEFAULT_VOLSIZE_MB
from virt_dup.errors import CommandError, ConfigError, LibvirtError, NotFoundError, UsageError
from virt_dup.files import human_size
from virt_dup.images.chain import read_chain
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.libvirt.domain_xml import Disk, select_disks
from virt_dup.libvirt.locality import require_local_disks, transport_warning
from virt_dup.libvirt.metadata import Job
from virt_dup.systemd.generator import (
    TARGET,
    TIMER_KINDS,
    file_backend_directory,
    read_domain_files,
    render_units,
)
from virt_dup.systemd.manager import ServiceManager, SystemdError, SystemdUnavailable
from virt_dup.systemd.units import RUN_SERVICES, TIMER_PATTERNS

PROBLEM = "problem"  # a backup would fail, or not happen
WARNING = "warning"  # a backup works, but not as well as it could
OK = "ok"

MIB = 1024 * 1024
#: duplicity stages each volume in the cache before it uploads it.
VOLUME_BYTES = DEFAULT_VOLSIZE_MB * MIB
#: Less free space than this in the cache: a run fails staging its volumes.
CACHE_PROBLEM_BYTES = 2 * VOLUME_BYTES
CACHE_WARNING_BYTES = 2 * 1024 * MIB
#: Less than this next to a disk: its overlay fills the file system in minutes of writes.
OVERLAY_PROBLEM_BYTES = 256 * MIB
#: ... and less than this share of the disk's size: a busy guest may fill it.
OVERLAY_WARNING_SHARE = 0.05


@dataclass(frozen=True)
class Finding:
    """One thing the doctor found, with what to do about it."""

    severity: str
    subject: str
    message: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.severity}: {self.subject}: {self.message}"
        return f"{text}; fix: {self.fix}" if self.fix else text

    def as_json(self) -> dict[str, str]:
        return {
            "severity": self.severity,
            "subject": self.subject,
            "message": self.message,
            "fix": self.fix,
        }


JobsOfDomains = list[tuple[libvirt.virDomain, list[Job] | ConfigError]]


def doctor(
    config: Config,
    hypervisor: Callable[[], Hypervisor],
    manager: Callable[[], ServiceManager],
) -> list[Finding]:
    """Every finding about this host: check-config's problems (programs, keys,
    passphrase, backends), then libvirt, the jobs, the cache, systemd."""
    findings = [
        Finding(PROBLEM, "configuration", problem) for problem in check_config(config).problems
    ]
    try:
        require_local_disks(config.libvirt_uri)
    except UsageError as error:
        # Every run would be refused: say so, and do not connect there.
        findings.append(
            Finding(PROBLEM, "libvirt", str(error), f"set libvirt.uri in {config.path}")
        )
        return findings
    warning = transport_warning(config.libvirt_uri)
    if warning is not None:
        findings.append(Finding(WARNING, "libvirt", warning))
    try:
        connection = hypervisor()
        domains: JobsOfDomains = list(connection.all_jobs())
    except LibvirtError as error:
        findings.append(
            Finding(
                PROBLEM,
                "libvirt",
                str(error),
                f"start libvirtd, or check libvirt.uri in {config.path}",
            )
        )
        connection, domains = None, []
    if connection is not None:
        findings += check_security_driver(connection)
        for domain, jobs in domains:
            if isinstance(jobs, ConfigError):
                findings.append(
                    Finding(
                        PROBLEM, f"domain {domain.name()}", str(jobs), "virsh edit its metadata"
                    )
                )
                continue
            for job in jobs:
                try:
                    findings += check_job(config, connection, domain, job)
                except LibvirtError as error:
                    if connection.find_domain(domain.UUIDString()) is not None:
                        findings.append(Finding(PROBLEM, f"job {job.uuid}", str(error)))
                    # else: undefined since it was listed; it has no jobs any more
    findings += check_cache(config)
    findings += check_timers(config, manager, domains)
    findings += check_generator(config, domains)
    return findings


# -- libvirt ------------------------------------------------------------------------
def check_security_driver(connection: Hypervisor) -> list[Finding]:
    models = connection.security_models()
    shown = ", ".join(models) or "none"
    return [
        Finding(
            OK,
            "libvirt",
            f"{connection.uri} answers; security drivers: {shown} (libvirt labels the "
            "overlays it creates; the doctor checks it may create them next to each disk)",
        )
    ]


# -- jobs ---------------------------------------------------------------------------
def check_job(
    config: Config, connection: Hypervisor, domain: libvirt.virDomain, job: Job
) -> list[Finding]:
    subject = f"job {job.uuid} ({domain.name()})"
    options = job.options.over(config.defaults)
    running = connection.call("cannot ask the domain's state", domain.isActive) == 1
    disks = connection.disks(domain, inactive=not running)
    try:
        chosen = select_disks(disks, job.disks, domain.name())
    except (ConfigError, NotFoundError) as error:
        return [
            Finding(PROBLEM, subject, str(error), f"virt-dup edit-job or remove-job {job.uuid}")
        ]
    findings = [
        Finding(
            WARNING,
            subject,
            f"disk {disk.target} ({disk.driver_type or disk.source_type}) is not backed up: "
            "virt-dup backs up qcow2 files",
            f"qemu-img convert -O qcow2 {disk.source} NEW.qcow2 and point the disk at it",
        )
        for disk in skipped_disks(disks, chosen)
        if job.disks.all_disks
    ]
    allocated = 0
    for disk in chosen:
        findings += check_overlay_room(subject, disk)
        try:
            allocated += sum(entry.actual_size for entry in read_chain(str(disk.source)))
        except (CommandError, NotFoundError) as error:
            findings.append(Finding(PROBLEM, subject, str(error)))
    if running and options.quiesce != "off":
        findings += check_agent(subject, connection, domain, options.quiesce or "auto")
    backends = options.backends or ()
    if not backends:
        findings.append(
            Finding(PROBLEM, subject, "no backend", f"set defaults.backends in {config.path}")
        )
    for backend in backends:  # every destination gets the whole backup
        try:
            directory = file_backend_directory(config.backend_url(backend))
        except ConfigError as error:
            findings.append(Finding(PROBLEM, subject, str(error)))
        else:
            if directory is not None:
                findings += check_backend_room(subject, Path(directory), allocated)
    return findings


def skipped_disks(disks: Iterable[Disk], chosen: Iterable[Disk]) -> list[Disk]:
    """Disks (not CD-ROMs, floppies) a job that takes every disk leaves out."""
    taken = {disk.target for disk in chosen}
    return [disk for disk in disks if disk.device == "disk" and disk.target not in taken]


def check_overlay_room(subject: str, disk: Disk) -> list[Finding]:
    """libvirtd creates the overlay next to the disk: the directory must take
    a new file, and have room for what the guest writes during the backup."""
    directory = os.path.dirname(str(disk.source))
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".virt-dup-doctor-", dir=directory)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        return [
            Finding(
                PROBLEM,
                subject,
                f"disk {disk.target}: no overlay can be created in {directory}: {error.strerror}",
                "a directory root can write to (no read-only or root-squashed mount)",
            )
        ]
    free = free_bytes(Path(directory))
    try:
        size = read_chain(str(disk.source))[0].virtual_size
    except (CommandError, NotFoundError):
        size = 0
    what = f"disk {disk.target}: {human_size(free)} free in {directory} for its overlay"
    if free < OVERLAY_PROBLEM_BYTES:
        return [Finding(PROBLEM, subject, what, "free space on that file system")]
    if free < size * OVERLAY_WARNING_SHARE:
        return [
            Finding(
                WARNING,
                subject,
                f"{what} (less than {OVERLAY_WARNING_SHARE:.0%} of its {human_size(size)})",
                "free space on that file system",
            )
        ]
    return []


def check_agent(
    subject: str, connection: Hypervisor, domain: libvirt.virDomain, quiesce: str
) -> list[Finding]:
    reason = connection.agent_problem(domain)
    if reason is None:
        return []
    fix = "install qemu-guest-agent in the guest and give the domain its channel"
    if quiesce == "required":
        return [
            Finding(
                PROBLEM,
                subject,
                f"quiesce is required and the guest agent does not answer: {reason}",
                fix,
            )
        ]
    return [
        Finding(
            WARNING,
            subject,
            f"the guest agent does not answer ({reason}): backups are crash-consistent",
            fix + ", or set quiesce: off to say so",
        )
    ]


def check_backend_room(subject: str, directory: Path, allocated: int) -> list[Finding]:
    free = free_bytes(directory)
    if free < allocated:
        return [
            Finding(
                WARNING,
                subject,
                f"{human_size(free)} free for its file:// backend {directory}, less than the "
                f"{human_size(allocated)} its disks hold: a full backup may not fit",
                "free space there, or a backend elsewhere",
            )
        ]
    return []


# -- the cache ----------------------------------------------------------------------
def check_cache(config: Config) -> list[Finding]:
    directory = config.cache_directory
    free = free_bytes(directory)
    what = f"{human_size(free)} free for {directory} (duplicity's signatures and staged volumes)"
    if free < CACHE_PROBLEM_BYTES:
        return [
            Finding(
                PROBLEM,
                "cache",
                what,
                f"at least {human_size(CACHE_WARNING_BYTES)} free there, or cache_dir elsewhere",
            )
        ]
    if free < CACHE_WARNING_BYTES:
        return [Finding(WARNING, "cache", what, "free space there, or cache_dir elsewhere")]
    return []


# -- systemd ------------------------------------------------------------------------
def expected_timers(domains: JobsOfDomains, config: Config) -> dict[str, str]:
    """Timer name -> "job UUID (domain)" for every job with a schedule, as the CLI reads them."""
    timers = {}
    for domain, jobs in domains:
        if isinstance(jobs, ConfigError):
            continue
        for job in jobs:
            options = job.options.over(config.defaults)
            for kind in TIMER_KINDS:
                if getattr(options, kind.option):
                    timers[f"{kind.prefix}@{job.uuid}.timer"] = f"job {job.uuid} ({domain.name()})"
    return timers


def check_timers(
    config: Config, manager: Callable[[], ServiceManager], domains: JobsOfDomains
) -> list[Finding]:
    command = "virt-dup install-units" + (" --scope user" if config.scope == "user" else "")
    try:
        with manager() as systemd:
            installed = systemd.list_unit_files(RUN_SERVICES[:1])
            target_active = any(unit.active for unit in systemd.list_units([TARGET]))
            active = {unit.name for unit in systemd.list_units(TIMER_PATTERNS) if unit.active}
    except SystemdUnavailable as error:
        return [
            Finding(
                PROBLEM,
                "systemd",
                str(error),
                "run virt-dup where systemd runs",
            )
        ]
    except SystemdError as error:
        return [Finding(PROBLEM, "systemd", str(error))]
    if not installed:
        return [
            Finding(PROBLEM, "systemd", "virt-dup's units are not installed: no job runs", command)
        ]
    findings = []
    if not target_active:
        findings.append(
            Finding(
                WARNING,
                "systemd",
                f"{TARGET} is not active: no timer fires",
                "systemctl start virt-dup.target",
            )
        )
    for timer, owner in sorted(expected_timers(domains, config).items()):
        if timer not in active and target_active:
            findings.append(
                Finding(
                    PROBLEM,
                    owner,
                    f"has a schedule but {timer} is not active",
                    "virt-dup sync-timers",
                )
            )
    return findings


def check_generator(config: Config, domains: JobsOfDomains) -> list[Finding]:
    """The generator reads libvirt's persistent definitions; the CLI asks libvirt."""
    files, read_warnings = read_domain_files(config.libvirt_config_dir)
    generated = render_units(config, files)
    findings = [
        Finding(PROBLEM, "generator", warning, "fix the job, or virt-dup remove-job")
        for warning in [*read_warnings, *generated.warnings]
    ]
    timers = {name for name in generated.files if name.endswith(".timer")}
    expected = expected_timers(domains, config)
    for timer, owner in sorted(expected.items()):
        if timer not in timers:
            findings.append(
                Finding(
                    PROBLEM,
                    owner,
                    f"the generator, which reads only {config.libvirt_config_dir}, makes no "
                    f"{timer}: the job is not in the domain's persistent definition",
                    "add it with virt-dup add-job (it writes both definitions)",
                )
            )
    return findings


# -- helpers ------------------------------------------------------------------------
def free_bytes(path: Path) -> int:
    """Free space for root-less writers on the file system ``path`` is (or would be) on."""
    existing = next(iter(_existing(path)))
    status = os.statvfs(existing)
    return status.f_bavail * status.f_frsize


def _existing(path: Path) -> Iterator[Path]:
    for candidate in (path, *path.parents):
        if candidate.exists():
            yield candidate


def has_problems(findings: Iterable[Finding]) -> bool:
    return any(finding.severity == PROBLEM for finding in findings)
