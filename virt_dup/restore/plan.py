"""Where each file of a restore goes and what its header names afterwards.  Pure.

A restore is decided completely before anything is written
(:func:`plan_restore`): which files, each file's destination, which backing
file each one names afterwards, and the base a partial chain (depth < 0) is
put on.  :mod:`virt_dup.restore.workspace` carries the plan out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from virt_dup.backup.manifest import ManifestDisk, ManifestFile
from virt_dup.errors import NotFoundError, UsageError, VirtDupError

log = logging.getLogger(__name__)


class RestoreError(VirtDupError):
    """A restore that cannot start or did not check out; the host is as it was."""


class ChecksumMismatch(RestoreError):
    """A restored file differs from what the backup recorded."""


# -- the plan (pure) -----------------------------------------------------------------
@dataclass(frozen=True)
class FilePlan:
    """One chain file: where it was, where it goes, what its header names afterwards."""

    original: str
    stored: str  # where the file is inside the backup
    destination: str
    format: str
    virtual_size: int
    sha256: str
    backing: str | None  # backing file string in the header after the restore
    backing_format: str | None
    original_backing: str | None  # as it was backed up
    original_backing_format: str | None
    #: Bytes the backup recorded the file to hold (qemu-img's actual size), if it did.
    size: int | None = None

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
class DiskRestorePlan:
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
    disks: tuple[DiskRestorePlan, ...]

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
    outside = [path for path in destinations.values() if not is_below(path, [root])]
    if outside:
        raise RestoreError(f"{', '.join(outside)}: not inside --target-dir {root}; refused")
    return destinations


def is_below(path: str, directories: Sequence[str]) -> bool:
    """Whether ``path`` (absolute, normalized) is inside one of ``directories``."""
    return any(
        os.path.commonpath([path, os.path.normpath(directory)]) == os.path.normpath(directory)
        for directory in directories
    )


def check_written_only_below(destinations: Mapping[str, str], directories: Sequence[str]) -> None:
    """A restore to the paths a backup names writes only below image directories
    (``directories``): a backend is not trusted to choose where root writes.
    Raises :class:`RestoreError` naming the paths and what to do."""
    outside = sorted(path for path in destinations.values() if not is_below(path, directories))
    if outside:
        raise RestoreError(
            f"{', '.join(outside)}: not below an image directory of this host "
            f"({', '.join(directories)}: libvirt's, its storage pools', its domains' disks); "
            "restore with --target-dir DIR"
        )


def check_replacing_only(destinations: Mapping[str, str], current: Collection[str]) -> None:
    """An in-place restore replaces only files of the domain's current disk chains
    (``current``); raises :class:`RestoreError` for any other path."""
    others = sorted(path for path in destinations.values() if path not in current)
    if others:
        raise RestoreError(
            f"{', '.join(others)}: not a file of the domain's current disks; --in-place "
            "replaces only those (restore with --target-dir DIR)"
        )


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
                    stored=entry.stored,
                    destination=destination,
                    format=entry.format,
                    virtual_size=entry.virtual_size,
                    sha256=entry.sha256,
                    backing=backing,
                    backing_format=backing_format if backing else None,
                    original_backing=entry.backing_file,
                    original_backing_format=entry.backing_format,
                    size=entry.actual_size,
                )
            )
        planned.append(DiskRestorePlan(disk.target, tuple(entries), base_plan))
    return RestorePlan(tuple(planned))


def choose_disks(
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
