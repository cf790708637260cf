"""``virt-dup run``: what a run touches, what it backs up, and when it refuses.

Real libvirtd + QEMU, real duplicity and gpg; virt-dup runs as its own
process (as systemd starts it) and every backup is checked with *plain*
duplicity.  "Untouched" means: the same files with the same contents, the
same backing strings in the qcow2 headers, the same persistent domain XML
and the same chain in the live XML.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.backups import (
    backing_strings,
    children,
    command_of,
    error_lines,
    file_digests,
    fill,
    holds_open,
    restored_path,
    sha256,
    snapshot_files,
    wait_for,
)
from harness.domains import MIB, DiskSpec, ScratchDomain

pytestmark = pytest.mark.integration


def filled_domain(make_domain, chain: list[str], running: bool = True, **kwargs) -> ScratchDomain:
    """A domain whose chain images each hold 1 MiB of their own pattern."""
    vm = make_domain(chain=chain, running=False, **kwargs)
    for disk, images in vm.images.items():
        for number, image in enumerate(images):
            fill(image, 0x30 + number + (0x10 if disk == "vdb" else 0), number * MIB, MIB)
    if running:
        vm.domain.create()
    return vm


@dataclass(frozen=True)
class Untouched:
    """Everything a run must leave as it found it."""

    files: dict[Path, str]
    backing: dict[Path, str | None]
    persistent_xml: str
    live_chains: dict[str, tuple[Path, ...]]

    @classmethod
    def of(cls, vm: ScratchDomain, *directories: Path) -> Untouched:
        files: dict[Path, str] = {}
        for directory in directories or (vm.directory,):
            files |= file_digests(directory)
        live = {}
        if vm.domain.isActive():
            live = {dev: vm.disk_chain(dev) for dev in vm.images}
        return cls(
            files=files,
            backing=backing_strings(path for path in files if path.suffix == ".qcow2"),
            persistent_xml=vm.domain.XMLDesc(_INACTIVE),
            live_chains=live,
        )


_INACTIVE = 2  # libvirt.VIR_DOMAIN_XML_INACTIVE


def overlays_under(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.virt-dup-*"))


def test_an_excluded_disk_is_never_touched_nor_backed_up(
    make_domain, environment, tmp_path
) -> None:
    vm = filled_domain(make_domain, ["base", "vm"], disks=("vda", "vdb"))
    job = environment.virt_dup("add-job", vm.name, "--dev", "vda").stdout.strip()
    vdb_directory = vm.images["vdb"][-1].parent
    vdb_before = Untouched.of(vm, vdb_directory)
    vda_before = snapshot_files(list(vm.images["vda"]), tmp_path / "before")

    run = environment.start_run(job)
    vdb_sources = set()
    while run.poll() is None:  # all along the run: vdb stays on its own top image
        vdb_sources.add(vm.disk_source("vdb"))
        assert overlays_under(vdb_directory) == []
        time.sleep(0.02)
    assert run.returncode == 0, run.communicate()
    assert vdb_sources == {vm.images["vdb"][-1]}

    assert Untouched.of(vm, vdb_directory) == vdb_before
    assert vm.disk_chain("vda") == vm.images["vda"]
    assert overlays_under(vm.directory) == []
    assert environment.backed_up_files(job) == {
        *vm.images["vda"],
        *(environment.state / "metadata" / job).iterdir(),
    }
    restored = environment.restore_all(job, tmp_path / "restored")
    for original, copy in vda_before.items():
        assert sha256(restored_path(restored, original)) == sha256(copy)


def test_depth_on_the_seed_readme_chain(make_domain, environment, tmp_path) -> None:
    """`base <- vm01 <- vm01.snap`: depth 1, 0 and -1 as the original README defines them."""
    vm = filled_domain(make_domain, ["base", "vm01", "vm01.snap"])
    base, vm01, snap = vm.images["vda"]
    expected = {"1": {snap}, "0": {snap, vm01, base}, "-1": {snap, vm01}}
    jobs = {
        depth: environment.virt_dup("add-job", vm.name, f"--depth={depth}").stdout.strip()
        for depth in expected
    }
    before = Untouched.of(vm)
    copies = snapshot_files([base, vm01, snap], tmp_path / "before")

    for depth, job in jobs.items():
        environment.virt_dup("run", job)

        assert Untouched.of(vm) == before, f"depth {depth} changed the domain"
        metadata = set((environment.state / "metadata" / job).iterdir())
        assert environment.backed_up_files(job) == expected[depth] | metadata, depth
        restored = environment.restore_all(job, tmp_path / f"restored{depth}")
        for image in expected[depth]:
            assert sha256(restored_path(restored, image)) == sha256(copies[image])
        manifest = json.loads(
            restored_path(
                restored, environment.state / "metadata" / job / "manifest.json"
            ).read_text()
        )
        files = manifest["disks"][0]["files"]
        assert [entry["path"] for entry in files] == [str(snap), str(vm01), str(base)]
        assert {Path(entry["path"]) for entry in files if entry["selected"]} == expected[depth]


def test_two_domains_sharing_a_base(make_domain, environment, tmp_path) -> None:
    """The depth-0 job backs up the shared base, the depth -1 job leaves it out."""
    base = make_domain.create_image("shared-base")
    fill(base, 0x5B, 0, MIB)
    owner = make_domain(disks=[DiskSpec(chain=["owner"], backing=base)])
    sharer = make_domain(disks=[DiskSpec(chain=["sharer"], backing=base)])
    owner_job = environment.virt_dup("add-job", owner.name, "--depth", "0").stdout.strip()
    sharer_job = environment.virt_dup("add-job", sharer.name, "--depth=-1").stdout.strip()
    directories = (owner.directory, sharer.directory, base.parent)
    before = {vm.name: Untouched.of(vm, *directories) for vm in (owner, sharer)}

    environment.virt_dup("run", owner_job)
    environment.virt_dup("run", sharer_job)

    for vm in (owner, sharer):
        assert Untouched.of(vm, *directories) == before[vm.name], vm.name
        assert vm.disk_chain("vda") == (base, vm.images["vda"][-1])
    owner_files = environment.backed_up_files(owner_job)
    sharer_files = environment.backed_up_files(sharer_job)
    assert {owner.images["vda"][-1], base} <= owner_files
    assert sharer.images["vda"][-1] in sharer_files
    assert base not in sharer_files
    assert not any(path.suffix == ".qcow2" for path in sharer_files - {sharer.images["vda"][-1]})


def test_depth_that_selects_nothing_is_refused_and_changes_nothing(
    make_domain, environment
) -> None:
    vm = filled_domain(make_domain, ["only"])
    job = environment.virt_dup("add-job", vm.name, "--depth=-1").stdout.strip()
    before = Untouched.of(vm)

    finished = environment.virt_dup("run", job, check=False)

    assert finished.returncode != 0
    (line,) = error_lines(finished.stderr)
    assert "depth -1" in line and "disk vda" in line and "only.qcow2" in line, line
    assert Untouched.of(vm) == before
    assert overlays_under(vm.directory) == []
    assert not environment.run_record(vm.uuid).exists()
    status = environment.status(job)
    assert status["last_run"]["result"] == "failed"
    assert "depth -1" in status["last_error"]["message"]
    assert "last_success" not in status
    assert not list(environment.backend.rglob("duplicity-*"))


def test_dry_run_prints_the_plan_and_changes_nothing(make_domain, environment) -> None:
    vm = filled_domain(make_domain, ["base", "vm01", "vm01.snap"])
    _base, vm01, snap = vm.images["vda"]
    job = environment.virt_dup("add-job", vm.name, "--depth=-1").stdout.strip()
    before = Untouched.of(vm)

    printed = environment.virt_dup("run", job, "--dry-run").stdout

    assert f"backend: {environment.backend.as_uri()} (full backup)" in printed
    assert "disk vda: chain base.qcow2 <- vm01.qcow2 <- vm01.snap.qcow2" in printed
    backed_up = [line.split("backs up ")[1] for line in printed.splitlines() if "backs up" in line]
    assert backed_up == [str(snap), str(vm01)]
    assert Untouched.of(vm) == before
    assert not environment.run_record(vm.uuid).exists()
    assert not (environment.state / "status" / f"{job}.json").exists()
    assert not list(environment.backend.rglob("duplicity-*"))

    # Once a full exists, the plan says incremental.
    environment.virt_dup("run", job)
    printed = environment.virt_dup("run", job, "--dry-run").stdout
    assert "(incremental backup)" in printed
    assert len(environment.collection(job).backup_sets) == 1


def test_a_shut_off_domain_is_skipped_when_the_job_says_so(make_domain, environment) -> None:
    vm = filled_domain(make_domain, ["base", "vm"], running=False)
    job = environment.virt_dup(
        "add-job", vm.name, "--disable-if-powered-off", "true"
    ).stdout.strip()
    before = Untouched.of(vm)

    finished = environment.virt_dup("run", job)

    assert finished.returncode == 0
    assert "skipped" in finished.stdout
    assert environment.status(job)["last_run"]["result"] == "skipped"
    assert Untouched.of(vm) == before
    assert not list(environment.backend.rglob("duplicity-*"))


def test_quiesce_required_without_a_guest_agent_fails_and_changes_nothing(
    make_domain, environment
) -> None:
    vm = filled_domain(make_domain, ["base", "vm"])
    job = environment.virt_dup("add-job", vm.name, "--quiesce", "required").stdout.strip()
    before = Untouched.of(vm)

    finished = environment.virt_dup("run", job, check=False)

    assert finished.returncode != 0
    (line,) = error_lines(finished.stderr)
    assert "quiesce is required" in line and "agent" in line, line
    assert Untouched.of(vm) == before
    assert overlays_under(vm.directory) == []
    assert not environment.run_record(vm.uuid).exists()
    assert environment.status(job)["last_error"]["result"] == "failed"
    assert not list(environment.backend.rglob("duplicity-*"))


def test_two_jobs_of_one_domain_never_overlap(make_domain, environment, tmp_path) -> None:
    """The second run waits for the domain's lock, then runs."""
    vm = filled_domain(make_domain, ["base", "vm"])
    first_job = environment.virt_dup("add-job", vm.name).stdout.strip()
    second_job = environment.virt_dup("add-job", vm.name, "--depth", "1").stdout.strip()
    first = environment.start_run(first_job)
    wait_for(
        lambda: ".virt-dup-" in str(vm.disk_source("vda")) or first.poll() is not None,
        60,
        "the first run's overlay",
    )
    # Hold the first run in its backup until the second has had every chance to start.
    wait_for(
        lambda: _duplicity_child(first.pid) is not None or first.poll() is not None,
        60,
        "the first run's duplicity",
    )
    duplicity_pid = _duplicity_child(first.pid)
    assert duplicity_pid is not None, first.communicate()
    subprocess.run(["kill", "-STOP", str(duplicity_pid)], check=True)
    try:
        second = environment.start_run(second_job)
        lock = environment.lock_path(vm.uuid)
        wait_for(
            lambda: holds_open(second.pid, lock) or second.poll() is not None,
            60,
            "the second run to reach the lock",
        )
        time.sleep(1)  # it waits there...
        assert second.poll() is None, second.communicate()
        assert [path.name for path in overlays_under(vm.directory)] == [
            f"vm.virt-dup-{first_job}.qcow2"
        ]
        assert lock.read_text().strip() == str(first.pid)
    finally:
        subprocess.run(["kill", "-CONT", str(duplicity_pid)], check=True)
    overlays_seen = set()
    while second.poll() is None:
        overlays = overlays_under(vm.directory)
        assert len(overlays) <= 1, overlays
        overlays_seen.update(path.name for path in overlays)
        time.sleep(0.02)
    assert first.wait(60) == 0, first.communicate()
    assert second.returncode == 0, second.communicate()
    first_status = environment.status(first_job)["last_success"]
    second_status = environment.status(second_job)["last_success"]
    assert second_status["finished"] > first_status["finished"]
    assert overlays_under(vm.directory) == []
    assert vm.disk_chain("vda") == vm.images["vda"]


