"""``virt-dup restore``: a backup's chain files back on disk, checked, and a domain to run them.

The order matters:

1. decide everything first (pure: :func:`plan_restore`): which files, where
   each goes, which backing file each one names afterwards; check that no
   destination exists, that a base the backup does not hold (depth -N) is
   there with the right virtual size, that an in-place restore's domain is
   shut off;
2. each file is restored by duplicity into a *staged* name next to its
   destination (same directory, so the final rename is atomic and never
   crosses file systems);
3. its SHA-256 is compared with the manifest's **before anything touches
   it**: the checksums were taken of the files as they were backed up, and
   duplicity gives back exactly those bytes;
4. the backing file in its header is rewritten to the new location where
   that changed (``qemu-img rebase -u``: the header only, the data is
   already complete), then the file is made sparse again (duplicity writes
   holes as zeros; ``fallocate --dig-holes`` turns zero blocks back into
   holes in place, byte-for-byte the same content, so the qcow2 stays
   exactly the image that was backed up);
5. ``qemu-img check`` of every file (on its own, its backing ignored);
6. only then do files get their final names (``link``: never over an
   existing file); in place, the current files are first moved aside and
   come back if anything fails;
7. ``qemu-img info --backing-chain`` of every restored disk must show
   exactly the planned chain.  In place, the files moved aside are deleted
   only now (``--keep-replaced`` keeps them);
8. ``--define``: the domain from the saved XML (:mod:`virt_dup.definition`).

Anything failing before step 7 is completed leaves the host as it was.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from types import FrameType

from virt_dup import duplicity, journal
from virt_dup.backups import BackupSource
from virt_dup.chain import run_qemu_img
from virt_dup.errors import CommandError, NotFoundError, UsageError, VirtDupError
from virt_dup.execute import CommandFailed
from virt_dup.execute import run as run_command
from virt_dup.manifest import ManifestDisk, ManifestFile
from virt_dup.run import sha256_file

log = logging.getLogger(__name__)

STAGED_PREFIX = ".virt-dup-restore."
REPLACED_SUFFIX = ".virt-dup-replaced"


class RestoreError(VirtDupError):
    """A restore that cannot start or did not check out; the host is as it was."""


class ChecksumMismatch(RestoreError):
    """A restored file differs from what the backup recorded."""


# -- the plan (pure) -----------------------------------------------------------------
@dataclass(frozen=True)
class FilePlan:
    """One chain file: where it was, where it goes, what its header names afterwards."""

    original: str
    destination: str
    format: str
    virtual_size: int
    sha256: str
    backing: str | None  # backing file string in the header after the restore
    backing_format: str | None
    original_backing: str | None  # as it was backed up
    original_backing_format: str | None

    @property
    def rebase(self) -> bool:
        """Whether the header's backing file must be rewritten."""
        return (self.backing, self.backing_format) != (
            self.original_backing,
            self.original_backing_format,
        )


@dataclass(frozen=True)
class BasePlan:
    """A file below a disk's restored chain that the backup does not hold (depth -N)."""

    target: str
    path: str  # the file the restored chain is put on
    recorded: ManifestFile  # what the backup says stood there


@dataclass(frozen=True)
class DiskPlan:
    target: str
    files: tuple[FilePlan, ...]  # top first
    base: BasePlan | None

    @property
    def top(self) -> FilePlan:
        return self.files[0]

    def expected_chain(self) -> list[str]:
        """The absolute paths qemu must see under the restored top, top first."""
        chain = [entry.destination for entry in self.files]
        if self.base is not None:
            chain.append(os.path.abspath(self.base.path))
        return chain


@dataclass(frozen=True)
class RestorePlan:
    disks: tuple[DiskPlan, ...]

    @property
    def files(self) -> tuple[FilePlan, ...]:
        """Every file once (a file shared by disks is restored once), bottom first."""
        unique: dict[str, FilePlan] = {}
        for disk in self.disks:
            for entry in reversed(disk.files):
                unique.setdefault(entry.original, entry)
        return tuple(unique.values())


def restored_files(disk: ManifestDisk) -> tuple[ManifestFile, ...]:
    """The files of a disk the backup holds: always the top of its chain, top first.

    Raises :class:`RestoreError` for a manifest where they are not.
    """
    selected = disk.selected
    if not selected or disk.files[: len(selected)] != selected:
        raise RestoreError(
            f"disk {disk.target}: the backup does not hold the top of its chain; cannot restore"
        )
    return selected


