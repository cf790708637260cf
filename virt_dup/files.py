"""Files written so that a crash never leaves half of one, their checksums, and
sections of code that a SIGTERM must not cut short.

* :func:`write_atomically`: readers see the old file or the new one, never
  half (temporary file, fsync, rename, fsync of the directory);
* :func:`sha256_file`: the checksum a manifest records and a restore checks;
* :func:`interruptible`: SIGTERM/SIGINT (systemd stopping a unit, its start
  timeout, Ctrl-C) become :class:`Interrupted`, so ``finally`` blocks and
  ``except`` handlers run: a backup merges its overlays back, a restore
  takes back what it did; :func:`signals_deferred` holds them back while
  that runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from virt_dup.errors import VirtDupError

logger = logging.getLogger(__name__)

#: Bytes read at a time when hashing a disk image.
_HASH_CHUNK = 4 << 20


class Interrupted(VirtDupError):
    """SIGTERM or SIGINT arrived inside an :func:`interruptible` section."""


class FileError(VirtDupError):
    """A file virt-dup needs could not be written or read (a full or broken disk)."""


@contextlib.contextmanager
def file_errors_reported() -> Iterator[None]:
    """An :class:`OSError` in the block becomes a :class:`FileError`: one line
    naming the file and the reason, reported like every other failure."""
    try:
        yield
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        raise FileError(f"{where}{error.strerror or error}") from error


def write_atomically(
    path: Path, text: str, mode: int = 0o600, *, directory_mode: int = 0o700
) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, never half.

    Missing parent directories are created with ``directory_mode``; the file
    gets ``mode``.  The data and the rename are on disk when this returns.
    Raises OSError.
    """
    make_directories(path.parent, directory_mode)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            os.fchmod(stream.fileno(), mode)  # O_CREAT's mode is cut by the umask
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def make_directories(directory: Path, mode: int) -> None:
    """Create ``directory`` and its missing parents, each with exactly ``mode``
    (whatever the umask); existing directories are left as they are."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another writer
            each.mkdir(mode=mode)
            os.chmod(each, mode)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's contents, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def interruptible(consequence: str) -> Iterator[None]:
    """Turn SIGTERM/SIGINT into :class:`Interrupted` for the duration of the block.

    ``consequence`` ends the message: ``stopped by SIGTERM; <consequence>``
    (what the caller does about it, e.g. "merging overlays back").  The
    previous handlers come back afterwards.
    """

    def interrupt(number: int, _frame: FrameType | None) -> None:
        raise Interrupted(f"stopped by {signal.Signals(number).name}; {consequence}")

    previous = {
        number: signal.signal(number, interrupt) for number in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def signals_deferred(consequence: str) -> Iterator[None]:
    """Hold SIGTERM/SIGINT back for the duration of the block (a merge must not be
    cut short); one that came meanwhile raises :class:`Interrupted` afterwards,
    ``stopped by SIGTERM; <consequence>``."""
    arrived: list[int] = []

    def note(number: int, _frame: FrameType | None) -> None:
        arrived.append(number)
        logger.warning("%s arrived; it waits until the merge is done", signal.Signals(number).name)

    previous = {number: signal.signal(number, note) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if arrived:
        raise Interrupted(f"stopped by {signal.Signals(arrived[0]).name}; {consequence}")


def human_size(size: int | float) -> str:
    """A byte count as people read it (``8.50GB``, ``231MB``, ``999B``): tqdm's
    formatter, the one its progress bars use, in decimal units (kB = 1000 B) so
    that every label means what it says.  Below 1 kB, whole bytes (tqdm would
    say ``5.00B``)."""
    if abs(size) < 1000:
        return f"{size:.0f}B"
    from tqdm import tqdm  # only when shown: importing it costs ~0.1 s

    return str(tqdm.format_sizeof(size, "B", 1000))
