"""The ``backups``, ``restore`` and ``verify`` verbs: which job, which backup, where to.

The mechanics are elsewhere: :mod:`virt_dup.backups` (what exists on a
backend), :mod:`virt_dup.restore` (files back, checked),
:mod:`virt_dup.definition` (the restored domain's XML), :mod:`virt_dup.verify`.
This module decides, from the command line, what they are applied to, and
refuses before anything is touched when the request cannot be carried out.

Where the files go:

* ``--target-dir DIR``: ``DIR/<target dev>/<file name>``, a new place;
* ``--in-place``: where they were, replacing the current files of a shut-off
  domain defined here (set aside until the restore has been checked, then
  deleted; ``--keep-replaced`` keeps them);
* neither: where they were, when none of those files exists any more (the
  images were lost, or this is a fresh host).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import libvirt

from virt_dup.backup.state import StateStore
from virt_dup.config.load import Config
from virt_dup.errors import LibvirtError, UsageError
from virt_dup.images.chain import read_chain
from virt_dup.images.qemu_img import allocated_bytes
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.libvirt.domain_xml import (
    DefinitionChanges,
    RestoredDisk,
    disk_sources,
    point_disks_at,
    rewrite_definition,
)
from virt_dup.libvirt.metadata import parse_xml
from virt_dup.restore.plan import (
    RestoreError,
    RestorePlan,
    bases_needed,
    check_replacing_only,
    check_written_only_below,
    choose_disks,
    original_destinations,
    parse_backing_options,
    plan_restore,
    target_dir_destinations,
)
from virt_dup.restore.sources import (
    BackupMetadata,
    BackupSource,
    Point,
    changes_source,
    choose_point,
    find_sources,
    one_source,
)
from virt_dup.restore.workspace import (
    Progress,
    RestoreResult,
    Workspace,
    apply_deltas,
    check_bases,
    destinations_free,
    fetch_and_check,
    install_files,
    remove_set_aside,
    rolled_back_on_failure,
)
from virt_dup.systemd import journal

#: How long an in-place restore waits for a backup of the domain to finish.
log = logging.getLogger(__name__)

LOCK_WAIT_SECONDS = 30.0


# -- restore ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RestoreRequest:
    """What ``virt-dup restore`` was asked to do."""

    domain: str
    backup_id: str | None = None
    job: str | None = None
    backend: str | None = None
    target_dir: str | None = None
    in_place: bool = False
    keep_replaced: bool = False
    define: bool = False
    name: str | None = None
    disks: tuple[str, ...] = ()
    backing_files: tuple[str, ...] = ()

    def check(self) -> None:
        """Raises :class:`UsageError` for options that do not go together."""
        if self.in_place and self.target_dir:
            raise UsageError("--in-place and --target-dir exclude each other")
        if self.in_place and self.define:
            raise UsageError("--in-place restores a domain defined here: --define is not needed")
        if self.keep_replaced and not self.in_place:
            raise UsageError("--keep-replaced goes with --in-place")
        if self.name and not self.define:
            raise UsageError("--name goes with --define")


@dataclass(frozen=True)
class Definition:
    """How ``--define`` will define the domain (decided before anything is restored)."""

    name: str
    copy: bool
    #: The domain is still defined here and already uses the restored files.
    already_defined: bool = False


def decide_definition(
    request: RestoreRequest,
    saved_name: str,
    uuid_taken: bool,
    name_taken: Callable[[str], bool],
    files_back_in_place: bool,
) -> Definition:
    """Name and kind of the domain ``--define`` makes.  Pure.

    The same domain (name, UUID) when its UUID is free here; a copy
    (``--name`` or ``NAME-restored``, a new UUID) when the original is still
    defined.  Files put back where they were with the original still defined
    are its own disks again: nothing to define, and a copy on them is refused.
    """
    copy = uuid_taken or name_taken(saved_name)
    if files_back_in_place and copy:
        if request.name:
            raise RestoreError(
                f"domain {saved_name} is defined here and its disks are where the restore puts "
                f"them: a copy named {request.name} would share them; use --target-dir"
            )
        return Definition(saved_name, copy=False, already_defined=True)
    name = request.name or (f"{saved_name}-restored" if copy else saved_name)
    if name_taken(name):
        raise RestoreError(f"a domain named {name} exists: choose another with --name")
    return Definition(name, copy)


def _saved_name(metadata: BackupMetadata) -> str:
    root = parse_xml(metadata.domain_xml, "the saved domain XML")
    return root.findtext("name") or metadata.manifest.domain_name


def _restored_disks(plan: RestorePlan) -> dict[str, RestoredDisk]:
    return {disk.target: RestoredDisk(disk.top.destination, disk.top.format) for disk in plan.disks}


def restore(
    config: Config,
    hypervisor: Callable[[], Hypervisor],
    request: RestoreRequest,
    report: Callable[[str], None] = lambda _line: None,
    progress: Progress | None = None,
) -> RestoreResult:
    """Carry out ``request``; returns the result (recorded in the journal too).
    ``progress``: see :func:`~virt_dup.restore.workspace.fetch_and_check`.

    Raises :class:`VirtDupError` subclasses; on failure the host is left as
    it was (the failure is recorded in the journal as well).
    """
    request.check()
    source, point = _find_backup(config, hypervisor, request, report)
    result = RestoreResult(source.job_uuid, point.metadata.manifest.domain_name, backup_id=point.id)
    with journal.recorded(result):
        _Restore(config, hypervisor, request, source, point, result, report, progress).run()
    return result


def _find_backup(
    config: Config,
    hypervisor: Callable[[], Hypervisor],
    request: RestoreRequest,
    report: Callable[[str], None],
) -> tuple[BackupSource, Point]:
    """The job's collection and the point (backup id, metadata, changed-block sets
    on top) that ``request`` means."""
    found = find_sources(
        config,
        hypervisor,
        request.domain,
        backend_url=request.backend,
        job_uuid=request.job,
        report=report,
    )
    source, found_metadata = one_source(found, f"domain {request.domain}")
    hint = found_metadata.folder if found_metadata else None
    return source, choose_point(config, source, request.backup_id, hint, report=report)


@dataclass(frozen=True)
class RestoreDryRun:
    """What ``restore`` would do (``restore --dry-run``)."""

    job_uuid: str
    domain: str
    backup_id: str
    in_place: bool
    #: (where the file was, where it would go), bottom of each chain first.
    files: tuple[tuple[str, str], ...]
    disks: tuple[str, ...]
    definition: Definition | None
    #: The pid of a run of the domain in progress (in place: the restore would wait).
    busy: str | None = None

    def lines(self) -> list[str]:
        lines = [
            f"restore backup {self.backup_id} of domain {self.domain} (job {self.job_uuid}): "
            f"{', '.join(self.disks)}" + (" in place" if self.in_place else "")
        ]
        lines += [f"  {original} -> {destination}" for original, destination in self.files]
        if self.definition is not None and not self.definition.already_defined:
            kind = "a copy" if self.definition.copy else "the same domain"
            lines.append(f"define domain {self.definition.name} ({kind})")
        if self.busy is not None:
            lines.append(f"domain {self.domain}: a run (pid {self.busy}) holds its lock")
        return lines

    def as_json(self) -> dict[str, object]:
        definition = self.definition
        return {
            "job": self.job_uuid,
            "domain": self.domain,
            "backup_id": self.backup_id,
            "in_place": self.in_place,
            "disks": list(self.disks),
            "files": [
                {"original": original, "destination": destination}
                for original, destination in self.files
            ],
            "define": None
            if definition is None or definition.already_defined
            else {"name": definition.name, "copy": definition.copy},
            "busy_pid": self.busy,
        }


def plan_restore_request(
    config: Config,
    hypervisor: Callable[[], Hypervisor],
    request: RestoreRequest,
    report: Callable[[str], None] = lambda _line: None,
) -> RestoreDryRun:
    """What :func:`restore` would do for ``request``, refusing what it would refuse,
    and doing none of it: no file restored or set aside, no lock, no
    definition, no journal record, and the backend is read with a cache of its
    own that is thrown away (nothing is written in the cache directory)."""
    request.check()
    with tempfile.TemporaryDirectory(prefix="virt-dup-plan-") as scratch:
        scratch_config = dataclasses.replace(config, cache_dir=Path(scratch))
        source, point = _find_backup(scratch_config, hypervisor, request, report)
        manifest = point.metadata.manifest
        backup_id = point.id
        result = RestoreResult(source.job_uuid, manifest.domain_name, backup_id=backup_id)
        planner = _Restore(scratch_config, hypervisor, request, source, point, result, report)
        domain = planner._in_place_domain() if request.in_place else None
        plan = planner._plan(domain)
        definition = planner._definition() if request.define else None
        busy = None
        if domain is not None:
            store = StateStore.of(config)
            busy = store.lock_holder(domain.UUIDString())
            _check_shut_off(hypervisor(), domain, store)
    return RestoreDryRun(
        source.job_uuid,
        manifest.domain_name,
        backup_id,
        request.in_place,
        tuple((entry.original, entry.destination) for entry in plan.files),
        tuple(disk.target for disk in plan.disks),
        definition,
        busy,
    )


@dataclass
class _Restore:
    """One restore: what was asked, from which backup, and what it did so far."""

    config: Config
    hypervisor: Callable[[], Hypervisor]
    request: RestoreRequest
    source: BackupSource
    point: Point
    result: RestoreResult
    report: Callable[[str], None]
    progress: Progress | None = None

    @property
    def metadata(self) -> BackupMetadata:
        return self.point.metadata

    @property
    def backup_id(self) -> str:
        return self.point.id

    def run(self) -> None:
        """Plan everything (steps 1), then carry it out, all or nothing."""
        request = self.request
        domain = self._in_place_domain() if request.in_place else None
        plan = self._plan(domain)
        definition = self._definition() if request.define else None
        self.result.disks = [disk.target for disk in plan.disks]
        self.result.files = [entry.destination for entry in plan.files]
        if domain is None:

            def finish() -> None:
                if definition is not None:
                    _define(
                        self.hypervisor(), self.metadata, plan, definition, self.result, self.report
                    )

            self._carry_out(plan, finish)
            return
        store = StateStore.of(self.config)
        with store.domain_lock(domain.UUIDString(), domain.name(), LOCK_WAIT_SECONDS):
            _check_shut_off(self.hypervisor(), domain, store)
            self._carry_out(
                plan, lambda: _point_definition(self.hypervisor(), domain, plan, self.result)
            )

    def _in_place_domain(self) -> libvirt.virDomain:
        manifest = self.metadata.manifest
        domain = self.hypervisor().find_domain(manifest.domain_uuid)
        if domain is None:
            raise RestoreError(
                f"domain {manifest.domain_name} ({manifest.domain_uuid}) is not defined here: "
                "without --in-place the files go back where they were (when they are gone), "
                "or into --target-dir"
            )
        return domain

    def _plan(self, domain: libvirt.virDomain | None) -> RestorePlan:
        request = self.request
        disks = choose_disks(self.metadata.manifest.disks, request.disks)
        targets = [disk.target for disk in disks]
        if request.target_dir and not request.in_place:
            destinations = target_dir_destinations(disks, request.target_dir)
        elif domain is not None:
            destinations = original_destinations(disks)
            check_replacing_only(destinations, self._current_files(domain))
        else:
            destinations = original_destinations(disks)
            check_written_only_below(destinations, self._image_directories())
        named = parse_backing_options(request.backing_files, targets)
        plan = plan_restore(disks, destinations, check_bases(bases_needed(disks), named))
        if not request.in_place:
            destinations_free(plan)
        return plan

    def _current_files(self, domain: libvirt.virDomain) -> set[str]:
        """Every file of the domain's current disk chains (what --in-place may replace)."""
        files: set[str] = set()
        for disk in self.hypervisor().disks(domain, inactive=True):
            if disk.is_qcow2_file and disk.source and os.path.exists(disk.source):
                files.update(chain_file.path for chain_file in read_chain(disk.source))
            elif disk.source_type == "file" and disk.source:
                files.add(os.path.normpath(disk.source))
        return files

    def _image_directories(self) -> list[str]:
        try:
            return self.hypervisor().image_directories()
        except LibvirtError as error:  # a fresh host without libvirtd yet
            log.info("cannot ask libvirt for its image directories: %s", error)
            return ["/var/lib/libvirt/images"]

    def _definition(self) -> Definition:
        connection = self.hypervisor()
        return decide_definition(
            self.request,
            _saved_name(self.metadata),
            connection.find_domain(self.metadata.manifest.domain_uuid) is not None,
            lambda name: connection.find_domain(name) is not None,
            files_back_in_place=not self.request.target_dir,
        )

    def _carry_out(self, plan: RestorePlan, finish: Callable[[], None]) -> None:
        """Restore, check and install the files, then ``finish`` (define...); all or
        nothing."""
        request, result = self.request, self.result
        workspace = Workspace()
        with rolled_back_on_failure(workspace):
            restored = fetch_and_check(
                self.source,
                self.point.read_id,
                plan,
                workspace,
                report=self.report,
                progress=self.progress,
            )
            apply_deltas(
                changes_source(self.source),
                self.point.deltas,
                plan,
                restored,
                workspace,
                self.report,
            )
            result.notices.extend(restored.warnings)
            self.report("checksums and qemu-img check: ok; moving the files into place")
            install_files(plan, restored, workspace, self.backup_id, replace=request.in_place)
            finish()
        result.bytes = restored.bytes
        result.allocated = sum(allocated_bytes(entry.destination) for entry in plan.files)
        if request.in_place:
            if request.keep_replaced:
                result.kept = list(workspace.set_aside.values())
            else:
                result.notices.extend(remove_set_aside(workspace))