def bases_needed(disks: Sequence[ManifestDisk]) -> dict[str, ManifestFile]:
    """Disk target -> the file below its restored chain that no disk's backup holds."""
    held = {entry.path for disk in disks for entry in disk.selected}
    needed = {}
    for disk in disks:
        count = len(restored_files(disk))
        if count < len(disk.files) and disk.files[count].path not in held:
            needed[disk.target] = disk.files[count]
    return needed


def target_dir_destinations(disks: Sequence[ManifestDisk], target_dir: str) -> dict[str, str]:
    """Original path -> ``TARGET_DIR/<target dev>/<file name>`` for every file to restore.

    A file shared by several disks goes (once) under the first disk's
    directory.  Two files of one directory with the same name get their
    position in the chain (1 = the bottom-most) as a prefix: ``2-disk.qcow2``.
    """
    root = os.path.abspath(target_dir)
    destinations: dict[str, str] = {}
    for disk in disks:
        files = restored_files(disk)
        taken = {
            os.path.basename(path)
            for original, path in destinations.items()
            if os.path.dirname(path) == os.path.join(root, disk.target)
        }
        for position, entry in zip(range(len(files), 0, -1), files, strict=True):
            if entry.path in destinations:
                continue
            name = os.path.basename(entry.path)
            if name in taken:
                name = f"{position}-{name}"
            taken.add(name)
            destinations[entry.path] = os.path.join(root, disk.target, name)
    return destinations


def original_destinations(disks: Sequence[ManifestDisk]) -> dict[str, str]:
    """Original path -> the same path (in place, or back where the files were)."""
    return {entry.path: entry.path for disk in disks for entry in restored_files(disk)}


def backing_reference(destination: str, backing: str, original_reference: str | None) -> str:
    """The backing file string for ``destination``'s header so that it names ``backing``.

    The header's string is kept when it already names ``backing`` (relative
    strings are relative to the image's directory); otherwise it stays
    relative if it was relative, else absolute.
    """
    directory = os.path.dirname(destination)
    if original_reference and not original_reference.startswith("json:"):
        resolved = os.path.normpath(os.path.join(directory, original_reference))
        if resolved == os.path.normpath(backing):
            return original_reference
        if not os.path.isabs(original_reference):
            return os.path.relpath(backing, directory)
    return os.path.abspath(backing)


def plan_restore(
    disks: Sequence[ManifestDisk],
    destinations: Mapping[str, str],
    bases: Mapping[str, tuple[str, str]],
) -> RestorePlan:
    """Where each file of ``disks`` goes and what its header names afterwards.

    ``destinations``: original path -> new path (every restored file).
    ``bases``: disk target -> (path, format) of the file its restored chain
    is put on, for the disks of :func:`bases_needed`.  Pure.
    """
    planned = []
    for disk in disks:
        files = restored_files(disk)
        below = disk.files[len(files)] if len(files) < len(disk.files) else None
        base_plan = None
        if below is not None and below.path not in destinations:
            if disk.target not in bases:
                raise RestoreError(f"disk {disk.target}: no base named for {below.path}")
            base_plan = BasePlan(disk.target, bases[disk.target][0], below)
        entries = []
        for index, entry in enumerate(files):
            destination = destinations[entry.path]
            backing: str | None = None
            backing_format = entry.backing_format
            if index + 1 < len(files):
                backing = backing_reference(
                    destination, destinations[files[index + 1].path], entry.backing_file
                )
            elif below is not None and base_plan is None:
                backing = backing_reference(
                    destination, destinations[below.path], entry.backing_file
                )
            elif base_plan is not None:
                base_path, base_format = bases[disk.target]
                backing = backing_reference(destination, base_path, entry.backing_file)
                backing_format = base_format
            if entry.sha256 is None:
                raise RestoreError(f"the manifest has no checksum of {entry.path}")
            entries.append(
                FilePlan(
                    original=entry.path,
                    destination=destination,
                    format=entry.format,
                    virtual_size=entry.virtual_size,
                    sha256=entry.sha256,
                    backing=backing,
                    backing_format=backing_format if backing else None,
                    original_backing=entry.backing_file,
                    original_backing_format=entry.backing_format,
                )
            )
        planned.append(DiskPlan(disk.target, tuple(entries), base_plan))
    return RestorePlan(tuple(planned))


