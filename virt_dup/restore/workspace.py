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
4. the file is made sparse again: duplicity writes holes as zeros, and the
   zero blocks that the checksum's read saw (no second read of the file)
   become holes in place (``fallocate(2)``, as ``fallocate --dig-holes``
   would: byte-for-byte the same content, so the qcow2 stays exactly the
   image that was backed up); then the backing file in its header is
   rewritten to the new location where that changed (``qemu-img rebase
   -u``: the header only, the data is already complete; after the holes,
   which are of the file as it was checked);
5. ``qemu-img check`` of every file (on its own, its backing ignored);
6. only then do files get their final names (``link``: never over an
   existing file); in place, the current files are first moved aside and
   come back if anything fails;
7. ``qemu-img info --backing-chain`` of every restored disk must show
   exactly the planned chain.  In place, the files moved aside are deleted
   only now (``--keep-replaced`` keeps them);
8. ``--define``: the domain from the saved XML (:mod:`virt_dup.libvirt.domain_xml`).

Anything failing before step 7 is completed leaves the host as it was.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from virt_dup.backup.manifest import ChangedDisk, ManifestFile
from virt_dup.files import human_size, interruptible, sha256_and_zero_runs
from virt_dup.images.qemu_img import (
    apply_changes,
    chain_of,
    check_image,
    image_info,
    punch_holes,
    rebase_unsafe,
)
from virt_dup.restore.plan import ChecksumMismatch, RestoreError, RestorePlan
from virt_dup.restore.sources import BackupMetadata, BackupSource
from virt_dup.systemd import journal

log = logging.getLogger(__name__)


STAGED_PREFIX = ".virt-dup-restore."


REPLACED_SUFFIX = ".virt-dup-replaced"


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


@contextmanager
def rolled_back_on_failure(workspace: Workspace) -> Iterator[Workspace]:
    """Undo what ``workspace`` records when the block fails, also on SIGTERM/SIGINT
    (systemd stopping the unit, Ctrl-C): set-aside disks must come back."""
    with interruptible("the restore was undone"):
        try:
            yield workspace
        except BaseException as error:
            problems = workspace.rollback()
            if problems:
                raise RestoreError(
                    f"{error}; and undoing the restore: {'; '.join(problems)}"
                ) from error
            raise


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
    progress: Progress | None = None,
) -> FilesRestored:
    """Steps 2-5: restore every file of ``plan`` to a staged name and check it.

    ``progress(done, total)``: bytes restored so far, of the sizes the backup
    recorded (``total`` None when it recorded none), about twice a second.

    ``rewrite=False`` (verify) leaves headers and allocation as restored.
    Raises :class:`ChecksumMismatch`, :class:`RestoreError` or
    :class:`CommandError` (duplicity).
    """
    result = FilesRestored()
    files = plan.files
    sizes = [entry.size for entry in files]
    total = None if None in sizes else sum(size or 0 for size in sizes)
    for number, entry in enumerate(files, start=1):
        workspace.make_directory(os.path.dirname(entry.destination))
        staged = workspace.stage_path(entry.destination)
        report(f"[{number}/{len(files)}] restoring {entry.original}")
        with _watched(staged, result.bytes, total, progress):
            source.restore(staged, time=backup_id, path_to_restore=entry.stored)
        zero_runs = check_restored(
            staged, entry.original, entry.sha256, f"{entry.original} in backup {backup_id}"
        )
        result.bytes += os.stat(staged).st_size
        if rewrite:
            punch_holes(staged, zero_runs)
        if rewrite and entry.rebase and entry.backing is not None:
            rebase_unsafe(staged, entry.format, entry.backing, entry.backing_format)
        warning = check_image(staged, entry.format)
        if warning:
            result.warnings.append(warning)
        result.staged[entry.original] = staged
    return result


#: ``progress(done, total)``: bytes restored so far, of ``total`` (None: unknown).
Progress = Callable[[int, int | None], None]
#: How often a restore's progress is sampled (the staged file's size).
PROGRESS_INTERVAL_S = 0.5


