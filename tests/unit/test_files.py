"""virt_dup.files: atomic writes (content, exact modes, no temporary left behind, the
old file kept when a write fails), SHA-256 of files larger than one read, and
SIGTERM/SIGINT turned into Interrupted inside an interruptible() section."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytest

from virt_dup import files
from virt_dup.errors import VirtDupError


@contextmanager
def umask(value: int) -> Iterator[None]:
    """Run the block under ``value`` as the process's umask, then restore the old one."""
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def entries(directory: Path) -> set[str]:
    return {entry.name for entry in directory.iterdir()}


# -- write_atomically -----------------------------------------------------------------
def test_write_atomically_writes_the_text(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    text = '{"result": "success"}\nzweite Zeile: äöü €\n'
    files.write_atomically(target, text)
    assert target.read_text(encoding="utf-8") == text
    assert entries(tmp_path) == {"status.json"}


@pytest.mark.parametrize("mask", [0o077, 0o027, 0o022, 0o000])
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o666])
def test_the_file_gets_exactly_mode_whatever_the_umask(
    tmp_path: Path, mask: int, mode: int
) -> None:
    target = tmp_path / "file"
    with umask(mask):
        files.write_atomically(target, "x", mode)
    assert mode_of(target) == mode


def test_the_default_mode_is_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    with umask(0o000):
        files.write_atomically(target, "{}")
    assert mode_of(target) == 0o600


def test_a_replaced_file_gets_the_new_mode_not_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("old")
    target.chmod(0o666)
    files.write_atomically(target, "new", 0o600)
    assert mode_of(target) == 0o600
    assert target.read_text() == "new"


def test_an_existing_file_is_replaced_by_a_new_one_not_rewritten(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_text("old contents, longer than the new ones")
    with target.open() as reader:  # a reader that opened the old file...
        files.write_atomically(target, "new")
        assert reader.read() == "old contents, longer than the new ones"  # ...still sees it
    assert target.read_text() == "new"
    assert entries(tmp_path) == {"manifest.json"}


def test_missing_parents_are_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c" / "file"
    files.write_atomically(target, "deep")
    assert target.read_text() == "deep"


def test_a_missing_parent_gets_directory_mode(tmp_path: Path) -> None:
    target = tmp_path / "state" / "file"
    with umask(0o022):
        files.write_atomically(target, "x", directory_mode=0o700)
    assert mode_of(tmp_path / "state") == 0o700


def test_an_existing_parent_keeps_its_mode(tmp_path: Path) -> None:
    parent = tmp_path / "units"
    parent.mkdir()
    parent.chmod(0o751)
    files.write_atomically(parent / "file", "x", directory_mode=0o700)
    assert mode_of(parent) == 0o751


def test_every_missing_parent_gets_directory_mode(tmp_path: Path) -> None:
    target = tmp_path / "private" / "state" / "file"
    with umask(0o022):
        files.write_atomically(target, "x", directory_mode=0o700)
    assert mode_of(tmp_path / "private" / "state") == 0o700
    assert mode_of(tmp_path / "private") == 0o700


def test_a_missing_parent_gets_directory_mode_under_a_restrictive_umask(tmp_path: Path) -> None:
    target = tmp_path / "system" / "virt-dup@.service"
    with umask(0o077):
        files.write_atomically(target, "[Unit]\n", 0o644, directory_mode=0o755)
    assert mode_of(tmp_path / "system") == 0o755


def test_no_temporary_file_is_left_after_a_write(tmp_path: Path) -> None:
    for number in range(3):
        files.write_atomically(tmp_path / "file", f"version {number}")
    assert entries(tmp_path) == {"file"}


def test_writing_over_a_directory_fails_and_leaves_it_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "inside").write_text("kept")
    with pytest.raises(OSError):
        files.write_atomically(target, "text")
    assert target.is_dir()
    assert (target / "inside").read_text() == "kept"
    assert entries(tmp_path) == {"target"}


