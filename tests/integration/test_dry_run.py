"""``run --dry-run`` and ``restore --dry-run`` change nothing at all.

Real libvirtd + QEMU, duplicity and gpg.  "Nothing" is checked, before and
after each dry run, on: every file (and its mode) under the state dir, the
cache dir and the backend, the domain's lock file, the images, their qcow2
headers and the live and persistent domain XML.  A dry run may neither
recover an interrupted run, nor take or wait for the domain's lock, nor
write a status or run record, nor write duplicity's cache (not even create
it), nor clean up the backend.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.backups import BackupEnvironment, backing_strings, fill, wait_for
from harness.domains import MIB, ScratchDomain

pytestmark = pytest.mark.integration

_INACTIVE = 2  # libvirt.VIR_DOMAIN_XML_INACTIVE


def tree(directory: Path) -> dict[str, tuple[int, str]]:
    """Every entry below ``directory``: relative path -> (mode, content digest)."""
    found: dict[str, tuple[int, str]] = {}
    if not directory.exists():
        return found
    for path in sorted(directory.rglob("*")):
        status = path.lstat()
        if path.is_symlink():
            digest = "link:" + os.readlink(path)
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest = "directory"
        found[str(path.relative_to(directory))] = (status.st_mode, digest)
    return found


@dataclass(frozen=True)
class Host:
    """What a dry run must leave exactly as it was."""

    state: dict[str, tuple[int, str]]
    cache: dict[str, tuple[int, str]]
    backend: dict[str, tuple[int, str]]
    images: dict[str, tuple[int, str]]
    backing: dict[Path, str | None]
    lock: tuple[int, int] | None
    live_xml: str | None
    persistent_xml: str

    @classmethod
    def of(cls, environment: BackupEnvironment, vm: ScratchDomain) -> Host:
        lock = environment.lock_path(vm.uuid)
        lock_status = (lock.stat().st_mtime_ns, lock.stat().st_size) if lock.exists() else None
        return cls(
            state=tree(environment.state),
            cache=tree(environment.cache),
            backend=tree(environment.backend),
            images=tree(vm.directory),
            backing=backing_strings(vm.directory.rglob("*.qcow2")),
            lock=lock_status,
            live_xml=vm.domain.XMLDesc(0) if vm.domain.isActive() else None,
            persistent_xml=vm.domain.XMLDesc(_INACTIVE),
        )


def filled_domain(make_domain, running: bool = True) -> ScratchDomain:
    vm = make_domain(chain=["base", "vm"], running=False)
    for number, image in enumerate(vm.images["vda"]):
        fill(image, 0x40 + number, number * MIB, MIB)
    if running:
        vm.domain.create()
    return vm


def json_document(finished: subprocess.CompletedProcess[str], schema: str) -> dict:
    document = json.loads(finished.stdout)
    assert document["schema"] == schema
    return document


def test_run_dry_run_of_a_job_never_run_creates_not_even_its_cache(
    make_domain, environment: BackupEnvironment
) -> None:
    vm = filled_domain(make_domain)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    before = Host.of(environment, vm)

    planned = environment.virt_dup("run", job, "--dry-run", "--json")

    assert Host.of(environment, vm) == before
    assert not (environment.cache / job).exists()
    (plan,) = json_document(planned, "virt-dup/run-plan/1")["plans"]
    assert plan["job"] == job and plan["recovery"] == [] and plan["busy_pid"] is None
    assert plan["plan"]["type"] == "full"
    (disk,) = plan["plan"]["disks"]
    assert disk["selected"] == [str(path) for path in reversed(vm.images["vda"])]
    assert disk["selected_bytes"] == sum(path.stat().st_size for path in vm.images["vda"])


def test_run_dry_run_after_backups_changes_no_state_cache_or_backend(
    make_domain, environment: BackupEnvironment
) -> None:
    vm = filled_domain(make_domain)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    environment.virt_dup("run", job)
    status = environment.status(job)
    before = Host.of(environment, vm)

    planned = environment.virt_dup("run", job, "--dry-run")

    assert Host.of(environment, vm) == before
    assert environment.status(job) == status
    assert "(incremental backup)" in planned.stdout


def test_run_dry_run_neither_waits_for_nor_takes_a_held_lock(
    make_domain, environment: BackupEnvironment
) -> None:
    vm = filled_domain(make_domain)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    lock = environment.lock_path(vm.uuid)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("424242\n")
        held.flush()
        before = Host.of(environment, vm)

        planned = environment.virt_dup("run", job, "--dry-run", "--json")

        assert Host.of(environment, vm) == before
    (plan,) = json_document(planned, "virt-dup/run-plan/1")["plans"]
    assert plan["busy_pid"] == "424242"


def test_run_dry_run_reports_recovery_and_recovers_nothing(
    make_domain, environment: BackupEnvironment
) -> None:
    vm = filled_domain(make_domain)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    top = vm.images["vda"][-1]
    run = environment.start_run(job)
    try:
        wait_for(lambda: vm.disk_source("vda") != top or run.poll() is not None, 60, "overlay")
        assert run.poll() is None, run.communicate()
        os.kill(run.pid, signal.SIGKILL)
        run.wait(10)
        overlay = vm.disk_source("vda")
        assert overlay != top and environment.run_record(vm.uuid).exists()
        before = Host.of(environment, vm)

        planned = environment.virt_dup("run", job, "--dry-run", "--json")

        assert Host.of(environment, vm) == before
        assert vm.disk_source("vda") == overlay
        (plan,) = json_document(planned, "virt-dup/run-plan/1")["plans"]
        (pending,) = plan["recovery"]
        assert (pending["target"], pending["overlay"], pending["original_top"]) == (
            "vda",
            str(overlay),
            str(top),
        )
        # planned on the chain the run will find once recovery merged the overlay
        assert plan["plan"]["disks"][0]["chain"][0] == str(top)
    finally:
        environment.virt_dup("recover", check=False)
    assert vm.disk_source("vda") == top


def test_restore_dry_run_writes_no_file_and_no_cache(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    vm = filled_domain(make_domain)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    environment.virt_dup("run", job)
    target = tmp_path / "restored"
    before = Host.of(environment, vm)

    planned = environment.virt_dup(
        "restore", vm.name, "--target-dir", str(target), "--define", "--dry-run", "--json"
    )

    assert Host.of(environment, vm) == before
    assert not target.exists()
    document = json_document(planned, "virt-dup/restore-plan/1")
    assert document["job"] == job and document["disks"] == ["vda"]
    assert [entry["destination"] for entry in document["files"]] == [
        str(target / "vda" / path.name) for path in vm.images["vda"]
    ]
    assert document["define"] == {"name": f"{vm.name}-restored", "copy": True}


def test_restore_dry_run_refuses_what_restore_refuses(
    make_domain, environment: BackupEnvironment
) -> None:
    vm = filled_domain(make_domain)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    environment.virt_dup("run", job)
    before = Host.of(environment, vm)

    refused = environment.virt_dup("restore", vm.name, "--in-place", "--dry-run", check=False)

    assert refused.returncode == 1
    (line,) = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert "is running" in line
    assert Host.of(environment, vm) == before


# -- no backups yet: exit 3 -------------------------------------------------------------------
def test_no_backups_yet_is_exit_3_for_backups_restore_and_verify(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    vm = filled_domain(make_domain, running=False)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()

    listed = environment.virt_dup("backups", vm.name, "--json", check=False)
    restored = environment.virt_dup(
        "restore", vm.name, "--target-dir", str(tmp_path / "r"), check=False
    )
    verified = environment.virt_dup("verify", job, check=False)

    assert listed.returncode == 3, listed.stderr
    (listing,) = json_document(listed, "virt-dup/backups/1")["jobs"]
    assert listing["job"] == job and listing["backups"] == []
    for finished in (restored, verified):
        assert finished.returncode == 3, finished.stderr
        assert "no backups yet" in finished.stderr
