"""The duplicity adapter against the real duplicity 3 and gpg, on a file:// backend.

Backups of a few files (not disk images: the adapter does not care, and
these tests stay fast); every restore is compared byte for byte.
duplicity names backup sets by the second, so two backups of one collection
are always a second apart (:func:`next_second`).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import pytest

from virt_dup.config.options import JobOptions
from virt_dup.duplicity.collection import full_is_due
from virt_dup.duplicity.protocol import BackupProgress, BackupStats
from virt_dup.duplicity.runner import Duplicity, find_executable
from virt_dup.duplicity.target import Target
from virt_dup.errors import CommandError

pytestmark = pytest.mark.integration

JOB_UUID = "6d1c1f0e-2b7a-4f0e-8d6a-0c2f4f9b7a31"
duplicity = Duplicity()
SECRET = "s3cret passphrase, never in argv"


@pytest.fixture(autouse=True)
def _duplicity_installed(require: Callable[[bool, str], None]) -> None:
    try:
        find_executable()
    except Exception as error:
        require(False, str(error))


class GpgHome(Protocol):
    """What the ``gpg_home`` fixture (tests/conftest.py) gives."""

    path: Path
    fingerprint: str


def next_second() -> None:
    """Wait for the next whole second: duplicity's backup sets are named by it."""
    time.sleep(1.05 - time.time() % 1)


def make_target(tmp_path: Path, gpg_home: GpgHome | None = None, **changes: object) -> Target:
    values: dict[str, object] = {
        "url": (tmp_path / "backend").as_uri(),
        "archive_dir": tmp_path / "cache" / JOB_UUID,
        "name": JOB_UUID,
        "num_retries": 1,
    }
    if gpg_home is None:
        values["encryption"] = "none"
    else:
        values["encrypt_keys"] = (gpg_home.fingerprint,)
        values["gnupg_home"] = gpg_home.path
    values.update(changes)
    return Target(**values)  # type: ignore[arg-type]


def write_source(root: Path, image: bytes, xml: str) -> dict[str, Path]:
    images = root / "images"
    meta = root / "meta"
    images.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    (images / "vm01.qcow2").write_bytes(image)
    (meta / "domain.xml").write_text(xml)
    return {"image": images / "vm01.qcow2", "xml": meta / "domain.xml"}


def restored(destination: Path, original: Path) -> Path:
    """Where a whole restore put ``original`` (backups are taken from ``/``)."""
    return destination / original.relative_to("/")


def next_is_full(target: Target, full_every: str | None = None, **when: datetime) -> bool:
    """virt-dup's decision (made once, before the backup): full or incremental."""
    return full_is_due(duplicity.collection_status(target), full_every, **when)


def backup(
    target: Target, paths: list[str], runner: Duplicity = duplicity, **options: object
) -> BackupStats:
    """A backup, full or incremental as virt-dup decides it when ``full`` is not given."""
    full = options.pop("full", None)
    if full is None:
        full = full_is_due(runner.collection_status(target), None)
    return runner.backup(target, paths, full=bool(full), **options)  # type: ignore[arg-type]


def test_version_is_3() -> None:
    assert duplicity.version().startswith("3.")