def test_text_that_cannot_be_encoded_leaves_the_old_file_and_no_temporary(
    tmp_path: Path,
) -> None:
    target = tmp_path / "file"
    target.write_text("old")
    target.chmod(0o640)
    with pytest.raises(UnicodeEncodeError):
        files.write_atomically(target, "new \udcff text", 0o600)
    assert target.read_text() == "old"
    assert mode_of(target) == 0o640
    assert entries(tmp_path) == {"file"}


# -- sha256_file ----------------------------------------------------------------------
def test_sha256_file_of_a_file_larger_than_one_read(tmp_path: Path) -> None:
    data = os.urandom(2 * files._HASH_CHUNK + 12345)
    path = tmp_path / "disk.qcow2"
    path.write_bytes(data)
    assert path.stat().st_size > files._HASH_CHUNK
    assert files.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert files.sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_sha256_file_of_an_exact_multiple_of_the_chunk_and_of_an_empty_file(
    tmp_path: Path,
) -> None:
    data = b"\x00\x01" * files._HASH_CHUNK  # exactly two chunks
    (tmp_path / "two").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert files.sha256_file(tmp_path / "two") == hashlib.sha256(data).hexdigest()
    assert files.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_sha256_file_sees_a_change_in_the_last_chunk(tmp_path: Path) -> None:
    data = bytearray(files._HASH_CHUNK + 10)
    path = tmp_path / "disk"
    path.write_bytes(bytes(data))
    before = files.sha256_file(path)
    data[-1] = 1
    path.write_bytes(bytes(data))
    assert files.sha256_file(path) != before


# -- sha256_files ---------------------------------------------------------------------
def _images(directory: Path, count: int) -> list[str]:
    paths = []
    for number in range(count):
        path = directory / f"disk{number}.qcow2"
        path.write_bytes(os.urandom(1000 + number))
        paths.append(str(path))
    return paths


def _hashed_meeting(readers: int) -> tuple[list[str], object]:
    """A hash function whose calls wait for ``readers`` of them to be under way at
    once: read one after the other, the first call fails (a broken barrier)."""
    meeting = threading.Barrier(readers, timeout=10)
    order: list[str] = []

    def hash_file(path: str) -> str:
        meeting.wait()
        order.append(path)
        return files.sha256_file(path)

    return order, hash_file


def _expected(paths: list[str]) -> dict[str, str]:
    return {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths}


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: one reader")
def test_files_on_a_disk_that_does_not_spin_are_read_side_by_side(tmp_path: Path) -> None:
    paths = _images(tmp_path, 2)
    _order, hash_file = _hashed_meeting(2)
    digests = files.sha256_files(paths, hash_file, spinning=lambda _device: False)
    assert digests == _expected(paths)
    assert list(digests) == paths  # in the order asked
    _order, hash_file = _hashed_meeting(2)
    assert files.sha256_files(iter(paths), hash_file, spinning=lambda _d: False) == digests


