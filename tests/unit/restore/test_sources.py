"""What a restore with ``restore.require_signature`` refuses before duplicity reads anything.

``BackupSource.check_signable`` on a ``file://`` collection in tmp_path (listed
with ``os.scandir``: no duplicity runs).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from virt_dup.duplicity.target import Target
from virt_dup.restore.sources import BackupSource, SignatureNotVerified

JOB = "0e1f2a3b-1111-4222-8333-444455556666"
KEY = "B2C3AF48EC1B47697BDCF4AC3AD30341F7828B2E"
FULL = "20261126T114449Z"


def source(backend: Path, **changes: object) -> BackupSource:
    values: dict[str, object] = {
        "url": f"file://{backend}/{JOB}",
        "archive_dir": backend.parent / "cache",
        "name": JOB,
        "encrypt_keys": (KEY,),
        "sign_key": KEY,
    }
    values.update(changes)
    target = Target(**values)  # type: ignore[arg-type]
    return BackupSource(JOB, f"file://{backend}", target, require_signature=True)


def collection(backend: Path, *names: str) -> None:
    (backend / JOB).mkdir(parents=True)
    for name in names:
        (backend / JOB / name).write_bytes(b"x")


def test_an_encrypted_collection_can_be_checked(tmp_path: Path) -> None:
    backend = tmp_path / "backend"
    collection(
        backend,
        f"duplicity-full.{FULL}.manifest.gpg",
        f"duplicity-full.{FULL}.vol1.difftar.gpg",
        f"duplicity-full-signatures.{FULL}.sigtar.gpg",
    )
    source(backend).check_signable()


def test_one_plain_file_in_the_collection_is_refused(tmp_path: Path) -> None:
    # duplicity would read it as plain data, with no signature check at all.
    backend = tmp_path / "backend"
    collection(
        backend,
        f"duplicity-full.{FULL}.manifest.gpg",
        f"duplicity-full.{FULL}.vol1.difftar.gpg",
        f"duplicity-full.{FULL}.vol2.difftar.gz",
    )
    with pytest.raises(SignatureNotVerified) as caught:
        source(backend).check_signable()
    message = str(caught.value)
    assert message.startswith(f"job {JOB} on file://{backend}/{JOB}: ")
    assert f"duplicity-full.{FULL}.vol2.difftar.gz is not encrypted, so no signature" in message
    assert "\n" not in message


def test_a_collection_read_without_encryption_is_refused(tmp_path: Path) -> None:
    backend = tmp_path / "backend"
    collection(backend, f"duplicity-full.{FULL}.vol1.difftar.gz")
    with pytest.raises(SignatureNotVerified, match=r"not encrypted .* no signature can verify"):
        source(backend, encryption="none", encrypt_keys=(), sign_key=None).check_signable()