def _check_shut_off(hypervisor: Hypervisor, domain: libvirt.virDomain, store: StateStore) -> None:
    name = domain.name()
    if hypervisor.call(f"cannot read the state of domain {name}", domain.isActive):
        raise RestoreError(
            f"domain {name} is running: --in-place needs it shut off (virsh shutdown {name}); "
            "nothing was changed"
        )
    if store.load_run(domain.UUIDString()) is not None:
        raise RestoreError(
            f"domain {name} has an unfinished backup run: run 'virt-dup recover' first; "
            "nothing was changed"
        )


def _define(
    hypervisor: Hypervisor,
    metadata: BackupMetadata,
    plan: RestorePlan,
    definition: Definition,
    result: RestoreResult,
    report: Callable[[str], None],
) -> None:
    if definition.already_defined:
        result.notices.append(
            f"domain {definition.name} is defined here and uses the restored files: not "
            "defined again"
        )
        return
    xml, notices = rewrite_definition(
        metadata.domain_xml,
        DefinitionChanges(disks=_restored_disks(plan), name=definition.name, copy=definition.copy),
        os.path.exists,
    )
    result.notices.extend(notices)
    result.notices.extend(unreachable_directories(entry.destination for entry in plan.files))
    report(f"defining domain {definition.name}")
    hypervisor.define(xml, f"the restored domain {definition.name}")
    result.defined = definition.name