def select_disks(
    manifest_disks: Sequence[ManifestDisk], wanted: Sequence[str]
) -> list[ManifestDisk]:
    """The disks named in ``wanted`` (all when empty); NotFoundError for an unknown one."""
    if not wanted:
        return list(manifest_disks)
    by_target = {disk.target: disk for disk in manifest_disks}
    unknown = [target for target in wanted if target not in by_target]
    if unknown:
        raise NotFoundError(
            f"the backup has no disk {', '.join(unknown)} (it has {', '.join(by_target) or 'none'})"
        )
    return [by_target[target] for target in dict.fromkeys(wanted)]


def parse_backing_options(values: Sequence[str], targets: Sequence[str]) -> dict[str, str]:
    """``--backing-file [DEV=]FILE`` values -> disk target -> file.

    A value without ``DEV=`` applies to every disk in ``targets``.
    """
    bases: dict[str, str] = {}
    for value in values:
        target, separator, path = value.partition("=")
        if separator and target in targets:
            bases[target] = path
        elif separator and "/" not in target:
            raise UsageError(f"--backing-file {value}: no disk {target} in this restore")
        else:
            for each in targets:
                bases.setdefault(each, value)
    return bases


# -- qemu-img ---------------------------------------------------------------------------
def image_info(path: str) -> tuple[str, int]:
    """(format, virtual size) of an image, its backing chain not opened."""
    output = run_qemu_img("info", "--output=json", "-U", path)
    try:
        info = json.loads(output)
        return str(info["format"]), int(info["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise CommandError(f"qemu-img info {path}: unreadable output") from None


def check_image(path: str, image_format: str) -> str | None:
    """``qemu-img check`` of one file alone (its backing file is not opened).

    Returns a warning for leaked clusters (harmless: the image is what was
    backed up); raises :class:`RestoreError` for anything worse.  A format
    qemu-img cannot check (raw) passes: its checksum is the whole check.
    """
    spec = "json:" + json.dumps(
        {"driver": image_format, "file": {"driver": "file", "filename": path}, "backing": None}
    )
    if image_format != "qcow2":
        spec = path
    try:
        completed = run_command(
            ["qemu-img", "check", "-q", "-f", image_format, spec], ok_codes=(0, 3, 63)
        )
    except CommandFailed as failure:
        meaning = {2: "is corrupted", 1: "could not be checked"}.get(
            failure.returncode or 0, "failed the check"
        )
        raise RestoreError(f"qemu-img check: {path} {meaning}: {failure}") from None
    except CommandError as error:
        raise RestoreError(f"qemu-img check: {path}: {error}") from None
    if completed.returncode == 3:
        return f"qemu-img check: {path} has leaked clusters (harmless: as backed up)"
    return None


def rebase_unsafe(path: str, image_format: str, backing: str, backing_format: str | None) -> None:
    """Rewrite the backing file named in ``path``'s header (nothing else changes)."""
    arguments = ["rebase", "-u", "-f", image_format, "-b", backing]
    if backing_format:
        arguments += ["-F", backing_format]
    run_qemu_img(*arguments, path)


def dig_holes(path: str) -> bool:
    """Make the zero blocks of ``path`` holes again; False when the file system cannot."""
    try:
        run_command(["fallocate", "--dig-holes", path], timeout=3600)
    except CommandError as error:
        log.warning("cannot make %s sparse: %s", path, error)
        return False
    return True


def chain_of(top: str) -> list[str]:
    """The files qemu opens for ``top``, top first (absolute paths)."""
    output = run_qemu_img("info", "--backing-chain", "--output=json", "-U", top)
    try:
        return [os.path.normpath(str(entry["filename"])) for entry in json.loads(output)]
    except (ValueError, KeyError, TypeError):
        raise CommandError(f"qemu-img info --backing-chain {top}: unreadable output") from None


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


# -- carrying it out ------------------------------------------------------------------
@dataclass
class Workspace:
    """What a restore has put on disk so far, so that a failure can take it all back."""

    created_directories: list[str] = field(default_factory=list)
    staged: list[str] = field(default_factory=list)
    placed: list[str] = field(default_factory=list)
    set_aside: dict[str, str] = field(default_factory=dict)  # original -> aside

    def make_directory(self, path: str) -> None:
        missing = []
        current = os.path.abspath(path)
        while not os.path.exists(current):
            missing.append(current)
            current = os.path.dirname(current)
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o755)  # libvirt's QEMU user must reach the images
            self.created_directories.append(directory)

    def stage_path(self, destination: str) -> str:
        directory, name = os.path.split(destination)
        staged = os.path.join(directory, f"{STAGED_PREFIX}{secrets.token_hex(4)}.{name}")
        self.staged.append(staged)
        return staged

    def rollback(self) -> list[str]:
        """Undo everything; returns what could not be undone."""
        problems = []
        for path in [*reversed(self.placed), *self.staged]:
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.unlink(path)
            except OSError as error:
                problems.append(f"cannot remove {path}: {error.strerror}")
        for original, aside in self.set_aside.items():
            try:
                os.rename(aside, original)
            except OSError as error:
                problems.append(f"cannot move {aside} back to {original}: {error.strerror}")
        for directory in reversed(self.created_directories):
            with suppress(OSError):
                os.rmdir(directory)
        return problems


class Interrupted(RestoreError):
    """SIGTERM/SIGINT during a restore: what it did is taken back first."""


@contextmanager
def rolled_back_on_failure(workspace: Workspace) -> Iterator[Workspace]:
    """Undo what ``workspace`` records when the block fails, also on SIGTERM/SIGINT
    (systemd stopping the unit, Ctrl-C): set-aside disks must come back."""

    def interrupt(number: int, _frame: FrameType | None) -> None:
        raise Interrupted(f"stopped by {signal.Signals(number).name}; the restore was undone")

    previous = {
        number: signal.signal(number, interrupt) for number in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield workspace
    except BaseException as error:
        problems = workspace.rollback()
        if problems:
            raise RestoreError(
                f"{error}; and undoing the restore: {'; '.join(problems)}"
            ) from error
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@dataclass
class FilesRestored:
    """What :func:`fetch_and_check` produced: each original -> its checked staged copy."""

    staged: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)


def fetch_and_check(
    source: BackupSource,
    backup_id: str,
    plan: RestorePlan,
    workspace: Workspace,
    *,
    rewrite: bool = True,
    report: Callable[[str], None] = lambda _line: None,
) -> FilesRestored:
    """Steps 2-5: restore every file of ``plan`` to a staged name and check it.

    ``rewrite=False`` (verify) leaves headers and allocation as restored.
    Raises :class:`ChecksumMismatch`, :class:`RestoreError` or
    :class:`CommandError` (duplicity).
    """
    result = FilesRestored()
    files = plan.files
    for number, entry in enumerate(files, start=1):
        workspace.make_directory(os.path.dirname(entry.destination))
        staged = workspace.stage_path(entry.destination)
        report(f"[{number}/{len(files)}] restoring {entry.original}")
        duplicity.restore(source.target, staged, time=backup_id, path_to_restore=entry.original)
        if not os.path.isfile(staged):
            raise RestoreError(f"duplicity restored no file for {entry.original}")
        digest = sha256_file(staged)
        if digest != entry.sha256:
            raise ChecksumMismatch(
                f"{entry.original} in backup {backup_id}: SHA-256 {digest} differs from the "
                f"{entry.sha256} recorded at backup time"
            )
        result.bytes += os.stat(staged).st_size
        if rewrite and entry.rebase and entry.backing is not None:
            rebase_unsafe(staged, entry.format, entry.backing, entry.backing_format)
        if rewrite:
            dig_holes(staged)
        warning = check_image(staged, entry.format)
        if warning:
            result.warnings.append(warning)
        result.staged[entry.original] = staged
    return result


def check_bases(
    plan_bases: Mapping[str, ManifestFile], named: Mapping[str, str]
) -> dict[str, tuple[str, str]]:
    """Disk target -> (path, format) of each base a chain goes on, checked.

    The base is the one named (``--backing-file``), else the file the backup
    recorded, which must still be there.  Its virtual size must be what the
    backup recorded.  Raises :class:`RestoreError`.
    """
    bases: dict[str, tuple[str, str]] = {}
    for target, recorded in plan_bases.items():
        path = named.get(target, recorded.path)
        if not os.path.exists(path):
            raise RestoreError(
                f"disk {target}: the backup does not hold the base {recorded.path} of its chain "
                f"(depth < 0) and it is not on this host: name one with --backing-file "
                f"{target}=FILE"
                if target not in named
                else f"disk {target}: --backing-file {path}: no such file"
            )
        path = os.path.abspath(path)
        image_format, virtual_size = image_info(path)
        if virtual_size != recorded.virtual_size:
            raise RestoreError(
                f"disk {target}: base {path} has a virtual size of {virtual_size} bytes; the "
                f"backed-up chain was on one of {recorded.virtual_size} bytes ({recorded.path})"
            )
        bases[target] = (path, image_format)
    return bases


def place(workspace: Workspace, staged: str, destination: str) -> None:
    """Give a staged file its final name, never replacing an existing file."""
    try:
        os.link(staged, destination)
    except FileExistsError:
        raise RestoreError(f"{destination} appeared during the restore; not replacing it") from None
    except OSError:
        if os.path.lexists(destination):
            raise RestoreError(f"{destination} exists; not replacing it") from None
        os.rename(staged, destination)  # a file system without hard links
    else:
        os.unlink(staged)
    workspace.placed.append(destination)


def set_aside(workspace: Workspace, path: str, backup_id: str) -> None:
    aside = f"{path}{REPLACED_SUFFIX}-{backup_id}"
    if os.path.lexists(aside):
        aside = f"{aside}-{secrets.token_hex(3)}"
    os.rename(path, aside)
    workspace.set_aside[path] = aside


def verify_chains(plan: RestorePlan) -> None:
    """Step 7: qemu sees exactly the planned chain under every restored top."""
    for disk in plan.disks:
        expected = [os.path.normpath(path) for path in disk.expected_chain()]
        seen = chain_of(disk.top.destination)
        if seen[: len(expected)] != expected:
            raise RestoreError(
                f"disk {disk.target}: the restored chain is {' <- '.join(reversed(seen))}, "
                f"expected {' <- '.join(reversed(expected))}"
            )


def install_files(
    plan: RestorePlan,
    restored: FilesRestored,
    workspace: Workspace,
    backup_id: str,
    *,
    replace: bool,
) -> None:
    """Step 6-7: final names (setting current files aside when ``replace``), then the
    chain check."""
    for entry in plan.files:
        if os.path.lexists(entry.destination):
            if not replace:
                raise RestoreError(f"{entry.destination} exists; a restore never replaces a file")
            set_aside(workspace, entry.destination, backup_id)
        place(workspace, restored.staged[entry.original], entry.destination)
    verify_chains(plan)


def remove_set_aside(workspace: Workspace) -> list[str]:
    """After a checked in-place restore: delete the files that were replaced."""
    problems = []
    for aside in workspace.set_aside.values():
        try:
            os.unlink(aside)
        except OSError as error:
            problems.append(f"cannot delete {aside}: {error.strerror}")
    return problems


@dataclass
class RestoreResult:
    """What a restore did; the summary line and the journal record."""

    domain: str
    job_uuid: str
    backup_id: str
    disks: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    allocated: int = 0
    duration_seconds: float = 0.0
    defined: str | None = None
    kept: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    result: str = "failed"
    message: str = ""

    def summary(self) -> str:
        if self.result != "success":
            return (
                f"restore of backup {self.backup_id} of domain {self.domain} (job "
                f"{self.job_uuid}) failed: {self.message}"
            )
        line = (
            f"restored backup {self.backup_id} of domain {self.domain} (job {self.job_uuid}): "
            f"{', '.join(self.disks)}, {len(self.files)} file(s), "
            f"{self.bytes / 2**20:.1f} MiB ({self.allocated / 2**20:.1f} MiB allocated) in "
            f"{self.duration_seconds:.1f} s"
        )
        if self.defined:
            line += f"; defined domain {self.defined}"
        return line

    def record(self) -> None:
        journal.record(
            self.summary(),
            priority=journal.PRIORITY_INFO if self.result == "success" else journal.PRIORITY_ERR,
            JOB_UUID=self.job_uuid,
            DOMAIN=self.domain,
            ACTION="restore",
            RESULT=self.result,
            BACKUP_ID=self.backup_id,
            DISKS=",".join(self.disks) or None,
            BYTES_RESTORED=self.bytes,
            DURATION_SEC=self.duration_seconds,
            DEFINED_DOMAIN=self.defined,
        )


def destinations_free(plan: RestorePlan) -> None:
    """Raises :class:`RestoreError` naming the destinations that exist."""
    existing = [entry.destination for entry in plan.files if os.path.lexists(entry.destination)]
    if existing:
        raise RestoreError(
            f"{', '.join(existing)} exist(s); a restore never replaces a file: restore to a "
            "new --target-dir, or --in-place for a shut-off domain"
        )


def timed() -> Callable[[], float]:
    started = time.monotonic()
    return lambda: round(time.monotonic() - started, 3)
