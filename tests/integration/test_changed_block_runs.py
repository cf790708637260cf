"""Runs that read changed blocks (job option changed_blocks: auto) on a real
running domain: what they read, what they store, what they leave, and that
every point restores to the disk as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness.backups import BackupEnvironment, guest_view
from harness.domains import MIB

from virt_dup.libvirt.checkpoints import CHECKPOINT_PREFIX

pytestmark = pytest.mark.integration


def checkpoints(vm) -> list[str]:
    names = [checkpoint.getName() for checkpoint in vm.domain.listAllCheckpoints(0)]
    return sorted(name for name in names if name.startswith(CHECKPOINT_PREFIX))


def changes_sets(environment: BackupEnvironment, job: str) -> list[str]:
    directory = environment.backend / job / "changes"
    if not directory.is_dir():
        return []
    return sorted(path.name for path in directory.glob("duplicity-full.*.manifest.gpg"))


def test_incrementals_read_only_what_the_guest_wrote(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    vm = make_domain(running=True, size=64 * MIB)
    top = vm.images["vda"][-1]
    vm.write_pattern("vda", 0x11, 0, 8 * MIB)
    job = environment.virt_dup("add-job", vm.name, "--changed-blocks", "auto").stdout.strip()

    environment.virt_dup("run", job)
    first = environment.status(job)["last_success"]
    assert first["read"] == "whole" and "a full backup" in first["read_reason"]
    (checkpoint,) = checkpoints(vm)
    assert checkpoint.startswith(f"{CHECKPOINT_PREFIX}{job}-")

    vm.write_pattern("vda", 0x22, 16 * MIB, 3 * MIB)
    views = [guest_view(top, tmp_path / "view-2.qcow2")]
    environment.virt_dup("run", job)
    second = environment.status(job)["last_success"]
    assert (second["read"], second["full"]) == ("changes", False), second
    assert 3 * MIB <= second["bytes_hashed"] <= 4 * MIB  # the changes file, not the disk
    assert len(changes_sets(environment, job)) == 1
    assert checkpoints(vm) != [checkpoint] and len(checkpoints(vm)) == 1
    assert not list(top.parent.glob("*.changes.qcow2"))  # nothing left next to the disk
    assert vm.disk_source("vda") == top

    vm.write_pattern("vda", 0x33, 40 * MIB, 1 * MIB)
    views.append(guest_view(top, tmp_path / "view-3.qcow2"))
    environment.virt_dup("run", job)
    assert environment.status(job)["last_success"]["read"] == "changes"
    assert len(changes_sets(environment, job)) == 2