def test_encrypted_full_then_incremental_and_restore_of_each_point(
    tmp_path: Path, gpg_home: GpgHome
) -> None:
    target = make_target(tmp_path, gpg_home)
    first_image = os.urandom(300_000)
    files = write_source(tmp_path / "src", first_image, "<domain>v1</domain>")
    paths = [os.fspath(files["image"]), os.fspath(files["xml"].parent)]
    progress: list[BackupProgress] = []

    assert next_is_full(target, "30D")
    full = duplicity.backup(
        target, paths, full=next_is_full(target, "30D"), progress=progress.append
    )
    assert full.kind == "full"
    assert full.bytes_read >= len(first_image)
    assert full.bytes_uploaded > 0
    assert progress and progress[-1].bytes_read == full.bytes_read
    assert not next_is_full(target, "30D")
    assert next_is_full(target, "30D", now=datetime.now(UTC) + timedelta(days=31))

    next_second()
    second_image = bytearray(first_image)
    second_image[100_000:100_010] = b"0123456789"
    files["image"].write_bytes(second_image)
    files["xml"].write_text("<domain>v2</domain>")
    incremental = duplicity.backup(target, paths, full=next_is_full(target, "30D"))
    assert incremental.kind == "incremental"
    assert incremental.changed_bytes > 0

    collection = duplicity.collection_status(target)
    assert len(collection.chains) == 1
    chain = collection.chains[0]
    assert chain.complete
    assert [backup_set.kind for backup_set in chain.sets] == ["full", "incremental"]
    assert all(backup_set.encrypted for backup_set in chain.sets)
    assert (chain.full.time, chain.incrementals[0].time) == (full.time, incremental.time)
    assert collection.last_full_time == full.time
    assert not any(
        name.endswith((".difftar.gz", ".difftar")) for name in os.listdir(tmp_path / "backend")
    )

    expected = {
        chain.full.id: (first_image, "<domain>v1</domain>"),
        chain.incrementals[0].id: (bytes(second_image), "<domain>v2</domain>"),
    }
    for backup_id, (image, xml) in expected.items():
        destination = tmp_path / f"restore-{backup_id}"
        duplicity.restore(target, destination, time=backup_id)
        assert restored(destination, files["image"]).read_bytes() == image
        assert restored(destination, files["xml"]).read_text() == xml

    # One file, to a path of its own, at a datetime.
    single = tmp_path / "single" / "vm01.qcow2"
    single.parent.mkdir()
    duplicity.restore(target, single, time=chain.full.time, path_to_restore=str(files["image"]))
    assert single.read_bytes() == first_image

    listed = {entry.path: entry for entry in duplicity.list_files(target, time=chain.full.id)}
    image_entry = listed[os.fspath(files["image"]).lstrip("/")]
    assert image_entry.type == "reg"


def test_restore_on_a_fresh_host_needs_only_the_backend(tmp_path: Path, gpg_home: GpgHome) -> None:
    target = make_target(tmp_path, gpg_home)
    image = os.urandom(50_000)
    files = write_source(tmp_path / "src", image, "<domain/>")
    backup(target, [os.fspath(files["image"])])
    fresh = make_target(tmp_path, gpg_home, archive_dir=tmp_path / "new-host-cache" / JOB_UUID)
    assert len(duplicity.collection_status(fresh).chains) == 1
    duplicity.restore(fresh, tmp_path / "out")
    assert restored(tmp_path / "out", files["image"]).read_bytes() == image


def test_unencrypted_backup_and_restore(tmp_path: Path) -> None:
    target = make_target(tmp_path, compression=True)
    image = os.urandom(80_000)
    files = write_source(tmp_path / "src", image, "<domain/>")
    backup(target, [os.fspath(files["image"])])
    names = os.listdir(tmp_path / "backend")
    assert names and not any(name.endswith(".gpg") for name in names)
    assert any(name.endswith(".difftar.gz") for name in names)
    chain = duplicity.collection_status(target).chains[0]
    assert not chain.full.encrypted
    duplicity.restore(target, tmp_path / "out")
    assert restored(tmp_path / "out", files["image"]).read_bytes() == image


def test_compression_can_change_within_a_chain(tmp_path: Path) -> None:
    image = os.urandom(40_000)
    files = write_source(tmp_path / "src", image, "<domain/>")
    backup(make_target(tmp_path, compression=True), [os.fspath(files["image"])])
    next_second()
    files["image"].write_bytes(image[::-1])
    stats = backup(make_target(tmp_path, compression=False), [os.fspath(files["image"])])
    assert stats.kind == "incremental"
    duplicity.restore(make_target(tmp_path), tmp_path / "out")
    assert restored(tmp_path / "out", files["image"]).read_bytes() == image[::-1]


