"""The plan of a backup: everything decided before the domain is touched.

:func:`make_plan` reads the domain's definition once, selects the disks and
each one's chain files by depth, builds the job's duplicity target and
decides, once, whether this backup is a full or an incremental one (on the
collection as the backup will find it).  Nothing here changes the domain.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from virt_dup.backup.overlay import is_virt_dup_overlay, overlay_path
from virt_dup.config.load import Config, check_policy
from virt_dup.config.options import JobOptions, masked_url
from virt_dup.duplicity.cache import discard_interrupted_backup, partial_files
from virt_dup.duplicity.collection import Collection, full_is_due
from virt_dup.duplicity.copy import copy_collection, listing
from virt_dup.duplicity.listing import file_url_path
from virt_dup.duplicity.protocol import BackupStats
from virt_dup.duplicity.runner import Duplicity
from virt_dup.duplicity.target import Target, isolated, job_target
from virt_dup.errors import ConfigError, VirtDupError
from virt_dup.images.chain import ChainFile, read_chain, select_chain
from virt_dup.libvirt.domain_xml import Disk, select_disks
from virt_dup.libvirt.locality import require_sources_exist
from virt_dup.libvirt.metadata import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskPlan:
    """One disk of a run: its chain when the run began (top first), the files
    depth selects, and virt-dup's overlay on its top.

    The one shape of a disk's plan: the run record (what recovery merges
    back) and the manifest (what a restore rebuilds) are both written from it.
    """

    target: str
    chain: tuple[ChainFile, ...]
    selected: tuple[ChainFile, ...]
    overlay: str

    @property
    def original_top(self) -> str:
        """The disk's source file when the run began."""
        return self.chain[0].path

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "overlay": self.overlay,
            "chain": [asdict(chain_file) for chain_file in self.chain],
            "selected": [chain_file.path for chain_file in self.selected],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DiskPlan:
        """Raises KeyError, TypeError or ValueError for data that is not a disk plan."""
        chain = tuple(ChainFile(**entry) for entry in data["chain"])
        selected = set(data["selected"])
        return cls(
            target=str(data["target"]),
            chain=chain,
            selected=tuple(entry for entry in chain if entry.path in selected),
            overlay=str(data["overlay"]),
        )


@dataclass(frozen=True)
class Destination:
    """One more place a job's backups go: a copy of the first destination's."""

    url: str
    target: Target
    #: Its retention: its own entry in virt-dup.yml over the job's options.
    retention: JobOptions


def destination(config: Config, job_uuid: str, options: JobOptions, url: str) -> Destination:
    """The job's collection on backend ``url`` with that backend's retention."""
    retention = config.backend_settings_of(url).retention.over(options)
    return Destination(url, job_target(config, job_uuid, options, url), retention)


@dataclass(frozen=True)
class Plan:
    """Everything decided before the domain is touched."""

    job: Job
    options: JobOptions
    domain_running: bool
    disks: tuple[DiskPlan, ...]
    backend_url: str
    full: bool
    target: Target
    #: The job's collection before this run (after any partial set was discarded).
    collection: Collection = field(default_factory=lambda: Collection(()))
    #: An interrupted backup left a partial set (discarded unless this is a dry run).
    interrupted_backup: bool = False
    #: The job's other destinations: they get copies of what ``target`` holds.
    mirrors: tuple[Destination, ...] = ()
    #: The retention of the first destination (its own entry over the job's).
    retention: JobOptions | None = None

    def as_json(self) -> dict[str, Any]:
        """The plan as ``run --dry-run --json`` prints it (no secret: the URL is masked)."""
        return {
            "job": self.job.uuid,
            "domain": {"name": self.job.domain_name, "uuid": self.job.domain_uuid},
            "domain_running": self.domain_running,
            "backend": masked_url(self.backend_url),
            "mirrors": [masked_url(mirror.url) for mirror in self.mirrors],
            "type": "full" if self.full else "incremental",
            "depth": self.options.depth or 0,
            "interrupted_backup": self.interrupted_backup,
            "disks": [
                {
                    "target": disk.target,
                    "chain": [chain_file.path for chain_file in disk.chain],
                    "selected": [chain_file.path for chain_file in disk.selected],
                    "selected_bytes": sum(os.stat(f.path).st_size for f in disk.selected),
                }
                for disk in self.disks
            ],
        }

    def describe(self) -> list[str]:
        lines = [
            f"job {self.job.uuid} of domain {self.job.domain_name} "
            f"({'running' if self.domain_running else 'shut off'})",
            f"backend: {masked_url(self.backend_url)} "
            f"({'full' if self.full else 'incremental'} backup)",
            f"depth: {self.options.depth}",
        ]
        lines += [f"then copied to: {masked_url(mirror.url)}" for mirror in self.mirrors]
        if self.interrupted_backup:
            lines.append("an interrupted backup left a partial backup set: it will be deleted")
        for disk in self.disks:
            chain = " <- ".join(os.path.basename(f.path) for f in reversed(disk.chain))
            lines.append(f"disk {disk.target}: chain {chain}")
            lines.extend(f"  backs up {f.path}" for f in disk.selected)
        return lines


