"""``virt-dup backups``, ``restore`` and ``verify`` against real libvirtd, QEMU, duplicity, gpg.

Every backup is made by ``virt-dup run`` and every check is independent of
virt-dup's restore code: what a disk looked like when a backup started is a
flat copy made with ``qemu-img convert`` just before the run (the guest's
view of the whole chain), and a restore is right when ``qemu-img compare``
finds the restored chain identical to it.  virt-dup runs as its own process,
as a person or systemd runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest
from harness.backups import BackupEnvironment, guest_view, same_guest_view, sha256
from harness.domains import MIB, DiskSpec, ScratchDomain, remove_domain

pytestmark = pytest.mark.integration

SIZE = 64 * MIB


@pytest.fixture
def environment(tmp_path: Path, gpg_home) -> BackupEnvironment:
    return BackupEnvironment.create(tmp_path, gpg_home.path, gpg_home.fingerprint)


@pytest.fixture
def extra_domains(libvirt_conn):
    """Names of domains a test defines itself (restored copies); removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        remove_domain(libvirt_conn, name)


def fill(image: Path, pattern: int, offset: int, length: int) -> None:
    """Write into an image no QEMU has open."""
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", str(image)],
        check=True,
        capture_output=True,
    )


def prepared(make_domain, running: bool = True, **kwargs) -> ScratchDomain:
    """base.qcow2 <- vm.qcow2 (per disk), each file holding data of its own."""
    vm = make_domain(running=False, size=SIZE, **kwargs)
    for number, (_disk, images) in enumerate(sorted(vm.images.items())):
        for level, image in enumerate(images):
            fill(image, 0x20 + 0x10 * number + level, (1 + 4 * level) * MIB, 2 * MIB)
    if running:
        vm.domain.create()
    return vm


def chain_of(top: Path) -> list[dict]:
    finished = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(top)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(finished.stdout)


def check_clean(image: Path) -> None:
    finished = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stdout + finished.stderr


def run_backup(environment: BackupEnvironment, job: str) -> str:
    """One ``virt-dup run``; returns the new backup's id (from ``backups --json``)."""
    environment.virt_dup("run", job)
    return backups_json(environment, job)[0]["backups"][-1]["id"]


def backups_json(environment: BackupEnvironment, *arguments: str) -> list[dict]:
    document = json.loads(environment.virt_dup("backups", "--json", *arguments).stdout)
    assert document["schema"] == "virt-dup/backups/1"
    return document["jobs"]