def test_another_set_of_files_is_not_a_source_mismatch(tmp_path: Path) -> None:
    # duplicity exits 42 when the source directory changes; "/" + includes never does.
    target = make_target(tmp_path)
    files = write_source(tmp_path / "src", b"disk", "<domain/>")
    other = tmp_path / "elsewhere" / "vdb.qcow2"
    other.parent.mkdir()
    other.write_bytes(b"second disk")
    backup(target, [os.fspath(files["image"])])
    next_second()
    stats = backup(target, [os.fspath(files["image"]), os.fspath(other)])
    assert stats.kind == "incremental"
    duplicity.restore(target, tmp_path / "out")
    assert restored(tmp_path / "out", other).read_bytes() == b"second disk"


def test_glob_characters_in_a_file_name_are_literal(tmp_path: Path) -> None:
    target = make_target(tmp_path)
    directory = tmp_path / "images"
    directory.mkdir()
    wanted = directory / "vm[1]*?.qcow2"
    wanted.write_bytes(b"wanted")
    (directory / "vm1xy.qcow2").write_bytes(b"matches the glob, not the name")
    backup(target, [os.fspath(wanted)])
    listed = {entry.path for entry in duplicity.list_files(target)}
    assert os.fspath(wanted).lstrip("/") in listed
    assert os.fspath(directory / "vm1xy.qcow2").lstrip("/") not in listed


def test_retention_removes_whole_chains(tmp_path: Path) -> None:
    target = make_target(tmp_path)
    files = write_source(tmp_path / "src", b"", "<domain/>")
    paths = [os.fspath(files["image"])]
    for number in range(3):  # three chains of a full and an incremental
        files["image"].write_bytes(b"full %d" % number)
        assert duplicity.backup(target, paths, full=True).kind == "full"
        next_second()
        files["image"].write_bytes(b"inc %d" % number)
        assert backup(target, paths).kind == "incremental"
        next_second()

    def shape() -> list[int]:
        return [len(chain.sets) for chain in duplicity.collection_status(target).chains]

    assert shape() == [2, 2, 2]
    duplicity.remove_all_inc_of_but_n_full(target, 2)
    assert shape() == [1, 2, 2]
    duplicity.remove_all_but_n_full(target, 2)
    assert shape() == [2, 2]
    duplicity.remove_older_than(target, "1s")  # never the chain of the latest backup
    assert shape() == [2]
    duplicity.restore(target, tmp_path / "out")
    assert restored(tmp_path / "out", files["image"]).read_bytes() == b"inc 2"


def test_apply_retention_from_job_options(tmp_path: Path) -> None:
    target = make_target(tmp_path)
    files = write_source(tmp_path / "src", b"", "<domain/>")
    for number in range(2):
        files["image"].write_bytes(b"full %d" % number)
        duplicity.backup(target, [os.fspath(files["image"])], full=True)
        next_second()
    duplicity.apply_retention(target, JobOptions(full_retention=1, incremental_retention=1))
    assert len(duplicity.collection_status(target).chains) == 1


def test_a_backend_that_is_down_fails_fast_with_one_line(tmp_path: Path) -> None:
    started = time.monotonic()
    target = make_target(tmp_path, url="sftp://nobody@127.0.0.1:1/x")
    with pytest.raises(CommandError) as caught:
        duplicity.collection_status(target)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("duplicity could not reach sftp://nobody@127.0.0.1:1/x: ")
    assert "Unable to connect to port 1 on 127.0.0.1" in message
    assert time.monotonic() - started < 30


def test_an_unusable_file_backend_fails_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    target = make_target(tmp_path, url=(blocker / "backups").as_uri())
    files = write_source(tmp_path / "src", b"x", "<domain/>")
    with pytest.raises(CommandError) as caught:
        backup(target, [os.fspath(files["image"])])
    message = str(caught.value)
    assert "\n" not in message
    # Refused before duplicity runs (which would retry ENOTDIR for minutes).
    assert message == (
        f"cannot use the backend {(blocker / 'backups').as_uri()}: {blocker} is not a directory"
    )


