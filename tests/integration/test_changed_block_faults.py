"""The fault matrix of the changed-block path (docs/changed-blocks.md): a QEMU
killed with its bitmaps in use, a run killed while libvirt's backup job still
writes, libvirtd restarted while the job runs.  In each, no guest write is
lost, the domain is left on its own disk, and the next run's point restores to
the disk as it was."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from harness.backups import (
    BackupEnvironment,
    guest_view,
    same_guest_view,
    wait_for,
)
from harness.domains import MIB, ScratchDomain, restart_libvirtd
from test_changed_block_runs import checkpoints

pytestmark = pytest.mark.integration

#: Big enough that libvirt's backup job runs long enough to be caught.
DISK = 512 * MIB
WRITTEN = 448 * MIB


def qemu_pid(vm: ScratchDomain) -> int:
    return int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text().strip())


def job_active(domain: libvirt.virDomain) -> bool:
    try:
        return domain.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
    except libvirt.libvirtError as error:
        # libvirt 9.0, as a backup job begins or ends: there is a job.
        if "backup job data missing" in str(error):
            return True
        raise


def backup_begun(domain: libvirt.virDomain) -> bool:
    try:
        domain.backupGetXMLDesc(0)
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP:
            return False
        raise
    return True


@contextlib.contextmanager
def qemu_stopped(vm: ScratchDomain) -> Iterator[int]:
    """QEMU held (SIGSTOP): its backup job goes no further until it is let go."""
    pid = qemu_pid(vm)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def stderr_lines(run: subprocess.Popen[str]) -> list[str]:
    """The lines ``run`` writes to stderr, as it writes them (read by a thread)."""
    lines: list[str] = []
    assert run.stderr is not None
    stream = run.stderr

    def read() -> None:
        for line in stream:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def backed_up(make_domain, environment: BackupEnvironment) -> tuple[ScratchDomain, Path, str]:
    """A running domain whose job reads changed blocks, after its first (whole) run."""
    vm = make_domain(running=True, size=DISK)
    job = environment.virt_dup("add-job", vm.name, "--changed-blocks", "auto").stdout.strip()
    environment.virt_dup("run", job)
    return vm, vm.images["vda"][-1], job


def run_in_its_backup_job(
    vm: ScratchDomain, environment: BackupEnvironment, job: str
) -> subprocess.Popen[str]:
    """A run started and caught while libvirt's backup job writes its changes: data
    in the changes file means QEMU's transaction is done and ``backup-begin``
    returns without QEMU (held inside it, libvirt's reconnect to QEMU hangs:
    measured, "cannot acquire state change lock (held by monitor=init-...)")."""
    top = vm.images["vda"][-1]
    changes = top.parent / f"{top.stem}.virt-dup-{job}.changes.qcow2"

    def writing() -> bool:
        with contextlib.suppress(FileNotFoundError):
            return changes.stat().st_size > 16 * MIB
        return False

    run = environment.start_run(job)
    try:
        wait_for(lambda: writing() or run.poll() is not None, 120, "the backup job", 0.002)
        # backup-begin's last steps (the checkpoint's metadata) need no QEMU.
        wait_for(lambda: backup_begun(vm.domain), 10, "libvirt's backup")
    except BaseException:
        run.kill()
        run.wait()
        raise
    assert run.poll() is None, run.communicate()
    return run


def latest_restores_to(
    environment: BackupEnvironment, vm: ScratchDomain, top: Path, view: Path, into: Path
) -> None:
    environment.virt_dup("restore", vm.name, "--target-dir", str(into))
    assert same_guest_view(into / "vda" / top.name, view)


def assert_clean(vm: ScratchDomain, top: Path) -> None:
    """On its own top, no backup job, nothing virt-dup made left beside the disk."""
    assert vm.disk_source("vda") == top
    assert vm.disk_chain("vda")[-1] == top
    assert not job_active(vm.domain)
    assert sorted(top.parent.glob("*.virt-dup-*")) == []


def test_a_qemu_killed_with_its_bitmaps_in_use_is_read_whole_once(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    """A host crash (QEMU SIGKILLed): the bitmap in the qcow2 is left ``in-use``,
    QEMU marks it inconsistent at the next start; the run reads the whole files
    (an incremental of the main collection), says why, and the next one reads
    changes again.  Each point restores to the disk as it was."""
    vm = make_domain(running=True, size=64 * MIB)
    top = vm.images["vda"][-1]
    job = environment.virt_dup("add-job", vm.name, "--changed-blocks", "auto").stdout.strip()
    environment.virt_dup("run", job)
    vm.write_pattern("vda", 0x21, 8 * MIB, 2 * MIB)
    environment.virt_dup("run", job)
    assert environment.status(job)["last_success"]["read"] == "changes"
    vm.write_pattern("vda", 0x31, 20 * MIB, 2 * MIB)  # in the live bitmap only

    os.kill(qemu_pid(vm), signal.SIGKILL)
    wait_for(lambda: not vm.domain.isActive(), 60, "libvirt to see QEMU gone", interval=0.1)
    vm.domain.create()
    vm.write_pattern("vda", 0x41, 30 * MIB, 1 * MIB)
    crashed_view = guest_view(top, tmp_path / "crashed.qcow2")
    environment.virt_dup("run", job)

    after_crash = environment.status(job)["last_success"]
    assert after_crash["read"] == "whole", after_crash
    assert after_crash["read_reason"], after_crash
    assert_clean(vm, top)
    latest_restores_to(environment, vm, top, crashed_view, tmp_path / "restored-crash")

    vm.write_pattern("vda", 0x51, 40 * MIB, 1 * MIB)
    view = guest_view(top, tmp_path / "view.qcow2")
    environment.virt_dup("run", job)
    assert environment.status(job)["last_success"]["read"] == "changes"
    assert len(checkpoints(vm)) == 1
    latest_restores_to(environment, vm, top, view, tmp_path / "restored")


def test_a_backup_job_a_killed_run_left_is_aborted_and_the_changes_read_again(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    """SIGKILL while libvirt's job still writes (QEMU held so that it does): the
    next run aborts that job (its files are virt-dup's, the domain's lock is the
    run's) and reads the changes since the last stored set, not the whole disk."""
    vm, top, job = backed_up(make_domain, environment)
    vm.write_pattern("vda", 0x62, 0, WRITTEN)
    killed = run_in_its_backup_job(vm, environment, job)
    with qemu_stopped(vm):
        killed.kill()
        killed.wait(30)
        assert backup_begun(vm.domain)  # (no monitor call: QEMU is stopped)
        view = guest_view(top, tmp_path / "view.qcow2")
        # The next run meets the job; QEMU answers its abort once it is let go.
        run = environment.start_run(job)
        said = stderr_lines(run)
        wait_for(
            lambda: any("aborting" in line for line in said) or run.poll() is not None,
            120,
            "the next run to abort the job",
        )
    run.wait(600)
    errors = "".join(said)

    assert run.returncode == 0, errors
    assert "aborting the changed-block backup a killed run left" in errors, errors
    last = environment.status(job)["last_success"]
    assert last["read"] == "changes", last
    assert_clean(vm, top)
    assert len(checkpoints(vm)) == 1
    latest_restores_to(environment, vm, top, view, tmp_path / "restored")


@pytest.mark.disruptive
def test_a_libvirtd_restart_during_the_backup_job_loses_nothing(
    make_domain, environment: BackupEnvironment, require, tmp_path: Path
) -> None:
    """libvirtd restarted (an upgrade) while the job writes (QEMU held so that it
    does): libvirt recovers its job, the run reconnects, waits for it and stores
    the changes; the domain is on its own disk with no job, and each point
    restores to the disk as it was."""
    vm, top, job = backed_up(make_domain, environment)
    vm.write_pattern("vda", 0x73, 0, WRITTEN)
    view = guest_view(top, tmp_path / "view.qcow2")
    run = run_in_its_backup_job(vm, environment, job)
    with qemu_stopped(vm):
        restart_libvirtd(require)
    make_domain.conn = libvirt.open("qemu:///system")  # the old one died with the daemon
    vm.domain = make_domain.conn.lookupByUUIDString(vm.uuid)
    _output, errors = run.communicate(timeout=600)
    print(f"run across the restart: exit {run.returncode}\n{errors}")

    assert run.returncode == 0, errors
    assert "reconnected to libvirt" in errors, errors
    assert environment.status(job)["last_success"]["read"] == "changes"
    wait_for(lambda: not job_active(vm.domain), 60, "libvirt's recovered job to end")
    assert_clean(vm, top)
    # Its set is what the job read: the disk as it was when the read began.
    latest_restores_to(environment, vm, top, view, tmp_path / "restored-across")

    vm.write_pattern("vda", 0x83, 100 * MIB, 1 * MIB)
    next_view = guest_view(top, tmp_path / "next.qcow2")
    environment.virt_dup("run", job)
    assert environment.status(job)["last_success"]["read"] == "changes"
    assert_clean(vm, top)
    assert len(checkpoints(vm)) == 1
    latest_restores_to(environment, vm, top, next_view, tmp_path / "restored")
    listing = json.loads(environment.virt_dup("backups", vm.name, "--json").stdout)["jobs"][0]
    assert listing["backups"][-1]["type"] == "changes"