def test_files_on_one_spinning_disk_are_read_one_after_the_other(tmp_path: Path) -> None:
    paths = _images(tmp_path, 3)
    under_way: list[int] = [0]
    most: list[int] = [0]
    lock = threading.Lock()

    def hash_file(path: str) -> str:
        with lock:
            under_way[0] += 1
            most[0] = max(most[0], under_way[0])
        time.sleep(0.05)
        with lock:
            under_way[0] -= 1
        return files.sha256_file(path)

    assert files.sha256_files(paths, hash_file, spinning=lambda _device: True) == _expected(paths)
    assert most[0] == 1


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: one reader")
def test_files_on_two_spinning_disks_are_read_side_by_side(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system beside the temporary directory")
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        paths = [*_images(tmp_path, 1), *_images(other, 1)]
        _order, hash_file = _hashed_meeting(2)
        digests = files.sha256_files(paths, hash_file, spinning=lambda _device: True)
        assert digests == _expected(paths)
    finally:
        shutil.rmtree(other)


def test_the_first_failing_file_is_the_error_and_a_file_named_twice_is_read_once(
    tmp_path: Path,
) -> None:
    paths = _images(tmp_path, 3)
    calls: list[str] = []

    def hash_file(path: str) -> str:
        calls.append(path)
        if path != paths[0]:
            raise OSError(5, "Input/output error", path)
        return files.sha256_file(path)

    with pytest.raises(OSError) as raised:
        files.sha256_files([paths[0], paths[1], paths[2]], hash_file, spinning=lambda _d: False)
    assert raised.value.filename in paths[1:]
    calls.clear()
    assert files.sha256_files([paths[0], paths[0]], hash_file) == _expected(paths[:1])
    assert calls == [paths[0]]


def test_the_kernel_says_which_disks_spin() -> None:
    assert files.spins(os.makedev(0, 4242)) is True  # no block device: as before, one by one
    root = os.stat("/").st_dev
    listed = subprocess.run(
        ["lsblk", "--nodeps", "--noheadings", "--raw", "--output", "MAJ:MIN,ROTA"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    rows = dict(line.split() for line in listed if len(line.split()) == 2)
    flag = rows.get(f"{os.major(root)}:{os.minor(root)}")
    if flag not in ("0", "1"):
        pytest.skip("/ is not on a whole disk that lsblk lists")
    assert files.spins(root) is (flag == "1")


# -- sha256_and_zero_runs -------------------------------------------------------------
def zero_runs_by_hand(data: bytes, block_size: int) -> list[tuple[int, int]]:
    """The whole zero blocks of ``data``, merged into runs: block by block, slowly."""
    runs: list[tuple[int, int]] = []
    for offset in range(0, len(data) - block_size + 1, block_size):
        if data[offset : offset + block_size] == bytes(block_size):
            if runs and sum(runs[-1]) == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + block_size)
            else:
                runs.append((offset, block_size))
    return runs


def test_sha256_and_zero_runs_finds_the_aligned_zero_blocks_in_one_read(tmp_path: Path) -> None:
    chunk, window = files._HASH_CHUNK, files._ZERO_WINDOW
    data = bytearray(os.urandom(2 * chunk + 5000))
    for start, length in (
        (0, 8192),  # two aligned blocks at the start
        (10000, 6000),  # zeros, but no whole aligned block
        (20000, 8292),  # one whole block inside unaligned zeros
        (3 * window, 2 * window),  # whole windows
        (3 * window - 4096, 4096),  # a block just before them: one run
        (chunk - 8192, 12288),  # across the boundary of two reads: one run
        (2 * chunk, 5000),  # the last whole block, then a partial one (never a run)
    ):
        data[start : start + length] = bytes(length)
    path = tmp_path / "disk.qcow2"
    path.write_bytes(bytes(data))
    digest, runs = files.sha256_and_zero_runs(path)
    assert digest == hashlib.sha256(data).hexdigest()
    assert runs == zero_runs_by_hand(bytes(data), 4096)
    assert (3 * window - 4096, 2 * window + 4096) in runs
    assert (chunk - 8192, 12288) in runs
    assert runs[-1] == (2 * chunk, 4096)
    assert (10000 // 4096 * 4096, 4096) not in runs


def test_sha256_and_zero_runs_of_random_zero_and_empty_files(tmp_path: Path) -> None:
    random_data = os.urandom(files._HASH_CHUNK + 4096)
    (tmp_path / "random").write_bytes(random_data)
    (tmp_path / "zeros").write_bytes(bytes(files._HASH_CHUNK + 4096 + 100))
    (tmp_path / "empty").write_bytes(b"")
    assert files.sha256_and_zero_runs(tmp_path / "random") == (
        hashlib.sha256(random_data).hexdigest(),
        [],
    )
    _digest, runs = files.sha256_and_zero_runs(tmp_path / "zeros")
    assert runs == [(0, files._HASH_CHUNK + 4096)]
    assert files.sha256_and_zero_runs(tmp_path / "empty") == (hashlib.sha256(b"").hexdigest(), [])


@pytest.mark.parametrize("block_size", [512, 65536, 1 << 20])
def test_sha256_and_zero_runs_in_other_block_sizes(tmp_path: Path, block_size: int) -> None:
    data = bytearray(os.urandom(files._HASH_CHUNK + 3 * block_size))
    for start in (block_size, 5 * block_size + 1, files._HASH_CHUNK - block_size):
        data[start : start + 2 * block_size] = bytes(2 * block_size)
    (tmp_path / "disk").write_bytes(bytes(data))
    digest, runs = files.sha256_and_zero_runs(tmp_path / "disk", block_size)
    assert digest == hashlib.sha256(data).hexdigest()
    assert runs == zero_runs_by_hand(bytes(data), block_size)
    assert runs


@pytest.mark.parametrize("block_size", [0, 3000, 8 << 20])
def test_sha256_and_zero_runs_refuses_a_block_size_that_does_not_divide_a_read(
    tmp_path: Path, block_size: int
) -> None:
    (tmp_path / "disk").write_bytes(b"x")
    with pytest.raises(ValueError, match="block size"):
        files.sha256_and_zero_runs(tmp_path / "disk", block_size)


# -- interruptible --------------------------------------------------------------------
@pytest.fixture
def received() -> Iterator[list[int]]:
    """Handlers of our own for SIGTERM and SIGINT (they record the signal), so that a
    test can tell they come back and a stray signal never stops pytest."""
    caught: list[int] = []

    def note(number: int, _frame: FrameType | None) -> None:
        caught.append(number)

    originals = {number: signal.signal(number, note) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for number, handler in originals.items():
            signal.signal(number, handler)


def send_to_self(number: int) -> None:
    os.kill(os.getpid(), number)
    time.sleep(10)  # the handler raises at the latest here (the sleep is cut short)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_the_block_raises_interrupted(
    received: list[int], number: signal.Signals
) -> None:
    started = time.monotonic()
    with (
        pytest.raises(files.Interrupted) as caught,
        files.interruptible("merging overlays back"),
    ):
        send_to_self(number)
    assert str(caught.value) == f"stopped by {number.name}; merging overlays back"
    assert isinstance(caught.value, VirtDupError)  # recorded() makes the outcome "failed"
    assert time.monotonic() - started < 5
    assert received == []  # our handler did not see it: the section's did


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_the_previous_handlers_come_back_after_an_interruption(
    received: list[int], number: signal.Signals
) -> None:
    before = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(files.Interrupted), files.interruptible("the restore was undone"):
        assert signal.getsignal(number) is not before[number]
        send_to_self(number)
    assert {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)} == before
    os.kill(os.getpid(), number)  # really back: the signal reaches our handler again
    assert received == [number]


def test_the_previous_handlers_come_back_after_a_normal_end(received: list[int]) -> None:
    before = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    with files.interruptible("nothing"):
        pass
    assert {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)} == before
    os.kill(os.getpid(), signal.SIGTERM)
    assert received == [signal.SIGTERM]


def test_a_finally_inside_the_block_runs(received: list[int]) -> None:
    ran: list[str] = []
    with pytest.raises(files.Interrupted), files.interruptible("merging overlays back"):
        try:
            send_to_self(signal.SIGTERM)
            ran.append("after the signal")  # never reached
        finally:
            ran.append("finally")
    assert ran == ["finally"]
    assert received == []


def test_sigterm_from_another_process_lets_the_cleanup_run() -> None:
    """What systemd stopping a unit does: the process ends through its finally blocks."""
    program = (
        "import sys, time\n"
        "from virt_dup.files import Interrupted, interruptible\n"
        "try:\n"
        "    with interruptible('merging overlays back'):\n"
        "        try:\n"
        "            print('ready', flush=True)\n"
        "            time.sleep(30)\n"
        "        finally:\n"
        "            print('cleanup', flush=True)\n"
        "except Interrupted as error:\n"
        "    print(error, flush=True)\n"
        "    sys.exit(3)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        output, _ = child.communicate(timeout=20)
    assert child.returncode == 3
    assert output == "cleanup\nstopped by SIGTERM; merging overlays back\n"