def test_an_unknown_encryption_key_fails_with_one_line(tmp_path: Path, gpg_home: GpgHome) -> None:
    target = make_target(tmp_path, gpg_home, encrypt_keys=("DEADBEEFDEADBEEF",))
    files = write_source(tmp_path / "src", b"x", "<domain/>")
    with pytest.raises(CommandError) as caught:
        backup(target, [os.fspath(files["image"])])
    assert str(caught.value) == (
        f"duplicity backup to {target.url}: encryption failed: gpg: DEADBEEFDEADBEEF: "
        "skipped: No public key; gpg: [stdin]: encryption failed: No public key"
    )


def test_restore_never_overwrites(tmp_path: Path) -> None:
    target = make_target(tmp_path)
    files = write_source(tmp_path / "src", b"x", "<domain/>")
    backup(target, [os.fspath(files["image"])])
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "precious").write_text("keep me")
    with pytest.raises(CommandError, match=r"(?i)will not overwrite.*restore into a new path"):
        duplicity.restore(target, occupied)
    assert (occupied / "precious").read_text() == "keep me"


# --- secrets ------------------------------------------------------------------------------


def recording_duplicity(directory: Path) -> str:
    """A duplicity that writes the argv and environment it was started with."""
    script = directory / "duplicity"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" >> {directory}/argv\n'
        f"env >> {directory}/environ\n"
        f'exec {find_executable()} "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return os.fspath(script)


def test_passphrase_reaches_duplicity_only_through_the_environment(
    tmp_path: Path, gpg_home: GpgHome, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    spy = tmp_path / "spy"
    spy.mkdir()
    executable = recording_duplicity(spy)
    # Symmetric encryption: the passphrase is the key, and duplicity needs it every time.
    target = make_target(tmp_path, gpg_home, encrypt_keys=(), passphrase=SECRET)
    files = write_source(tmp_path / "src", os.urandom(10_000), "<domain/>")
    backup(target, [os.fspath(files["image"])], Duplicity(executable))
    Duplicity(executable).restore(target, tmp_path / "out")
    assert restored(tmp_path / "out", files["image"]).read_bytes() == files["image"].read_bytes()

    wrong = make_target(
        tmp_path,
        gpg_home,
        encrypt_keys=(),
        passphrase=SECRET + " but wrong",
        archive_dir=tmp_path / "other-cache",  # no cached signatures: must decrypt
    )
    with pytest.raises(CommandError) as caught:
        Duplicity(executable).restore(wrong, tmp_path / "out2")
    assert "\n" not in str(caught.value)
    assert SECRET not in str(caught.value)

    argv = (spy / "argv").read_text()
    assert SECRET not in argv
    assert "--encrypt-key" not in argv
    assert f"PASSPHRASE={SECRET}\n" in (spy / "environ").read_text()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "duplicity" in logged
    assert SECRET not in logged


def test_a_password_in_the_backend_url_stays_out_of_argv_and_messages(tmp_path: Path) -> None:
    spy = tmp_path / "spy"
    spy.mkdir()
    target = make_target(tmp_path, url="sftp://nobody:hunter2-pw@127.0.0.1:1/x")
    with pytest.raises(CommandError) as caught:
        Duplicity(recording_duplicity(spy)).collection_status(target)
    assert "hunter2-pw" not in str(caught.value)
    assert "sftp://nobody:***@127.0.0.1:1/x" in str(caught.value)
    assert "hunter2-pw" not in (spy / "argv").read_text()
    assert "FTP_PASSWORD=hunter2-pw\n" in (spy / "environ").read_text()


def test_missing_duplicity_is_one_clear_line(tmp_path: Path) -> None:
    target = make_target(tmp_path)
    with pytest.raises(CommandError, match="no-duplicity is not installed"):
        Duplicity(os.fspath(tmp_path / "no-duplicity")).collection_status(target)
