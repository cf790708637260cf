"""file:// backends that cannot take a backup: full, or not a directory at all.

Each run must fail with one clear line within a bounded time, leave the
domain on its own chain (no virt-dup overlay, no run record) and record no
success.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.backups import (
    QUICK_FAILURE,
    BackupEnvironment,
    error_lines,
    random_domain,
    use_backend,
)
from harness.domains import MIB, ScratchDomain

pytestmark = pytest.mark.integration


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 4 MiB tmpfs in a directory of its own, unmounted afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="vdt-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=False)
        with contextlib.suppress(OSError):
            directory.rmdir()


def assert_clean_failure(environment: BackupEnvironment, vm: ScratchDomain, job: str) -> None:
    base, top = vm.images["vda"]
    assert vm.disk_chain("vda") == (base, top)
    assert vm.disk_source("vda", inactive=True) == top
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
    assert not environment.run_record(vm.uuid).exists()
    status = environment.status(job)
    assert status["last_run"]["result"] == "failed"
    assert "last_success" not in status
    jobs = json.loads(environment.virt_dup("status", "--json").stdout)["jobs"]
    (listed,) = [entry for entry in jobs if entry["job"] == job]
    assert listed["last_success"] is None


def test_a_full_backend_fails_the_run_naming_enospc(
    make_domain, environment, tmp_path, small_tmpfs
) -> None:
    use_backend(environment, f"file://{small_tmpfs}")
    vm = random_domain(make_domain, tmp_path, 8 * MIB)
    job = environment.virt_dup("add-job", vm.name, *QUICK_FAILURE).stdout.strip()

    started = time.monotonic()
    finished = environment.virt_dup("run", job, check=False)
    elapsed = time.monotonic() - started
    print(f"full backend: failed in {elapsed:.1f} s:\n{finished.stderr}")
    assert finished.returncode != 0
    (line,) = error_lines(finished.stderr)
    assert "the backend is full (ENOSPC): [Errno 28] No space left on device" in line, line
    assert str(small_tmpfs) in line
    assert elapsed < 30
    assert_clean_failure(environment, vm, job)


def test_a_backend_path_that_is_a_regular_file_fails_at_once(
    make_domain, environment, tmp_path
) -> None:
    regular = tmp_path / "not-a-directory"
    regular.write_text("a file, not a directory\n")
    use_backend(environment, f"file://{regular}")
    vm = random_domain(make_domain, tmp_path, 1 * MIB)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()

    started = time.monotonic()
    finished = environment.virt_dup("run", job, check=False)
    elapsed = time.monotonic() - started
    print(f"backend path is a file: failed in {elapsed:.1f} s:\n{finished.stderr}")
    assert finished.returncode != 0
    (line,) = error_lines(finished.stderr)
    assert f"{regular} is not a directory" in line, line
    assert elapsed < 10
    assert_clean_failure(environment, vm, job)
    assert regular.read_text() == "a file, not a directory\n"
