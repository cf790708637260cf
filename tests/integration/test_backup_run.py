"""``virt-dup run``: the backup holds the point-in-time chain, the live disk keeps every write.

Each test makes a domain with a qcow2 chain, starts ``virt-dup run`` as its
own process (as systemd does), writes known patterns into the guest's disk
through QEMU while virt-dup's overlay exists, and then checks:

* the domain's disk is its original top image again (live and persistent),
  and no overlay file is left;
* every pattern written during the backup is in the live disk;
* the files restored by *plain* duplicity equal, byte for byte, the chain as
  it was when the run started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness.backups import (
    BackupEnvironment,
    fill,
    restored_path,
    sha256,
    snapshot_files,
    wait_for,
)
from harness.domains import MIB, ScratchDomain

pytestmark = pytest.mark.integration

DURING = [(0xC1, 1 * MIB), (0xC2, 17 * MIB), (0xC3, 100 * MIB)]  # (pattern, offset), 1 MiB each


def prepared_domain(make_domain, running: bool) -> ScratchDomain:
    """base.qcow2 <- vm.qcow2, both holding data, 128 MiB."""
    vm = make_domain(chain=["base", "vm"], running=False, size=128 * MIB)
    base, top = vm.images["vda"]
    fill(base, 0x22, 0, 8 * MIB)
    fill(top, 0x11, 4 * MIB, 8 * MIB)
    if running:
        vm.domain.create()
    return vm


def on_overlay(vm: ScratchDomain, inactive: bool = False) -> bool:
    return ".virt-dup-" in str(vm.disk_source("vda", inactive=inactive))


def leftover_overlays(vm: ScratchDomain) -> list[Path]:
    return sorted(vm.directory.rglob("*.virt-dup-*"))


def check_restored_equals(
    environment: BackupEnvironment, job: str, before: dict[Path, Path], tmp: Path
) -> Path:
    restored = environment.restore_all(job, tmp / "restored")
    for original, copy in before.items():
        assert sha256(restored_path(restored, original)) == sha256(copy), original
    return restored


def test_running_domain_keeps_writes_made_during_backup(make_domain, environment, tmp_path) -> None:
    vm = prepared_domain(make_domain, running=True)
    base, top = vm.images["vda"]
    job = environment.virt_dup("add-job", vm.name, "--depth", "0").stdout.strip()
    before = snapshot_files([top, base], tmp_path / "before")

    run = environment.start_run(job)
    wait_for(lambda: on_overlay(vm) or run.poll() is not None, 60, "the overlay")
    assert run.poll() is None, run.communicate()
    for pattern, offset in DURING:
        vm.write_pattern("vda", pattern, offset, 1 * MIB)
    _output, errors = run.communicate(timeout=600)
    assert run.returncode == 0, errors

    assert vm.is_running()
    assert vm.disk_source("vda") == top
    assert vm.disk_source("vda", inactive=True) == top
    assert leftover_overlays(vm) == []
    for pattern, offset in DURING:
        assert vm.read_pattern_ok(top, pattern, offset, 1 * MIB)
    assert vm.read_pattern_ok(top, 0x11, 4 * MIB, 8 * MIB)

    restored = check_restored_equals(environment, job, before, tmp_path)
    manifest = json.loads(
        restored_path(restored, environment.state / "metadata" / job / "manifest.json").read_text()
    )
    (disk,) = manifest["disks"]
    assert [entry["path"] for entry in disk["files"]] == [str(top), str(base)]
    assert all(entry["sha256"] == sha256(before[Path(entry["path"])]) for entry in disk["files"])
    assert manifest["full"] is True
    status = json.loads(environment.virt_dup("list-jobs", vm.name, "--json").stdout)["jobs"][0]
    assert status["last_success"]["result"] == "success"


def test_shut_off_domain(make_domain, environment, tmp_path) -> None:
    vm = prepared_domain(make_domain, running=False)
    base, top = vm.images["vda"]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    before = snapshot_files([top, base], tmp_path / "before")
    environment.virt_dup("run", job)
    assert not vm.is_running()
    assert vm.disk_source("vda", inactive=True) == top
    assert leftover_overlays(vm) == []
    check_restored_equals(environment, job, before, tmp_path)
    # the domain still starts on its chain
    vm.domain.create()
    assert vm.disk_source("vda") == top


def test_domain_started_during_backup(make_domain, environment, tmp_path) -> None:
    vm = prepared_domain(make_domain, running=False)
    base, top = vm.images["vda"]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    before = snapshot_files([top, base], tmp_path / "before")
    run = environment.start_run(job)
    wait_for(lambda: on_overlay(vm, inactive=True) or run.poll() is not None, 60, "the overlay")
    assert run.poll() is None, run.communicate()
    vm.domain.create()  # a power-on during the backup runs on the overlay
    for pattern, offset in DURING:
        vm.write_pattern("vda", pattern, offset, 1 * MIB)
    _output, errors = run.communicate(timeout=600)
    assert run.returncode == 0, errors
    assert vm.is_running()
    assert vm.disk_source("vda") == top
    assert vm.disk_source("vda", inactive=True) == top
    assert leftover_overlays(vm) == []
    for pattern, offset in DURING:
        assert vm.read_pattern_ok(top, pattern, offset, 1 * MIB)
    check_restored_equals(environment, job, before, tmp_path)


def test_domain_shut_down_during_backup(make_domain, environment, tmp_path) -> None:
    vm = prepared_domain(make_domain, running=True)
    base, top = vm.images["vda"]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    before = snapshot_files([top, base], tmp_path / "before")
    run = environment.start_run(job)
    wait_for(lambda: on_overlay(vm) or run.poll() is not None, 60, "the overlay")
    assert run.poll() is None, run.communicate()
    for pattern, offset in DURING:
        vm.write_pattern("vda", pattern, offset, 1 * MIB)
    vm.domain.destroy()
    _output, errors = run.communicate(timeout=600)
    assert run.returncode == 0, errors
    assert not vm.is_running()
    assert vm.disk_source("vda", inactive=True) == top
    assert leftover_overlays(vm) == []
    for pattern, offset in DURING:
        assert vm.read_pattern_ok(top, pattern, offset, 1 * MIB)
    check_restored_equals(environment, job, before, tmp_path)