def unreachable_directories(paths: Iterable[str]) -> list[str]:
    """Notices for directories above ``paths`` that only their owner may enter.

    QEMU started by the system libvirtd runs as its own user (libvirt-qemu,
    qemu): it cannot open an image below a directory such as a 0700 home.
    """
    notices = []
    seen: set[str] = set()
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        while directory not in seen and directory != "/":
            seen.add(directory)
            try:
                mode = os.stat(directory).st_mode
            except OSError:
                break
            if not mode & 0o001:
                notices.append(
                    f"{directory} is not searchable by others (mode {mode & 0o777:o}): "
                    "libvirt's QEMU user may not reach the restored files"
                )
            directory = os.path.dirname(directory)
    return notices


def _point_definition(
    hypervisor: Hypervisor, domain: libvirt.virDomain, plan: RestorePlan, result: RestoreResult
) -> None:
    """In place: a disk now defined on another file (a later snapshot) goes back to the
    restored top."""
    current = disk_sources(hypervisor.domain_xml(domain, inactive=True))
    changed = {
        target: disk
        for target, disk in _restored_disks(plan).items()
        if current.get(target) and os.path.normpath(current[target] or "") != disk.top
    }
    if not changed:
        return
    xml = point_disks_at(hypervisor.domain_xml(domain, inactive=True), changed)
    hypervisor.define(xml, f"domain {domain.name()} on its restored disks")
    for target, disk in changed.items():
        result.notices.append(
            f"disk {target} was defined on {current[target]}; it is on {disk.top} again "
            f"({current[target]} is left as it was)"
        )


def format_notices(result: RestoreResult) -> list[str]:
    lines = list(result.notices)
    if result.kept:
        lines.append("the replaced files are kept: " + ", ".join(result.kept))
    return lines
