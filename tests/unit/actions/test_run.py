"""virt_dup.actions.run: what a backup run reports (summary lines, journal details,
status file) and how a failed run carries its cause (message, exit code)."""

from __future__ import annotations

import json

import pytest

from virt_dup.actions.run import RunFailed, RunResult
from virt_dup.errors import (
    EXIT_FAILED,
    EXIT_USAGE,
    ConfigError,
    LibvirtError,
    NotFoundError,
    VirtDupError,
)

JOB = "11111111-2222-4333-8444-555555555555"


def run_result(**fields: object) -> RunResult:
    return RunResult(JOB, "vm01", **fields)  # type: ignore[arg-type]


def test_a_full_backup_success_line() -> None:
    result = run_result(
        full=True, disks=["vda", "vdb"], bytes_read=10_485_760, bytes_uploaded=2_097_152
    )
    result.result = "success"
    result.duration_seconds = 12.34
    assert result.summary() == (
        f"job {JOB} of domain vm01: full backup of vda, vdb done in 12.3 s, "
        "10.5MB read, 2.10MB uploaded"
    )


def test_an_incremental_backup_success_line() -> None:
    result = run_result(full=False, disks=["sda"], bytes_read=5, bytes_uploaded=0)
    result.result = "success"
    result.duration_seconds = 0.04
    assert result.summary() == (
        f"job {JOB} of domain vm01: incremental backup of sda done in 0.0 s, 5B read, 0B uploaded"
    )


def test_a_failure_line_names_the_job_domain_and_message() -> None:
    result = run_result(full=True, disks=["vda"])
    result.finish("failed", "duplicity ended with exit code 23")
    assert result.summary() == (
        f"job {JOB} of domain vm01: failed: duplicity ended with exit code 23"
    )


def test_a_skipped_line_says_why() -> None:
    result = run_result()
    result.finish("skipped", "domain vm01 is shut off (disable_if_powered_off)")
    assert result.summary() == (
        f"job {JOB} of domain vm01: skipped: domain vm01 is shut off (disable_if_powered_off)"
    )


@pytest.mark.parametrize(("full", "kind"), [(True, "full"), (False, "incremental"), (None, None)])
def test_kind(full: bool | None, kind: str | None) -> None:
    assert run_result(full=full).kind == kind


def test_details_of_a_backup() -> None:
    result = run_result(full=False, disks=["vda", "vdb"], bytes_read=7, bytes_uploaded=3)
    assert result.details() == {
        "BACKUP_TYPE": "incremental",
        "DISKS": "vda,vdb",
        "BYTES_READ": 7,
        "BYTES_UPLOADED": 3,
        "BYTES_HASHED": 0,
        "READ": "whole",
        "READ_REASON": None,
    }


def test_details_before_the_plan_leave_out_type_and_disks() -> None:
    """None is what record() leaves out: a run that failed before choosing disks."""
    details = run_result().details()
    assert details["BACKUP_TYPE"] is None
    assert details["DISKS"] is None
    assert details["BYTES_READ"] == 0
    assert details["BYTES_UPLOADED"] == 0
    assert RunResult.ACTION == "backup"


def test_as_status_has_the_status_file_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVOCATION_ID", "f" * 32)
    result = run_result(
        full=True,
        disks=["vda"],
        bytes_read=100,
        bytes_uploaded=50,
        backup_time="2026-11-26T12:00:00+00:00",
    )
    result.finish("success", "backed up vda to file:///backup")
    status = result.as_status()
    assert set(status) == {
        "destinations",
        "job_uuid",
        "domain",
        "result",
        "message",
        "duration_seconds",
        "finished",
        "invocation_id",
        "full",
        "disks",
        "bytes_read",
        "bytes_uploaded",
        "bytes_hashed",
        "read",
        "read_reason",
        "backup_time",
    }
    assert json.loads(json.dumps(status)) == status
    assert status["job_uuid"] == JOB
    assert status["domain"] == "vm01"
    assert status["result"] == "success"
    assert status["full"] is True
    assert status["disks"] == ["vda"]
    assert status["invocation_id"] == "f" * 32
    assert status["backup_time"] == "2026-11-26T12:00:00+00:00"


def test_as_status_does_not_share_the_disk_list() -> None:
    result = run_result(disks=["vda"])
    status = result.as_status()
    status["disks"].append("vdb")
    assert result.disks == ["vda"]


def test_run_failed_message_names_job_domain_and_cause() -> None:
    result = run_result()
    cause = LibvirtError("cannot read the state of domain vm01: connection reset")
    failed = RunFailed(result, cause)
    assert str(failed) == (
        f"job {JOB} of domain vm01: cannot read the state of domain vm01: connection reset"
    )
    assert failed.result is result
    assert isinstance(failed, VirtDupError)


@pytest.mark.parametrize(
    ("cause", "code"),
    [
        (ConfigError("virt-dup.yml: backends.x: unknown backend"), EXIT_USAGE),
        (NotFoundError("no job x"), EXIT_USAGE),
        (VirtDupError("duplicity failed"), EXIT_FAILED),
        (LibvirtError("libvirt failed"), EXIT_FAILED),
    ],
)
def test_run_failed_exit_code_is_the_causes(cause: VirtDupError, code: int) -> None:
    failed = RunFailed(run_result(), cause)
    assert failed.exit_code == code


def test_a_config_error_cause_gives_exit_code_2() -> None:
    failed = RunFailed(run_result(), ConfigError("bad option"))
    assert failed.exit_code == 2
    assert RunFailed.exit_code == EXIT_FAILED  # only this instance takes the cause's code
