"""max_parallel_runs: the backups of several domains started at once read one at
a time when the host allows one."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from harness.backups import BackupEnvironment, random_domain, wait_for
from harness.domains import MIB

from virt_dup.duplicity.times import parse_time

pytestmark = pytest.mark.integration


def test_a_second_domains_run_waits_for_the_hosts_only_slot(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    environment.config.write_text(environment.config.read_text() + "max_parallel_runs: 1\n")
    first = random_domain(make_domain, tmp_path, 48 * MIB)
    second = make_domain(running=True)
    first_job = environment.virt_dup("add-job", first.name).stdout.strip()
    second_job = environment.virt_dup("add-job", second.name).stdout.strip()

    running = environment.start_run(first_job)
    try:
        wait_for(
            lambda: (
                environment.run_phase(first.domain.UUIDString()) == "backup"
                or running.poll() is not None
            ),
            60,
            "the first run's backup",
        )
        waiting = environment.start_run(second_job)
        _out, second_errors = waiting.communicate(timeout=300)
        _out, first_errors = running.communicate(timeout=300)
    finally:
        for process in (running,):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert (running.returncode, waiting.returncode) == (0, 0), first_errors + second_errors
    assert "waiting for a free run slot (max_parallel_runs: 1)" in second_errors
    done_first = datetime.fromisoformat(environment.status(first_job)["last_success"]["finished"])
    (manifest,) = (environment.backend / second_job).glob("duplicity-full.*.manifest.gpg")
    # duplicity names a set by the second it started in: the second read began
    # once the first run had ended.
    started = parse_time(manifest.name.split(".")[1])
    assert started >= done_first - timedelta(seconds=1)