def make_plan(
    config: Config,
    duplicity: Duplicity,
    disks: Sequence[Disk],
    running: bool,
    job: Job,
    force_full: bool,
    *,
    dry_run: bool = False,
) -> Plan:
    """Decide the run without touching the domain; raises on every problem found.

    With ``dry_run`` nothing is written (not even the job's cache).  Otherwise
    what an interrupted backup of the job left in its
    cache and on its backend is deleted first (it must never be resumed:
    :func:`virt_dup.duplicity.cache.discard_interrupted_backup`), so that full
    or incremental is decided on the collection as the backup will find it.
    ``disks``: the domain's disks in the definition it ``running`` uses.
    """
    check_policy(config, job.options, f"job {job.uuid} of domain {job.domain_name}")
    options = job.options.over(config.defaults)
    selections = []
    for disk in select_disks(disks, job.disks, job.domain_name):
        assert disk.source is not None  # select_disks returns qcow2 file disks only
        if is_virt_dup_overlay(disk.source):
            raise VirtDupError(
                f"domain {job.domain_name}: disk {disk.target} still runs on a virt-dup overlay "
                f"({disk.source}) after recovery"
            )
        require_sources_exist([(disk.target, disk.source)], job.domain_name)
        chain = read_chain(disk.source)
        selected = select_chain(chain, options.depth or 0, disk.target)
        selections.append(
            DiskPlan(
                target=disk.target,
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
    urls = list(dict.fromkeys(config.backend_url(backend) for backend in backends))
    destinations = [destination(config, job.uuid, options, url) for url in urls]
    first = first_reachable(destinations, job.uuid)
    others = [other for other in destinations if other is not first]
    if not dry_run:
        for other in others:
            catch_up(other, first, config.cache_directory / first.target.name, job.uuid)
    backend_url, target = first.url, first.target
    interrupted = partial_files(target)
    if dry_run:
        directory = file_url_path(target.url)
        if directory is not None and not directory.exists():
            # duplicity would create the job's directory just to find it empty
            collection = Collection(())
        else:
            # A cache of its own, thrown away: a dry run writes nothing in the
            # job's (duplicity would create it and its lockfile), and an empty
            # cache sees a partial set as the real run will, once it has
            # discarded it.
            with tempfile.TemporaryDirectory(prefix="virt-dup-plan-") as scratch:
                collection = duplicity.collection_status(isolated(target, Path(scratch)))
    else:
        collection = discard_interrupted_backup(duplicity, target)
    full = force_full or full_is_due(collection, options.full_every)
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
        mirrors=tuple(others),
        retention=first.retention,
    )


def first_reachable(destinations: Sequence[Destination], job_uuid: str) -> Destination:
    """The destination this run backs up to: the first one, or when it cannot be
    listed, the next one that can (the others get copies of what it holds; the
    unreachable one fails the run for itself alone, and catches up later).
    A job with one destination is not probed: its backup fails as it would."""
    if len(destinations) < 2:
        return destinations[0]
    problems = []
    for candidate in destinations:
        try:
            listing(candidate.target)
        except VirtDupError as error:
            problems.append(str(error))
            log.warning("job %s: %s: backing up to the next destination", job_uuid, error)
            continue
        return candidate
    raise VirtDupError("no destination can be reached: " + "; ".join(problems))


def catch_up(source: Destination, first: Destination, tempdir: Path, job_uuid: str) -> None:
    """Copy to ``first`` the sets ``source`` got while ``first`` was unreachable
    (a run backed up to ``source`` instead), so that this run continues the
    newest chain.  Only sets newer than ``first``'s newest: what ``first``'s own
    retention removed stays removed.  A failure here is not this run's: it is
    logged, and the copy after the backup reports that destination."""
    try:
        copied = copy_collection(source.target, first.target, tempdir, newer_only=True)
    except VirtDupError as error:
        log.info("job %s: nothing copied from %s: %s", job_uuid, masked_url(source.url), error)
        return
    if copied.sets:
        log.warning(
            "job %s: copied %d backup set(s) %s made while %s was unreachable",
            job_uuid,
            copied.sets,
            masked_url(source.url),
            masked_url(first.url),
        )


def wait_past_last_backup(
    collection: Collection,
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


class IncompleteBackup(VirtDupError):
    """duplicity's statistics do not account for every file the plan selected."""


def check_complete(stats: BackupStats, files: Mapping[str, int]) -> None:
    """A backup holds every file of ``files`` (path -> size in bytes), in full.

    duplicity's statistics count the source it read: every selected file,
    and the directories above them (so "at least").  A file it did not read
    as a file (a symbolic link, a file that vanished) makes them fall short.
    Raises :class:`IncompleteBackup` saying by how much: such a backup is
    never reported as done.
    """
    expected_bytes = sum(files.values())
    problems = []
    if stats.errors:
        problems.append(f"duplicity counted {stats.errors} error(s) reading the files")
    if stats.source_files < len(files):
        problems.append(f"it read {stats.source_files} of the {len(files)} selected files")
    if stats.bytes_read < expected_bytes:
        problems.append(f"it read {stats.bytes_read} of their {expected_bytes} bytes")
    if problems:
        raise IncompleteBackup(
            "the backup does not hold every selected file in full: " + "; ".join(problems)
        )