def _duplicity_child(pid: int) -> int | None:
    for child in children(pid):
        if any(word.endswith("/duplicity") for word in command_of(child)[:2]):
            return child
    return None


def test_full_then_incremental_then_forced_full(make_domain, environment, tmp_path) -> None:
    vm = filled_domain(make_domain, ["base", "vm"])
    base, top = vm.images["vda"]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    manifest = environment.state / "metadata" / job / "manifest.json"

    environment.virt_dup("run", job)
    assert json.loads(manifest.read_text())["full"] is True

    vm.write_pattern("vda", 0x77, 20 * MIB, MIB)
    before = snapshot_files([top, base], tmp_path / "before-incremental")
    environment.virt_dup("run", job)
    assert json.loads(manifest.read_text())["full"] is False
    (chain,) = environment.collection(job).chains
    assert [backup_set.kind for backup_set in chain.sets] == ["full", "incremental"]
    restored = environment.restore_all(job, tmp_path / "restored")
    for original, copy in before.items():
        assert sha256(restored_path(restored, original)) == sha256(copy)
    assert environment.status(job)["last_success"]["full"] is False

    environment.virt_dup("run", "--full", job)
    assert json.loads(manifest.read_text())["full"] is True
    chains = environment.collection(job).chains
    # A second chain; the default incremental_retention (1) drops the first one's incremental.
    assert [[backup_set.kind for backup_set in chain.sets] for chain in chains] == [
        ["full"],
        ["full"],
    ]
