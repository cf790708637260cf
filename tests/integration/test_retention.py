"""Retention after ``virt-dup run``: which chains and incrementals survive.

Several full (``run --full``) and incremental runs of one job on a small
domain; after each, duplicity's own ``collection-status`` (read with a
cache of the test's own) says what is left on the backend.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest
from harness.backups import BackupEnvironment

pytestmark = pytest.mark.integration


@pytest.fixture
def environment(tmp_path: Path, gpg_home) -> BackupEnvironment:
    return BackupEnvironment.create(tmp_path, gpg_home.path, gpg_home.fingerprint)


def layout(environment: BackupEnvironment, job: str) -> list[str]:
    """The chains oldest first, each as its sets: ``["FI", "F"]``."""
    return [
        "".join("F" if backup_set.kind == "full" else "I" for backup_set in chain.sets)
        for chain in environment.collection(job).chains
    ]


def full_times(environment: BackupEnvironment, job: str) -> list[datetime]:
    return [chain.full.time for chain in environment.collection(job).chains]


def run(environment: BackupEnvironment, job: str, full: bool = False) -> None:
    # Back to back: virt-dup itself keeps two backup sets out of one second.
    environment.virt_dup("run", *(["--full"] if full else []), job)


def test_full_and_incremental_retention(make_domain, environment) -> None:
    """full_retention=2 keeps the last two chains; incremental_retention=1 keeps
    the incrementals of the newest chain only."""
    vm = make_domain(chain=["base", "vm"])
    job = environment.virt_dup(
        "add-job", vm.name, "--full-retention", "2", "--incremental-retention", "1"
    ).stdout.strip()

    run(environment, job)
    run(environment, job)
    assert layout(environment, job) == ["FI"]
    run(environment, job, full=True)
    assert layout(environment, job) == ["F", "F"]  # the older chain lost its incremental
    second_full = full_times(environment, job)[1]
    run(environment, job)
    assert layout(environment, job) == ["F", "FI"]
    run(environment, job, full=True)
    assert layout(environment, job) == ["F", "F"]  # the first chain is gone
    assert full_times(environment, job)[0] == second_full


def test_max_age_never_removes_the_chain_the_last_backup_needs(make_domain, environment) -> None:
    vm = make_domain(chain=["base", "vm"])
    job = environment.virt_dup(
        "add-job",
        vm.name,
        "--max-age",
        "1s",
        "--full-retention",
        "10",
        "--incremental-retention",
        "10",
    ).stdout.strip()

    run(environment, job)
    assert layout(environment, job) == ["F"]
    time.sleep(1)
    run(environment, job)  # the full is older than max_age, but this incremental needs it
    assert layout(environment, job) == ["FI"]
    time.sleep(1)
    run(environment, job, full=True)  # now the first chain is older than max_age, and unused
    assert layout(environment, job) == ["F"]


def test_retention_runs_only_after_a_successful_backup(
    make_domain, environment, tmp_path, gpg_home
) -> None:
    vm = make_domain(chain=["base", "vm"])

    def configure(defaults: str) -> None:
        BackupEnvironment.create(tmp_path, gpg_home.path, gpg_home.fingerprint, extra=defaults)

    configure("  full_retention: 10\n")
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    run(environment, job)
    run(environment, job, full=True)
    assert layout(environment, job) == ["F", "F"]

    # Retention now wants one chain only, but the backup fails (no guest agent).
    configure("  full_retention: 1\n  quiesce: required\n")
    failed = environment.virt_dup("run", "--full", job, check=False)
    assert failed.returncode != 0
    assert "quiesce is required" in failed.stderr
    assert layout(environment, job) == ["F", "F"]

    configure("  full_retention: 1\n")
    run(environment, job, full=True)
    assert layout(environment, job) == ["F"]
    assert environment.status(job)["last_success"]["full"] is True
