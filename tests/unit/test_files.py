"""virt_dup.files: atomic writes (content, exact modes, no temporary left behind, the
old file kept when a write fails), SHA-256 of files larger than one read, and
SIGTERM/SIGINT turned into Interrupted inside an interruptible() section."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
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