@contextmanager
def _watched(
    staged: str, before: int, total: int | None, progress: Progress | None
) -> Iterator[None]:
    """While duplicity writes ``staged``, report ``before`` + its size to ``progress``
    (never beyond ``total``: a file written whole may be larger than it was allocated)."""
    if progress is None:
        yield
        return
    done = threading.Event()

    def report() -> None:
        with suppress(OSError):
            written = before + os.stat(staged).st_size
            progress(written if total is None else min(written, total), total)

    def sample() -> None:
        while not done.wait(PROGRESS_INTERVAL_S):
            report()

    thread = threading.Thread(target=sample, name="restore progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        report()


def check_restored(
    staged: str, original: str, recorded: str | None, what: str
) -> list[tuple[int, int]]:
    """A restored file is a regular file whose SHA-256 is the one recorded at backup
    time; raises :class:`RestoreError` or :class:`ChecksumMismatch` naming ``what``.

    Returns the runs of whole zero blocks of the file system's block size that
    the same read saw (:func:`~virt_dup.files.sha256_and_zero_runs`), for
    :func:`~virt_dup.images.qemu_img.punch_holes`.
    """
    status = check_regular_file(staged, original)
    digest, zero_runs = sha256_and_zero_runs(staged, _hole_block_size(status))
    if digest != recorded:
        raise ChecksumMismatch(
            f"{what}: SHA-256 {digest} differs from the {recorded} recorded at backup time"
        )
    return zero_runs


def _hole_block_size(status: os.stat_result) -> int:
    """The file system's block size when it is a usable unit for holes, else 4 KiB."""
    size = status.st_blksize
    return size if 512 <= size <= 1 << 20 and not size & (size - 1) else 4096


def check_regular_file(staged: str, original: str) -> os.stat_result:
    """What duplicity restored for ``original`` must be a regular file of its own
    (returns its ``lstat``).

    A backend decides what a backup holds: a symbolic link (or a device, a
    directory) in its place would make every later step -- checksum, rebase,
    hole digging, the hard link that places it -- act on whatever it names.
    Raises :class:`RestoreError`.
    """
    try:
        status = os.lstat(staged)
    except FileNotFoundError:
        raise RestoreError(f"duplicity restored no file for {original}") from None
    if stat.S_ISLNK(status.st_mode):
        raise RestoreError(
            f"the backup holds a symbolic link to {os.readlink(staged)!r} for {original}, "
            "not the file; refused"
        )
    if not stat.S_ISREG(status.st_mode):
        raise RestoreError(f"the backup holds no regular file for {original}; refused")
    return status


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
class RestoreResult(journal.Outcome):
    """What a restore did."""

    ACTION = "restore"
    MESSAGE_ID = journal.MESSAGE_RESTORE

    backup_id: str = "?"
    disks: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    allocated: int = 0
    defined: str | None = None
    kept: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def failure_line(self) -> str:
        return (
            f"restore of backup {self.backup_id} of domain {self.domain} (job "
            f"{self.job_uuid}) failed: {self.message}"
        )

    def success_line(self) -> str:
        line = (
            f"restored backup {self.backup_id} of domain {self.domain} (job {self.job_uuid}): "
            f"{', '.join(self.disks)}, {len(self.files)} file(s), "
            f"{human_size(self.bytes)} "
            f"({human_size(self.allocated)} allocated) in "
            f"{self.duration_seconds:.1f} s"
        )
        if self.defined:
            line += f"; defined domain {self.defined}"
        return line

    def details(self) -> dict[str, object]:
        return {
            "BACKUP_ID": self.backup_id,
            "DISKS": ",".join(self.disks) or None,
            "BYTES_RESTORED": self.bytes,
            "DEFINED_DOMAIN": self.defined,
        }


def destinations_free(plan: RestorePlan) -> None:
    """Raises :class:`RestoreError` naming the destinations that exist."""
    existing = [entry.destination for entry in plan.files if os.path.lexists(entry.destination)]
    if existing:
        raise RestoreError(
            f"{', '.join(existing)} exist(s); a restore never replaces a file: restore to a "
            "new --target-dir, or --in-place for a shut-off domain"
        )


def apply_deltas(
    changes: BackupSource,
    deltas: Sequence[tuple[str, BackupMetadata]],
    plan: RestorePlan,
    restored: FilesRestored,
    workspace: Workspace,
    report: Callable[[str], None] = lambda _line: None,
) -> None:
    """Stack each changed-block set (oldest first) onto the restored tops: restore
    its changes file, check it against the manifest's SHA-256, commit it into
    the staged top.  Raises :class:`ChecksumMismatch` or :class:`RestoreError`.

    The next changes file is fetched while the current one is checked and
    committed (one duplicity restore at a time, so the collection's cache is
    never shared; at most two changes files staged at once).
    """
    tops = {disk.target: disk.top for disk in plan.disks}
    pieces: list[tuple[str, ChangedDisk, str, str]] = []  # id, disk, staged top, staged
    for backup_id, metadata in deltas:
        info = metadata.manifest.changes
        if info is None:
            raise RestoreError(f"backup {backup_id} is not a changed-block set")
        for disk in info.disks:
            top = tops.get(disk.target)
            if top is None:
                continue  # a disk this restore leaves out (--disk)
            if disk.top != top.original:
                raise RestoreError(
                    f"backup {backup_id}: the changes of disk {disk.target} are of {disk.top}, "
                    f"not of {top.original}"
                )
            staged = workspace.stage_path(f"{top.destination}.changes-{backup_id}")
            pieces.append((backup_id, disk, restored.staged[top.original], staged))

    def fetch(number: int) -> None:
        backup_id, disk, _top, staged = pieces[number]
        changes.restore(staged, time=backup_id, path_to_restore=disk.stored)

    pool = ThreadPoolExecutor(1, thread_name_prefix="changes fetch")
    try:
        upcoming = pool.submit(fetch, 0) if pieces else None
        for number, (backup_id, disk, staged_top, staged) in enumerate(pieces):
            assert upcoming is not None
            upcoming.result()
            upcoming = pool.submit(fetch, number + 1) if number + 1 < len(pieces) else None
            report(f"applying the changes of backup {backup_id} to {disk.top}")
            check_restored(
                staged,
                disk.stored,
                disk.sha256,
                f"the changes of disk {disk.target} in backup {backup_id}",
            )
            restored.bytes += os.stat(staged).st_size
            apply_changes(staged_top, staged)
            os.unlink(staged)
    finally:
        # A failure waits for the fetch under way (its file is the rollback's to delete).
        pool.shutdown(wait=True, cancel_futures=True)
    changed = {
        entry.target
        for _id, metadata in deltas
        if metadata.manifest.changes is not None
        for entry in metadata.manifest.changes.disks
    }
    for planned in plan.disks:
        if planned.target in changed:
            warning = check_image(restored.staged[planned.top.original], planned.top.format)
            if warning:
                restored.warnings.append(warning)
