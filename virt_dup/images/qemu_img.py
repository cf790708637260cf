"""qemu-img and the other programs that read or rewrite image files.

Every call goes through :func:`virt_dup.execute.run`; failures are one
:class:`~virt_dup.errors.CommandError` line.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
from collections.abc import Sequence

from virt_dup.errors import CommandError, VirtDupError
from virt_dup.execute import CommandFailed
from virt_dup.execute import run as run_command

#: How long one qemu-img call may take before it is reported as hung.
QEMU_IMG_TIMEOUT_S = 600.0


def run_qemu_img(*arguments: str, timeout_s: float = QEMU_IMG_TIMEOUT_S) -> str:
    """Run ``qemu-img ARGUMENTS`` (through :func:`virt_dup.execute.run`); its standard output.

    Raises :class:`CommandError` with the copy-pasteable command line, how it
    ended and the last lines it printed (also when it ran longer than
    ``timeout_s`` and was killed).
    """
    return run_command(["qemu-img", *arguments], timeout=timeout_s).stdout


log = logging.getLogger(__name__)


class ImageError(VirtDupError):
    """An image that failed ``qemu-img check``."""


def image_info(path: str) -> tuple[str, int]:
    """(format, virtual size) of an image as qemu-img probes it (no format is
    given), its backing chain not opened."""
    output = run_qemu_img("info", "--output=json", "-U", path)
    try:
        info = json.loads(output)
        return str(info["format"]), int(info["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise CommandError(f"qemu-img info {path}: unreadable output") from None


def check_image(path: str, image_format: str) -> str | None:
    """``qemu-img check`` of one file alone (its backing file is not opened).

    Returns a warning for leaked clusters (harmless: the image is what was
    backed up); raises :class:`ImageError` for anything worse.  A format
    qemu-img cannot check (raw) must at least not be another format in
    disguise: a "raw" file that probes as qcow2 could name any host file as
    its backing file the moment something opens it without a format.
    """
    if image_format not in ("qcow2", "qed", "vmdk", "vdi", "vhdx", "vpc"):
        probed, _size = image_info(path)
        if probed != image_format:
            raise ImageError(
                f"qemu-img: {path} is a {probed} image, the backup says {image_format}; refused"
            )
        return None
    spec = "json:" + json.dumps(
        {"driver": image_format, "file": {"driver": "file", "filename": path}, "backing": None}
    )
    try:
        completed = run_command(
            ["qemu-img", "check", "-q", "-f", image_format, spec], ok_codes=(0, 3, 63)
        )
    except CommandFailed as failure:
        meaning = {2: "is corrupted", 1: "could not be checked"}.get(
            failure.returncode or 0, "failed the check"
        )
        raise ImageError(f"qemu-img check: {path} {meaning}: {failure}") from None
    except CommandError as error:
        raise ImageError(f"qemu-img check: {path}: {error}") from None
    if completed.returncode == 3:
        return f"qemu-img check: {path} has leaked clusters (harmless: as backed up)"
    return None


def rebase_unsafe(path: str, image_format: str, backing: str, backing_format: str | None) -> None:
    """Rewrite the backing file named in ``path``'s header (nothing else changes)."""
    arguments = ["rebase", "-u", "-f", image_format, "-b", backing]
    if backing_format:
        arguments += ["-F", backing_format]
    run_qemu_img(*arguments, path)


#: fallocate(2) flags (linux/falloc.h): free the range, keep the file's size.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def punch_holes(path: str, runs: Sequence[tuple[int, int]]) -> bool:
    """Make the (offset, length) ``runs`` of ``path`` holes: they read as zeros as
    before and take no space (``fallocate(2)`` PUNCH_HOLE, what ``fallocate
    --dig-holes`` does for the zero blocks it finds).  The runs must hold
    zeros only (:func:`~virt_dup.files.sha256_and_zero_runs` says where):
    the content stays byte for byte the same.  False (and a warning) when the
    file system cannot.  Raises OSError when ``path`` cannot be opened.
    """
    if not runs:
        return True
    fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    descriptor = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for offset, length in runs:
            if fallocate(descriptor, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
                log.warning("cannot make %s sparse: %s", path, os.strerror(ctypes.get_errno()))
                return False
    finally:
        os.close(descriptor)
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


def same_content(image: str, other: str) -> bool:
    """Whether two images show a guest the same bytes (``qemu-img compare``, which
    reads both whole; ``-U``: also while a QEMU holds one).  Raises
    :class:`CommandError` when they cannot be compared."""
    try:
        run_command(["qemu-img", "compare", "-q", "-U", image, other], timeout=QEMU_IMG_TIMEOUT_S)
    except CommandFailed as failure:
        if failure.returncode == 1:
            return False
        raise
    return True


def backing_of(path: str) -> tuple[str | None, str | None]:
    """(backing file string, its format) in ``path``'s header (its chain not opened)."""
    output = run_qemu_img("info", "--output=json", "-U", path)
    try:
        info = json.loads(output)
    except ValueError:
        raise CommandError(f"qemu-img info {path}: unreadable output") from None
    return info.get("backing-filename"), info.get("backing-filename-format")


def apply_changes(top: str, changes: str, timeout_s: float = QEMU_IMG_TIMEOUT_S) -> None:
    """Write the clusters a changed-block file (a qcow2 holding only what changed)
    holds into the qcow2 ``top``: it is made to name ``top`` as its backing file,
    then committed into it.  ``top``'s own backing file is not opened (it may be
    elsewhere or not yet in place): its header is detached for the commit and
    given back as it was.  ``changes`` is left empty of data; the caller deletes it."""
    backing, backing_format = backing_of(top)
    if backing:
        run_qemu_img("rebase", "-u", "-f", "qcow2", "-b", "", top)
    try:
        rebase_unsafe(changes, "qcow2", top, "qcow2")
        run_qemu_img("commit", "-q", "-f", "qcow2", changes, timeout_s=timeout_s)
    finally:
        if backing:
            rebase_unsafe(top, "qcow2", backing, backing_format)


def bitmaps_of(path: str) -> list[str]:
    """The names of the persistent dirty bitmaps in a qcow2 file (not its chain)."""
    output = run_qemu_img("info", "--output=json", "-U", path)
    try:
        data = json.loads(output).get("format-specific", {}).get("data", {})
        return [str(bitmap["name"]) for bitmap in data.get("bitmaps", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CommandError(f"qemu-img info {path}: unreadable output") from None


def remove_bitmap(path: str, name: str) -> None:
    """Delete bitmap ``name`` from a qcow2 no QEMU has open (qemu-img takes the
    image's write lock: one a QEMU holds is refused, not changed)."""
    run_qemu_img("bitmap", "--remove", "-f", "qcow2", path, name)
