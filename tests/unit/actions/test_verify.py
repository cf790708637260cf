"""virt_dup.actions.verify: where the scratch directory goes, and what a verification
reports (success and failure lines, journal details)."""

from __future__ import annotations

import pytest

from virt_dup.actions.verify import DEFAULT_SCRATCH_PARENT, VerifyResult, scratch_parent

JOB = "66666666-7777-4888-9999-aaaaaaaaaaaa"


def test_scratch_parent_explicit_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", "/srv/tmp")
    assert scratch_parent("/mnt/scratch") == "/mnt/scratch"


def test_scratch_parent_from_tmpdir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", "/srv/tmp")
    assert scratch_parent(None) == "/srv/tmp"


def test_scratch_parent_defaults_to_var_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TMPDIR", raising=False)
    assert scratch_parent(None) == "/var/tmp"
    assert DEFAULT_SCRATCH_PARENT == "/var/tmp"  # on disk, not a RAM-backed /tmp


def test_an_empty_tmpdir_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", "")
    assert scratch_parent(None) == "/var/tmp"


def test_verify_success_line() -> None:
    result = VerifyResult(JOB, "vm01", backup_id="20261126T120000Z", files=3, bytes=3 << 20)
    result.result = "success"
    result.duration_seconds = 4.26
    assert result.summary() == (
        f"verified backup 20261126T120000Z of job {JOB} (domain vm01): 3 file(s), 3.15MB, "
        "checksums equal, qemu-img check clean, in 4.3 s"
    )


def test_verify_failure_line() -> None:
    result = VerifyResult(JOB, "vm01", backup_id="20261126T120000Z")
    result.finish("failed", "vda.qcow2: SHA-256 abc differs from the def recorded")
    assert result.summary() == (
        f"verification of backup 20261126T120000Z of job {JOB} (domain vm01) FAILED: "
        "vda.qcow2: SHA-256 abc differs from the def recorded"
    )


def test_verify_failure_before_a_backup_was_chosen() -> None:
    result = VerifyResult(JOB)
    result.finish("failed", "no backup")
    assert result.summary() == (
        f"verification of backup ? of job {JOB} (domain ?) FAILED: no backup"
    )


def test_verify_details() -> None:
    result = VerifyResult(JOB, "vm01", backup_id="B1", files=2, bytes=12345)
    assert result.details() == {"BACKUP_ID": "B1", "BYTES_RESTORED": 12345}
    assert VerifyResult.ACTION == "verify"


def test_verify_status_keeps_the_warnings() -> None:
    result = VerifyResult(JOB, "vm01", warnings=["vda.qcow2: 2 leaked clusters"])
    result.finish("success")
    status = result.as_status()
    assert status["warnings"] == ["vda.qcow2: 2 leaked clusters"]
    assert status["backup_id"] == "?"
    assert not [name for name in status if name.startswith("_")]