def error_of(finished: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in finished.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, finished.stderr
    return lines[0]


def tree_state(directory: Path) -> dict[Path, str]:
    return {
        path: sha256(path) if path.is_file() else "dir" for path in sorted(directory.rglob("*"))
    }


def test_each_backup_restores_to_the_disk_as_it_was_when_it_started(
    make_domain, environment, tmp_path
) -> None:
    vm = prepared(make_domain, running=True)
    base, top = vm.images["vda"]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()

    first_view = guest_view(top, tmp_path / "views" / "first.qcow2")
    first = run_backup(environment, job)
    vm.write_pattern("vda", 0xA1, 9 * MIB, 64 * 1024)
    vm.write_pattern("vda", 0xA2, 40 * MIB, 256 * 1024)
    second_view = guest_view(top, tmp_path / "views" / "second.qcow2")
    assert not same_guest_view(first_view, second_view)
    second = run_backup(environment, job)

    (listing,) = backups_json(environment, vm.name)
    assert listing["job"] == job
    assert listing["domain"] == {"name": vm.name, "uuid": vm.uuid}
    assert [(entry["id"], entry["type"]) for entry in listing["backups"]] == [
        (first, "full"),
        (second, "incremental"),
    ]
    assert {entry["chain"] for entry in listing["backups"]} == {first}
    for entry in listing["backups"]:
        assert entry["disks"] == [{"target": "vda", "files": [str(top), str(base)]}]
        assert entry["size"] > 0
    # the full holds both files, the incremental only the few changed blocks
    assert listing["backups"][0]["size"] > 4 * listing["backups"][1]["size"]
    text = environment.virt_dup("backups", vm.name).stdout
    assert first in text and second in text and "incremental" in text

    for backup_id, view, directory in (
        (first, first_view, tmp_path / "first"),
        (second, second_view, tmp_path / "second"),
    ):
        started = time.monotonic()
        finished = environment.virt_dup(
            "restore", vm.name, backup_id, "--target-dir", str(directory)
        )
        elapsed = time.monotonic() - started
        assert f"restored backup {backup_id} of domain {vm.name}" in finished.stdout
        # no journald here: the journal record is one line on stderr
        assert f"ACTION=restore RESULT=success BACKUP_ID={backup_id}" in finished.stderr
        restored_top, restored_base = (
            directory / "vda" / "vm.qcow2",
            directory / "vda" / "base.qcow2",
        )
        # the chain keeps its structure, on the new paths
        chain = chain_of(restored_top)
        assert [entry["filename"] for entry in chain] == [str(restored_top), str(restored_base)]
        assert chain[0]["backing-filename"] == str(restored_base)
        assert same_guest_view(restored_top, view)
        for image in (restored_top, restored_base):
            check_clean(image)
        # sparse again: the base's unused clusters are holes, as they were
        assert os.stat(restored_base).st_blocks * 512 <= os.stat(base).st_blocks * 512 + 65536
        print(f"restore of {backup_id} ({SIZE // MIB} MiB disk, 2 files): {elapsed:.2f} s")
    assert not same_guest_view(tmp_path / "first" / "vda" / "vm.qcow2", second_view)
    # the live domain was not touched
    assert vm.is_running() and vm.disk_source("vda") == top


def test_verify_passes_then_fails_on_a_corrupted_volume(make_domain, environment, tmp_path) -> None:
    vm = prepared(make_domain, running=False)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    backup_id = run_backup(environment, job)
    scratch = tmp_path / "scratch"

    finished = environment.virt_dup("verify", job, "--scratch-dir", str(scratch))
    assert f"verified backup {backup_id} of job {job}" in finished.stdout
    assert list(scratch.iterdir()) == []  # the scratch directory is gone

    (volume,) = (environment.backend / job).glob("duplicity-full.*.vol1.difftar.gpg")
    data = bytearray(volume.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 64):
        data[offset] ^= 0xFF
    volume.write_bytes(bytes(data))

    failed = environment.virt_dup("verify", job, "--scratch-dir", str(scratch), check=False)
    assert failed.returncode == 1
    line = error_of(failed)
    assert f"verification of backup {backup_id} of job {job} (domain {vm.name}) FAILED" in line
    assert "mismatched hash" in line and volume.name in line
    assert list(scratch.iterdir()) == []


def test_disaster_recovery_from_the_backend_alone(make_domain, environment, tmp_path) -> None:
    vm = prepared(make_domain, running=True)
    base, top = vm.images["vda"]
    job = environment.virt_dup("add-job", vm.name, "--schedule", "0 2 * * *").stdout.strip()
    environment.virt_dup("run", job)
    view = guest_view(top, tmp_path / "view.qcow2")

    # the host loses the domain, its images and virt-dup's state and cache
    vm.domain.destroy()
    # lost with the host: its checkpoints too
    vm.domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    for directory in (vm.directory, environment.state, environment.cache):
        subprocess.run(["rm", "-rf", str(directory)], check=True)
    assert not top.exists() and not base.exists()

    backend = f"file://{environment.backend}"
    (found,) = backups_json(environment, "--backend", backend)
    assert found["job"] == job
    assert found["domain"] == {"name": vm.name, "uuid": vm.uuid}
    assert len(found["backups"]) == 1
    assert vm.name in environment.virt_dup("backups", "--backend", backend).stdout

    started = time.monotonic()
    finished = environment.virt_dup("restore", vm.name, "--backend", backend, "--define")
    elapsed = time.monotonic() - started
    assert f"defined domain {vm.name}" in finished.stdout
    print(f"disaster recovery restore ({SIZE // MIB} MiB disk, 2 files): {elapsed:.2f} s")

    assert same_guest_view(top, view)
    assert [entry["filename"] for entry in chain_of(top)] == [str(top), str(base)]
    restored = vm.domain.connect().lookupByName(vm.name)
    assert restored.UUIDString() == vm.uuid  # the same domain, not a copy
    restored.create()
    assert restored.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    # its job came back with it: backups carry on into the same collection
    (listed,) = json.loads(environment.virt_dup("list-jobs", vm.name, "--json").stdout)["jobs"]
    assert listed["job"] == job


def test_in_place_on_a_shut_off_domain_and_refusals(make_domain, environment, tmp_path) -> None:
    vm = prepared(make_domain, running=False)
    base, top = vm.images["vda"]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    view = guest_view(top, tmp_path / "view.qcow2")
    backup_id = run_backup(environment, job)
    fill(top, 0xEE, 0, 8 * MIB)  # the disk changes after the backup
    assert not same_guest_view(top, view)

    # an existing target is refused and left as it was
    target = tmp_path / "target"
    environment.virt_dup("restore", vm.name, "--target-dir", str(target))
    before = tree_state(target)
    refused = environment.virt_dup("restore", vm.name, "--target-dir", str(target), check=False)
    assert refused.returncode == 1
    assert "exist(s); a restore never replaces a file" in error_of(refused)
    assert tree_state(target) == before
    # without --in-place the files where they were are never replaced
    refused = environment.virt_dup("restore", vm.name, check=False)
    assert "never replaces a file" in error_of(refused)

    # a running domain is refused, nothing changed
    vm.domain.create()
    disks_before = tree_state(vm.directory)
    xml_before = vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    refused = environment.virt_dup("restore", vm.name, "--in-place", check=False)
    assert refused.returncode == 1
    assert f"domain {vm.name} is running: --in-place needs it shut off" in error_of(refused)
    assert tree_state(vm.directory) == disks_before
    assert vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == xml_before
    vm.domain.destroy()

    finished = environment.virt_dup("restore", vm.name, backup_id, "--in-place")
    assert f"restored backup {backup_id}" in finished.stdout
    assert same_guest_view(top, view)
    assert [entry["filename"] for entry in chain_of(top)] == [str(top), str(base)]
    check_clean(top)
    # the replaced files were removed once the restore had been checked
    assert sorted(path.name for path in top.parent.iterdir()) == ["base.qcow2", "vm.qcow2"]
    assert vm.disk_source("vda", inactive=True) == top

    # --keep-replaced keeps them
    fill(top, 0xEF, 0, MIB)
    environment.virt_dup("restore", vm.name, "--in-place", "--keep-replaced")
    kept = top.parent / f"vm.qcow2.virt-dup-replaced-{backup_id}"
    assert sorted(path.name for path in top.parent.iterdir()) == sorted(
        ["base.qcow2", "vm.qcow2", kept.name, f"base.qcow2.virt-dup-replaced-{backup_id}"]
    )
    assert vm.read_pattern_ok(kept, 0xEF, 0, MIB)
    assert same_guest_view(top, view)
    vm.domain.create()
    assert vm.is_running()


def test_depth_minus_one_onto_a_named_base(make_domain, environment, tmp_path) -> None:
    golden = make_domain.create_image("golden", size=SIZE)
    fill(golden, 0x5A, 0, 4 * MIB)
    vm = make_domain(disks=[DiskSpec("vda", chain=["vm"], backing=golden)], running=False)
    (top,) = [image for image in vm.images["vda"] if image.name == "vm.qcow2"]
    fill(top, 0x6B, 2 * MIB, 4 * MIB)
    vm.domain.create()
    job = environment.virt_dup("add-job", vm.name, "--depth", "-1").stdout.strip()
    view = guest_view(top, tmp_path / "view.qcow2")
    environment.virt_dup("run", job)
    (entry,) = backups_json(environment, job)[0]["backups"]
    assert entry["disks"] == [{"target": "vda", "files": [str(top)]}]

    # the base, copied elsewhere: the user names it
    named = tmp_path / "bases" / "golden-copy.qcow2"
    named.parent.mkdir()
    named.write_bytes(golden.read_bytes())
    wrong = tmp_path / "bases" / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(wrong), "32M"], check=True)

    target = tmp_path / "restored"
    refused = environment.virt_dup(
        "restore", vm.name, "--target-dir", str(target), "--backing-file", str(wrong), check=False
    )
    assert "has a virtual size of 33554432 bytes" in error_of(refused)
    assert not target.exists()

    environment.virt_dup(
        "restore", vm.name, "--target-dir", str(target), "--backing-file", f"vda={named}"
    )
    restored = target / "vda" / "vm.qcow2"
    assert sorted(path.name for path in target.rglob("*") if path.is_file()) == ["vm.qcow2"]
    assert [entry["filename"] for entry in chain_of(restored)] == [str(restored), str(named)]
    assert same_guest_view(restored, view)
    check_clean(restored)


