"""Runs that read changed blocks (job option changed_blocks: auto) on a real
running domain: what they read, what they store, what they leave, and that
every point restores to the disk as it was."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from harness.backups import BackupEnvironment, guest_view, same_guest_view, wait_for
from harness.domains import MIB

from virt_dup.images.qemu_img import bitmaps_of
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

    # Every point restores to the disk as it was, and verifies.
    listing = json.loads(environment.virt_dup("backups", vm.name, "--json").stdout)["jobs"][0]
    kinds = [entry["type"] for entry in listing["backups"]]
    assert kinds == ["full", "changes", "changes"], kinds
    for entry, view in zip(listing["backups"][1:], views, strict=True):
        restored = tmp_path / f"restored-{entry['id']}"
        said = environment.virt_dup(
            "restore", "-v", vm.name, entry["id"], "--target-dir", str(restored)
        )
        assert same_guest_view(restored / "vda" / top.name, view), entry["id"]
        # Each run kept the metadata it backed up: on this host a restore reads none
        # of it from the backend (two duplicity starts per set otherwise).
        assert "applying the changes of backup" in said.stderr
        assert "reading the metadata" not in said.stderr, said.stderr
    environment.virt_dup("verify", job)

    # A changes file that is not what its set recorded (here: the record this host
    # kept, altered) fails the restore in one line, with nothing left in the target
    # (not even the next set's file, fetched meanwhile); without that record the
    # backend's metadata is read, and the point restores.
    first_changes, latest = listing["backups"][1]["id"], listing["backups"][2]
    kept = environment.cache / "metadata" / job / first_changes / "manifest.json"
    recorded = json.loads(kept.read_text())["changes"]["disks"][0]["sha256"]
    kept.write_text(kept.read_text().replace(recorded, "0" * 64))
    refused = tmp_path / "refused"
    failed = environment.virt_dup(
        "restore", vm.name, latest["id"], "--target-dir", str(refused), check=False
    )
    assert failed.returncode == 1
    assert f"the changes of disk vda in backup {first_changes}: SHA-256" in failed.stderr
    assert not refused.exists() or not any(refused.rglob("*")), list(refused.rglob("*"))
    kept.unlink()
    restored = tmp_path / "restored-again"
    said = environment.virt_dup(
        "restore", "-v", vm.name, latest["id"], "--target-dir", str(restored)
    )
    assert f"reading the metadata of backup {first_changes}" in said.stderr
    assert same_guest_view(restored / "vda" / top.name, views[-1])

    # A checkpoint that is gone: the whole files, said why, restorable; then changes again.
    (current,) = checkpoints(vm)
    vm.domain.checkpointLookupByName(current).delete(0)
    vm.write_pattern("vda", 0x44, 50 * MIB, 1 * MIB)
    fallback_view = guest_view(top, tmp_path / "view-4.qcow2")
    environment.virt_dup("run", job)
    fallback = environment.status(job)["last_success"]
    assert fallback["read"] == "whole" and "is gone" in fallback["read_reason"], fallback
    vm.write_pattern("vda", 0x55, 56 * MIB, 1 * MIB)
    last_view = guest_view(top, tmp_path / "view-5.qcow2")
    environment.virt_dup("run", job)
    assert environment.status(job)["last_success"]["read"] == "changes"
    listing = json.loads(environment.virt_dup("backups", vm.name, "--json").stdout)["jobs"][0]
    fourth, fifth = listing["backups"][-2:]
    assert (fourth["type"], fifth["type"]) == ("incremental", "changes")
    for entry, view in ((fourth, fallback_view), (fifth, last_view)):
        restored = tmp_path / f"restored-{entry['id']}"
        environment.virt_dup("restore", vm.name, entry["id"], "--target-dir", str(restored))
        assert same_guest_view(restored / "vda" / top.name, view), entry["id"]


def test_a_run_killed_while_storing_changes_loses_nothing(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    """SIGKILL after libvirt wrote the changes and made the next checkpoint: the next
    run starts from the checkpoint the last stored set names (a superset), deletes
    what the killed run left, and its point restores equal."""
    vm = make_domain(running=True, size=64 * MIB)
    top = vm.images["vda"][-1]
    job = environment.virt_dup("add-job", vm.name, "--changed-blocks", "auto").stdout.strip()
    environment.virt_dup("run", job)
    vm.write_pattern("vda", 0x66, 4 * MIB, 24 * MIB)
    leftover = top.parent / f"{top.stem}.virt-dup-{job}.changes.qcow2"
    run = environment.start_run(job)
    try:
        wait_for(lambda: leftover.exists() or run.poll() is not None, 60, "the changes file")
        assert run.poll() is None, run.communicate()
        os.kill(run.pid, signal.SIGKILL)
        run.wait(30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert len(checkpoints(vm)) in (1, 2)  # the killed run's may be there too

    vm.write_pattern("vda", 0x77, 40 * MIB, 1 * MIB)
    view = guest_view(top, tmp_path / "view.qcow2")
    environment.virt_dup("run", job)
    assert environment.status(job)["last_success"]["read"] == "changes"
    assert not leftover.exists()
    assert len(checkpoints(vm)) == 1
    restored = tmp_path / "restored"
    environment.virt_dup("restore", vm.name, "--target-dir", str(restored))
    assert same_guest_view(restored / "vda" / top.name, view)


def test_migration_carries_the_changes_and_removing_the_job_its_checkpoints(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    vm = make_domain(running=True, size=32 * MIB)
    top = vm.images["vda"][-1]
    job = environment.virt_dup("add-job", vm.name, "--changed-blocks", "auto").stdout.strip()
    environment.virt_dup("run", job)
    vm.write_pattern("vda", 0x12, 1 * MIB, 2 * MIB)
    view = guest_view(top, tmp_path / "view.qcow2")
    environment.virt_dup("run", job)
    other = tmp_path / "other"
    environment.virt_dup("migrate-backend", job, "--to", f"file://{other}")
    assert changes_sets_in(other / job) and not (environment.backend / job).exists()
    restored = tmp_path / "restored"
    environment.virt_dup("restore", vm.name, "--target-dir", str(restored))
    assert same_guest_view(restored / "vda" / top.name, view)

    assert checkpoints(vm)
    environment.virt_dup("remove-job", job)
    assert checkpoints(vm) == []


def changes_sets_in(collection: Path) -> list[str]:
    return sorted(path.name for path in (collection / "changes").glob("*.manifest.gpg"))


def test_removing_the_job_of_a_shut_off_domain_removes_its_checkpoints_and_bitmaps(
    make_domain, environment: BackupEnvironment
) -> None:
    """libvirt deletes no checkpoint of a shut-off domain and refuses to undefine a
    domain that has one: remove-job takes the bitmaps out of the images itself,
    then the metadata, and the domain undefines as any other."""
    vm = make_domain(running=True, size=32 * MIB)
    top = vm.images["vda"][-1]
    job = environment.virt_dup("add-job", vm.name, "--changed-blocks", "auto").stdout.strip()
    environment.virt_dup("run", job)
    vm.write_pattern("vda", 0x13, 1 * MIB, 1 * MIB)
    environment.virt_dup("run", job)
    (checkpoint,) = checkpoints(vm)
    vm.domain.destroy()
    assert bitmaps_of(str(top)) == [checkpoint]

    removed = environment.virt_dup("remove-job", job)

    assert "stay" not in removed.stderr, removed.stderr
    assert checkpoints(vm) == []
    assert bitmaps_of(str(top)) == []
    vm.domain.undefine()  # no flags: nothing of virt-dup's left in the way


@pytest.mark.parametrize(
    ("retention", "kept"),
    [
        # The first chain is deleted: its changed-block sets go with it.
        (("--full-retention", "1"), 1),
        # The first chain stays but keeps no incrementals: its sets go too.
        (("--full-retention", "3", "--incremental-retention", "1"), 1),
        # Both chains keep their incrementals.
        (("--full-retention", "3", "--incremental-retention", "3"), 2),
    ],
    ids=["chain-deleted", "incrementals-dropped", "all-kept"],
)
def test_retention_deletes_the_changed_block_sets_of_what_it_deletes(
    make_domain, environment: BackupEnvironment, tmp_path: Path, retention, kept
) -> None:
    vm = make_domain(running=True, size=32 * MIB)
    top = vm.images["vda"][-1]
    job = environment.virt_dup(
        "add-job", vm.name, "--changed-blocks", "auto", *retention
    ).stdout.strip()
    environment.virt_dup("run", job)
    vm.write_pattern("vda", 0x14, 1 * MIB, 1 * MIB)
    environment.virt_dup("run", job)
    first = changes_sets(environment, job)
    assert len(first) == 1
    environment.virt_dup("run", "--full", job)
    vm.write_pattern("vda", 0x15, 3 * MIB, 1 * MIB)
    view = guest_view(top, tmp_path / "view.qcow2")
    environment.virt_dup("run", job)

    left = changes_sets(environment, job)
    assert len(left) == kept, left
    assert (first[0] in left) == (kept == 2)
    restored = tmp_path / "restored"
    environment.virt_dup("restore", vm.name, "--target-dir", str(restored))
    assert same_guest_view(restored / "vda" / top.name, view)
    environment.virt_dup("verify", job)
