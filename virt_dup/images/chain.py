"""Backing chains of disk images, and which of their files a job backs up.

:func:`read_chain` asks ``qemu-img`` for the chain under a disk's top image
(safe while the domain runs).  :func:`select_chain` is the one place where
the job option ``depth`` is decided; it is pure.

Chains are tuples of :class:`ChainFile`, **top first**: ``chain[0]`` is the
image the domain writes to, ``chain[-1]`` the base that has no backing file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from virt_dup.errors import CommandError, ConfigError, NotFoundError
from virt_dup.images.qemu_img import run_qemu_img


@dataclass(frozen=True)
class ChainFile:
    """One image of a backing chain, as its qcow2 header and qemu describe it.

    ``path``: absolute, as qemu resolves it (a relative backing file is taken
    relative to the directory of the image that names it).
    ``backing_file``: the string stored in the header, possibly relative;
    ``None`` for the base.  Sizes are in bytes.  ``real_path``: the file
    itself, no symbolic link on the way (``/var/lib/libvirt/images`` is often
    a link to another file system); empty when it is ``path``.
    """

    path: str
    format: str
    virtual_size: int
    backing_file: str | None
    backing_format: str | None
    actual_size: int
    real_path: str = ""

    @property
    def file(self) -> str:
        """The path of the file itself: what is read, hashed and backed up."""
        return self.real_path or self.path


def read_chain(top: str, image_format: str | None = "qcow2") -> tuple[ChainFile, ...]:
    """The backing chain under ``top``, top first, from ``qemu-img info --backing-chain``.

    Works on images a running domain holds (``-U``: no lock taken).
    ``image_format`` is the format the top image must have (the domain's
    ``<driver type>``); ``None`` lets qemu-img probe it.  Backing files are
    opened in the format their parent's header records.
    Raises :class:`NotFoundError` when ``top`` does not exist and
    :class:`CommandError` when it (or a backing file) is not a readable image.
    """
    path = os.path.abspath(top)
    if not os.path.lexists(path):
        raise NotFoundError(f"disk image {path} does not exist")
    arguments = ["info", "--backing-chain", "--output=json", "-U"]
    if image_format is not None:
        arguments += ["-f", image_format]
    output = run_qemu_img(*arguments, path)
    try:
        entries = json.loads(output)
    except json.JSONDecodeError as error:
        raise CommandError(f"qemu-img info {path}: unreadable JSON output: {error}") from None
    if not isinstance(entries, list) or not entries:
        raise CommandError(f"qemu-img info {path}: no image described in its output")
    return tuple(_chain_file(entry) for entry in entries)


def _chain_file(entry: dict[str, Any]) -> ChainFile:
    path = _resolved(str(entry["filename"]))
    real_path = os.path.realpath(path) if os.path.isabs(path) else path
    return ChainFile(
        path=path,
        real_path="" if real_path == path else real_path,
        format=str(entry["format"]),
        virtual_size=int(entry["virtual-size"]),
        backing_file=entry.get("backing-filename"),
        backing_format=entry.get("backing-filename-format"),
        actual_size=int(entry.get("actual-size", 0)),
    )


def _resolved(filename: str) -> str:
    """qemu joins a relative backing name to its parent's directory (``/d/sub/../x``).

    Collapse that to the clean absolute path, unless a symlinked directory
    makes the clean spelling name another file: then keep qemu's spelling.
    """
    if filename.startswith("json:") or not os.path.isabs(filename):
        return filename
    clean = os.path.normpath(filename)
    if clean != filename:
        try:
            same = os.path.samefile(clean, filename)
        except OSError:
            same = False
        if not same:
            return filename
    return clean


def select_chain(chain: Sequence[ChainFile], depth: int, disk: str) -> tuple[ChainFile, ...]:
    """The files of ``chain`` (top first) that a job with ``depth`` backs up, top first.

    ``chain`` is the disk's chain as it stood when the run began (virt-dup's
    own overlay is never part of it).  The original virt-dup's semantics:

    * ``0``: the whole chain;
    * ``N > 0``: the ``N`` topmost files (``1`` is the top image alone); an
      ``N`` at least as long as the chain selects the whole chain;
    * ``-N``: the whole chain minus its ``N`` bottom-most files (``-1``
      leaves out the base, e.g. a backing store shared with other domains) —
      even when the chain is one image, which then selects nothing.

    Raises :class:`ConfigError` naming ``disk`` and ``depth`` when nothing
    is selected: an empty backup is an error, never a silent success.
    """
    if depth == 0:
        selected = tuple(chain)
    elif depth > 0:
        selected = tuple(chain[:depth])
    else:
        selected = tuple(chain[: max(len(chain) + depth, 0)])
    if not selected:
        layout = " <- ".join(os.path.basename(image.path) for image in reversed(chain))
        raise ConfigError(
            f"depth {depth} selects no file of disk {disk} (chain: {layout or 'empty'})"
        )
    return selected