def test_a_two_disk_domain_restored_as_a_copy_next_to_the_original(
    make_domain, environment, tmp_path, extra_domains, harness_session
) -> None:
    vm = prepared(make_domain, running=True, disks=("vda", "vdb"))
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    views = {
        disk: guest_view(images[-1], tmp_path / f"{disk}.qcow2")
        for disk, images in vm.images.items()
    }
    environment.virt_dup("run", job)

    copy = f"vdtr-{harness_session.id}-{os.getpid() % 1000:03d}"
    extra_domains.append(copy)
    target = make_domain.directory / "copy"  # QEMU (libvirt-qemu) must reach it
    finished = environment.virt_dup(
        "restore", vm.name, "--target-dir", str(target), "--define", "--name", copy
    )
    assert f"defined domain {copy}" in finished.stdout
    assert "no virt-dup jobs" in finished.stderr

    connection = vm.domain.connect()
    restored = connection.lookupByName(copy)
    assert restored.UUIDString() != vm.uuid
    xml = restored.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    for disk in ("vda", "vdb"):
        top = target / disk / "vm.qcow2"
        assert f"<source file='{top}'/>" in xml
        assert [entry["filename"] for entry in chain_of(top)] == [
            str(top),
            str(target / disk / "base.qcow2"),
        ]
        assert same_guest_view(top, views[disk])
    assert not same_guest_view(target / "vda" / "vm.qcow2", views["vdb"])
    restored.create()  # runs next to the original
    assert restored.state()[0] == libvirt.VIR_DOMAIN_RUNNING and vm.is_running()

    # --disk restores only the disks named
    only = tmp_path / "only-vdb"
    environment.virt_dup("restore", vm.name, "--target-dir", str(only), "--disk", "vdb")
    assert sorted(path.name for path in only.iterdir()) == ["vdb"]


def test_a_stopped_in_place_restore_leaves_the_disks_as_they_were(
    make_domain, environment, tmp_path
) -> None:
    vm = prepared(make_domain, running=False)
    top = vm.images["vda"][-1]
    random_data = tmp_path / "random"
    random_data.write_bytes(os.urandom(48 * MIB))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {random_data} 8M 48M", str(top)],
        check=True,
        capture_output=True,
    )
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    environment.virt_dup("run", job)
    fill(top, 0xEE, 0, MIB)
    before = tree_state(vm.directory)

    command = [sys.executable, "-m", "virt_dup", "--config", str(environment.config)]
    restore = subprocess.Popen(
        [*command, "restore", vm.name, "--in-place"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while (
        not list(vm.directory.rglob(".virt-dup-restore.*"))
        and restore.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert restore.poll() is None, restore.communicate()
    restore.terminate()  # what systemd does to a unit it stops
    _output, errors = restore.communicate(timeout=60)

    assert restore.returncode == 1
    assert "stopped by SIGTERM; the restore was undone" in errors
    assert tree_state(vm.directory) == before
