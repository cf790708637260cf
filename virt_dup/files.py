"""Files written so that a crash never leaves half of one, their checksums, and
sections of code that a SIGTERM must not cut short.

* :func:`write_atomically`: readers see the old file or the new one, never
  half (temporary file, fsync, rename, fsync of the directory);
* :func:`sha256_file`: the checksum a manifest records and a restore checks;
  :func:`sha256_files` hashes several, side by side where the disks allow it;
  :func:`sha256_and_zero_runs` also says where the file holds whole zero
  blocks, in the same read (a restore makes them holes again);
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
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType

from virt_dup.errors import VirtDupError

logger = logging.getLogger(__name__)

#: Bytes read at a time when hashing a disk image.
_HASH_CHUNK = 4 << 20
#: Pieces of a read chunk looked at as a whole before block by block.
_ZERO_WINDOW = 64 << 10


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


def sha256_files(
    paths: Iterable[str],
    hash_file: Callable[[str], str] = sha256_file,
    *,
    spinning: Callable[[int], bool] | None = None,
) -> dict[str, str]:
    """``hash_file`` of each of ``paths`` (by path, in their order), several read
    side by side where that is faster: files on different devices, and files on
    one device that does not spin (the kernel's ``queue/rotational``; a spinning
    disk would seek between them, so its files are read one after the other);
    at most one reader per CPU.  ``spinning(st_dev)``: :func:`spins` unless given.

    Raises the error of the first file (in ``paths`` order) that failed.
    """
    spinning = spinning or spins
    ordered = list(dict.fromkeys(paths))  # read once: ``paths`` may be an iterator
    queues: dict[object, list[str]] = {}
    for path in ordered:
        device = os.stat(path).st_dev
        queues.setdefault(device if spinning(device) else path, []).append(path)
    readers = min(len(queues), os.cpu_count() or 1)
    if readers <= 1:
        return {path: hash_file(path) for path in ordered}
    digests: dict[str, str] = {}
    errors: dict[str, BaseException] = {}
    pending = list(queues.values())
    lock = threading.Lock()

    def read() -> None:
        while True:
            with lock:
                if not pending or errors:
                    return
                queue = pending.pop(0)
            for path in queue:
                try:
                    digest = hash_file(path)
                except BaseException as error:  # raised in the caller's thread
                    with lock:
                        errors[path] = error
                    return
                with lock:
                    digests[path] = digest

    # Daemon threads: an interrupted caller (SIGTERM) goes on to merge its
    # overlays at once; a read under way ends with the process.
    threads = [
        threading.Thread(target=read, name=f"sha256 {number}", daemon=True)
        for number in range(readers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for path in ordered:
        if path in errors:
            raise errors[path]
    return {path: digests[path] for path in ordered}


def rotational_flag(device: int) -> Path | None:
    """The kernel's ``queue/rotational`` file of the disk that holds ``device`` (a
    file's ``st_dev``; a partition's is its disk's); None: no block device."""
    base = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for flag in (base / "queue" / "rotational", base / ".." / "queue" / "rotational"):
        if flag.exists():
            return flag
    return None


def spins(device: int) -> bool:
    """Whether the disk that holds ``device`` (a file's ``st_dev``) spins, as the
    kernel says (:func:`rotational_flag`).  A file system on no block device
    (tmpfs, NFS, btrfs' own device numbers) or one the kernel says nothing about
    counts as spinning: its files are read one after the other, as always."""
    flag = rotational_flag(device)
    try:
        return flag is None or flag.read_text().strip() != "0"
    except OSError:
        return True


def sha256_and_zero_runs(
    path: str | os.PathLike[str], block_size: int = 4096
) -> tuple[str, list[tuple[int, int]]]:
    """The SHA-256 of a file's contents (hex), and where it holds whole zero blocks:
    (offset, length) runs of ``block_size``-aligned blocks of zeros only, in
    file order, adjacent blocks merged; a partial block at the end is never
    part of one.  One read of the file for both.

    ``block_size``: a power of two of at most 4 MiB (the file system's block,
    the unit in which it can make holes).  Raises OSError.
    """
    if block_size <= 0 or _HASH_CHUNK % block_size:
        raise ValueError(f"block size {block_size} does not divide {_HASH_CHUNK}")
    digest = hashlib.sha256()
    runs: list[tuple[int, int]] = []
    offset = 0
    with open(path, "rb") as stream:
        while block := stream.read(_HASH_CHUNK):
            digest.update(block)
            _add_zero_runs(block, offset, block_size, runs)
            offset += len(block)
    return digest.hexdigest(), runs


def _add_zero_runs(data: bytes, offset: int, block_size: int, runs: list[tuple[int, int]]) -> None:
    """Append the whole zero blocks of ``data`` (at file ``offset``, a multiple of
    ``block_size``) to ``runs``.  Data without a single zero block (the usual
    case) costs one search; a window of zeros only, one comparison."""
    zero_block = bytes(block_size)
    if data.find(zero_block) == -1:
        return
    window = max(_ZERO_WINDOW, block_size)
    zero_window = bytes(window)
    for start in range(0, len(data) - block_size + 1, window):
        piece = data[start : start + window]
        whole = len(piece) - len(piece) % block_size
        if piece[:whole] == zero_window[:whole]:
            _add_run(runs, offset + start, whole)
        elif piece.find(zero_block) != -1:
            for inner in range(0, whole, block_size):
                if piece[inner : inner + block_size] == zero_block:
                    _add_run(runs, offset + start + inner, block_size)


def _add_run(runs: list[tuple[int, int]], offset: int, length: int) -> None:
    if runs and sum(runs[-1]) == offset:
        runs[-1] = (runs[-1][0], runs[-1][1] + length)
    else:
        runs.append((offset, length))


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
