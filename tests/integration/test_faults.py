"""The ways a backup could lose a write, strand a domain on its overlay or claim a
backup it cannot restore -- each one provoked on real libvirtd + QEMU.

Every test names the defect it covers (issue "Trust", numbered as there) and
checks what a user relies on: the domain is back on its own chain, the
backup restores byte for byte, and a failure is one clear line, never a
success.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from harness.backups import (
    QUICK_FAILURE,
    BackupEnvironment,
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
from harness.domains import MIB, ScratchDomain, read_pattern_ok, restart_libvirtd

from virt_dup.backup.overlay import OverlayKept, create_overlays, merge_overlay, overlay_path
from virt_dup.libvirt.connection import Hypervisor

pytestmark = pytest.mark.integration

_INACTIVE = 2  # libvirt.VIR_DOMAIN_XML_INACTIVE
JOB = "0b9f6c1e-6f43-4c1e-9d1a-2b8f3c4d5e6f"
MERGE_TIMEOUT_S = 60.0


def duplicity_child(pid: int) -> int | None:
    """The duplicity a ``virt-dup run`` (process ``pid``) runs now, if any."""
    for child in children(pid):
        if any(word.endswith("/duplicity") for word in command_of(child)[:2]):
            return child
    return None


def backup_duplicity(vm: ScratchDomain, run: subprocess.Popen[str]) -> int:
    """The pid of the duplicity that backs up (once the overlay is on: the
    duplicity before it only reads the collection's status)."""
    wait_for(lambda: on_overlay(vm) or run.poll() is not None, 60, "the overlay")
    wait_for(lambda: duplicity_child(run.pid) or run.poll() is not None, 60, "duplicity")
    duplicity = duplicity_child(run.pid)
    assert duplicity is not None, run.communicate()
    return duplicity


def on_overlay(vm: ScratchDomain, inactive: bool = False) -> bool:
    return ".virt-dup-" in str(vm.disk_source("vda", inactive=inactive))


def linked_domain(make_domain, libvirt_conn, link: str) -> tuple[ScratchDomain, Path, Path]:
    """A shut-off domain ``base <- vm`` whose disk the domain names through a
    symbolic link: ``directory`` (the images directory is a link, as
    ``/var/lib/libvirt/images -> /data/images`` often is, and the top names
    its base through it too) or ``file`` (the disk file is a link).

    Returns the domain, the path the domain uses and the real top file.
    """
    vm = make_domain(chain=["base", "vm"], running=False)
    base, top = vm.images["vda"]
    fill(base, 0x41, 0, MIB)
    fill(top, 0x42, MIB, MIB)
    if link == "directory":
        alias = vm.directory / "images-link"
        alias.symlink_to(top.parent, target_is_directory=True)
        subprocess.run(
            [
                "qemu-img",
                "rebase",
                "-u",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                alias / base.name,
                top,
            ],
            check=True,
        )
        source = alias / top.name
    else:
        source = vm.directory / "vm-link.qcow2"
        source.symlink_to(top)
    xml = vm.domain.XMLDesc(_INACTIVE).replace(f"file='{top}'", f"file='{source}'")
    assert f"file='{source}'" in xml
    vm.domain = libvirt_conn.defineXML(xml)
    return vm, source, top


# -- 1. images behind a symbolic link --------------------------------------------------


@pytest.mark.parametrize("link", ["directory", "file"])
def test_images_behind_a_symbolic_link_are_backed_up_in_full(
    make_domain, libvirt_conn, environment: BackupEnvironment, tmp_path: Path, link: str
) -> None:
    vm, source, top = linked_domain(make_domain, libvirt_conn, link)
    base = vm.images["vda"][0]
    before = snapshot_files([base, top], tmp_path / "before")
    vm.domain.create()
    job = environment.virt_dup("add-job", vm.name).stdout.strip()

    environment.virt_dup("run", job)

    # The backup holds the files themselves, not the links to them.
    assert {top, base} <= environment.backed_up_files(job)
    restored = environment.restore_all(job, tmp_path / "plain")
    for original, copy in before.items():
        assert sha256(restored_path(restored, original)) == sha256(copy)
    # virt-dup's own restore finds them under the names the domain uses.
    target = tmp_path / "restored"
    environment.virt_dup("restore", vm.name, "--target-dir", str(target))
    restored_top = target / "vda" / source.name
    compared = subprocess.run(
        ["qemu-img", "compare", "-U", restored_top, source], capture_output=True, text=True
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    # The domain is back on the path it uses, through the link.
    assert vm.disk_source("vda") == source
    assert vm.disk_source("vda", inactive=True) == source


# -- 2. never delete an overlay this run did not create and merge -------------------------


def test_an_overlay_named_file_in_the_way_is_refused_and_never_deleted(
    make_domain, environment: BackupEnvironment
) -> None:
    """2a: a file where the overlay would go is someone's (an interrupted run's, an
    admin's): the run refuses, and the file is left exactly as it was."""
    vm = make_domain(chain=["base", "vm"])
    top = vm.images["vda"][-1]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    stray = Path(overlay_path(str(top), job))
    stray.write_bytes(b"not virt-dup's to delete")

    finished = environment.virt_dup("run", job, check=False)

    assert finished.returncode == 1
    (line,) = error_lines(finished.stderr)
    assert f"overlay file {stray} for disk vda already exists" in line
    assert stray.read_bytes() == b"not virt-dup's to delete"
    assert vm.disk_source("vda") == top
    assert vm.disk_source("vda", inactive=True) == top
    assert not environment.run_record(vm.uuid).exists()


def test_an_overlay_no_definition_uses_is_kept_with_the_guests_writes(
    make_domain, libvirt_conn
) -> None:
    """2b: a shut-off domain is started during the backup, writes, stops, and is
    defined on its original top again (a template, config management): the
    overlay holds writes the top does not have, so the merge keeps it."""
    vm = make_domain(chain=["base", "vm"], running=False)
    hypervisor = Hypervisor(libvirt_conn)
    top = vm.images["vda"][-1]
    overlay = Path(overlay_path(str(top), JOB))
    definition = vm.domain.XMLDesc(_INACTIVE)
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    vm.domain.create()  # runs on the overlay
    vm.write_pattern("vda", 0xAB, 2 * MIB, MIB)
    vm.domain.destroy()
    libvirt_conn.defineXML(definition)  # back on its top, the overlay forgotten

    with pytest.raises(OverlayKept, match=r"may hold guest writes .* it is kept"):
        merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)

    assert read_pattern_ok(overlay, 0xAB, 2 * MIB, MIB, with_backing=False)
    assert not read_pattern_ok(top, 0xAB, 2 * MIB, MIB, with_backing=False)
    assert vm.disk_source("vda", inactive=True) == top


def test_an_unused_overlay_that_holds_nothing_new_is_deleted(make_domain, libvirt_conn) -> None:
    """2b, the other way: the same forgotten overlay, never written, holds nothing
    the top lacks (qemu-img compare): deleting it loses nothing."""
    vm = make_domain(chain=["base", "vm"], running=False)
    hypervisor = Hypervisor(libvirt_conn)
    top = vm.images["vda"][-1]
    overlay = Path(overlay_path(str(top), JOB))
    definition = vm.domain.XMLDesc(_INACTIVE)
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    libvirt_conn.defineXML(definition)

    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)

    assert not overlay.exists()
    assert vm.disk_source("vda", inactive=True) == top


# -- 3. the merge never depends on a state write ----------------------------------------


@contextlib.contextmanager
def tmpfs(directory: Path, size: str, *options: str) -> Iterator[Path]:
    """A tmpfs of ``size`` on ``directory`` for the block (``ro``: read-only)."""
    directory.mkdir(parents=True, exist_ok=True)
    mount_options = ",".join([f"size={size}", "mode=0700", *options])
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", mount_options, "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=False)


@pytest.fixture
def small_state_directory(environment: BackupEnvironment) -> Iterator[Path]:
    """virt-dup's state directory on a 2 MiB tmpfs, to fill up mid-run."""
    with tmpfs(environment.state, "2m") as directory:
        yield directory


def fill_up(directory: Path) -> None:
    """Write zeros until the file system is full."""
    descriptor = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(descriptor, b"\0" * 65536):
            pass
    except OSError:
        pass
    finally:
        os.close(descriptor)


def test_a_full_state_directory_never_keeps_a_domain_on_its_overlay(
    make_domain, environment: BackupEnvironment, small_state_directory: Path
) -> None:
    """3: the state directory fills up during the backup (/var full: duplicity
    stages in /var/cache); the run record cannot be written any more, yet the
    overlay is merged and the failure is one recorded line."""
    vm = make_domain(chain=["base", "vm"], size=128 * MIB, running=False)
    base, top = vm.images["vda"]
    fill(base, 0x22, 0, 32 * MIB)
    fill(top, 0x11, 32 * MIB, 32 * MIB)
    vm.domain.create()
    job = environment.virt_dup("add-job", vm.name).stdout.strip()

    run = environment.start_run(job)
    wait_for(lambda: on_overlay(vm) or run.poll() is not None, 60, "the overlay")
    fill_up(small_state_directory)
    vm.write_pattern("vda", 0xC5, 64 * MIB, MIB)
    _output, errors = run.communicate(timeout=600)

    assert vm.disk_source("vda") == top
    assert vm.disk_source("vda", inactive=True) == top
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
    assert vm.read_pattern_ok(top, 0xC5, 64 * MIB, MIB)
    assert run.returncode == 1, errors
    (line,) = error_lines(errors)
    assert "No space left on device" in line
    assert "internal error" not in errors


# -- 10. a job id in two domains (virt-clone copies <metadata>) ---------------------------

_NAMESPACE = "https://www.github.com/spencerharmon/virt-dup"


def test_a_job_id_in_two_domains_is_a_loud_error_naming_the_fix(
    make_domain, environment: BackupEnvironment
) -> None:
    original = make_domain(chain=["vm"])
    clone = make_domain(chain=["vm"])
    job = environment.virt_dup("add-job", original.name).stdout.strip()
    element = original.domain.metadata(2, _NAMESPACE, 0)  # VIR_DOMAIN_METADATA_ELEMENT
    clone.domain.setMetadata(2, element, "virt-dup", _NAMESPACE, 3)  # AFFECT_LIVE | AFFECT_CONFIG

    finished = environment.virt_dup("run", job, check=False)
    assert finished.returncode == 2
    (line,) = error_lines(finished.stderr)
    assert f"job {job} is in domains {original.name}, {clone.name}" in line
    assert f"virt-dup remove-all-jobs {clone.name} --yes && virt-dup add-job {clone.name}" in line
    assert sorted(original.directory.parent.rglob("*.virt-dup-*")) == []

    listed = environment.virt_dup("list-jobs")
    assert f"warning: job {job} is in domains {original.name}, {clone.name}" in listed.stderr


# -- 8. two configurations, one domain ---------------------------------------------------


def test_a_second_configuration_never_touches_the_overlay_of_a_live_run(
    make_domain, environment: BackupEnvironment, gpg_home, tmp_path: Path
) -> None:
    """Two virt-dup.yml (two state directories) back up one domain at once: the
    second run's recovery finds the first run's overlay without a record of its
    own; it must wait for the domain (the lock is the host's), not merge it."""
    (tmp_path / "other").mkdir()
    other = BackupEnvironment.create(tmp_path / "other", gpg_home.path, gpg_home.fingerprint)
    vm = make_domain(chain=["base", "vm"], size=128 * MIB, running=False)
    base, top = vm.images["vda"]
    fill(base, 0x22, 0, 48 * MIB)
    fill(top, 0x11, 48 * MIB, 48 * MIB)
    vm.domain.create()
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    before = snapshot_files([top, base], tmp_path / "before")

    first = environment.start_run(job)
    wait_for(lambda: on_overlay(vm) or first.poll() is not None, 60, "the overlay")
    second = other.start_run(job)
    vm.write_pattern("vda", 0xE1, 100 * MIB, MIB)  # during the first backup
    first_errors = first.communicate(timeout=600)[1]
    second_errors = second.communicate(timeout=600)[1]

    assert first.returncode == 0, first_errors
    assert second.returncode == 0, second_errors
    assert vm.disk_source("vda") == top
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
    assert vm.read_pattern_ok(top, 0xE1, 100 * MIB, MIB)
    # The first backup is the point in time its run began, the second has the write.
    restored = environment.restore_all(job, tmp_path / "first")
    for original, copy in before.items():
        assert sha256(restored_path(restored, original)) == sha256(copy)
    second_restore = other.restore_all(job, tmp_path / "second")
    assert read_pattern_ok(
        restored_path(second_restore, top), 0xE1, 100 * MIB, MIB, with_backing=False
    )


# -- 4. libvirtd restarted during the run --------------------------------------------------


@pytest.mark.disruptive
def test_a_libvirtd_restart_during_the_backup_never_strands_the_domain(
    make_domain, environment: BackupEnvironment, require, tmp_path: Path
) -> None:
    vm = make_domain(chain=["base", "vm"], size=128 * MIB, running=False)
    base, top = vm.images["vda"]
    fill(base, 0x22, 0, 48 * MIB)
    fill(top, 0x11, 48 * MIB, 48 * MIB)
    vm.domain.create()
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    before = snapshot_files([top, base], tmp_path / "before")

    run = environment.start_run(job)
    # Hold the run in duplicity while libvirtd restarts: its merge meets a dead connection.
    duplicity = backup_duplicity(vm, run)
    os.kill(duplicity, signal.SIGSTOP)
    try:
        restart_libvirtd(require)
    finally:
        os.kill(duplicity, signal.SIGCONT)
    make_domain.conn = libvirt.open("qemu:///system")  # the old one died with the daemon
    vm.domain = make_domain.conn.lookupByUUIDString(vm.uuid)
    vm.write_pattern("vda", 0xE4, 100 * MIB, MIB)
    _output, errors = run.communicate(timeout=600)

    assert run.returncode == 0, errors
    assert vm.disk_source("vda") == top
    assert vm.disk_source("vda", inactive=True) == top
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
    assert vm.read_pattern_ok(top, 0xE4, 100 * MIB, MIB)
    restored = environment.restore_all(job, tmp_path / "restored")
    for original, copy in before.items():
        assert sha256(restored_path(restored, original)) == sha256(copy)


# -- 5. stopping a run, and a duplicity that stalls ----------------------------------------


def held_in_duplicity(
    make_domain, environment: BackupEnvironment, *options: str
) -> tuple[ScratchDomain, subprocess.Popen[str], int]:
    """A running domain whose run is held in duplicity (SIGSTOP: as a backend that
    stopped answering holds it).  Returns the domain, the run and duplicity's pid."""
    vm = make_domain(chain=["base", "vm"], size=128 * MIB, running=False)
    base, top = vm.images["vda"]
    fill(base, 0x22, 0, 48 * MIB)
    fill(top, 0x11, 48 * MIB, 48 * MIB)
    vm.domain.create()
    job = environment.virt_dup("add-job", vm.name, *options).stdout.strip()
    run = environment.start_run(job)
    duplicity = backup_duplicity(vm, run)
    os.kill(duplicity, signal.SIGSTOP)
    return vm, run, duplicity


def assert_back_on_its_top(vm: ScratchDomain) -> None:
    top = vm.images["vda"][-1]
    assert vm.disk_source("vda") == top
    assert vm.disk_source("vda", inactive=True) == top
    assert vm.domain.blockJobInfo("vda", 0) == {}  # no block job left mirroring
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []


def test_a_stalled_duplicity_is_stopped_and_the_domain_merged(
    make_domain, environment: BackupEnvironment
) -> None:
    vm, run, duplicity = held_in_duplicity(make_domain, environment, "--stall-timeout", "3s")
    errors = run_ends(run, duplicity)

    assert run.returncode == 1, errors
    (line,) = error_lines(errors)
    assert "stalled (no sign of life for 3 s) and was stopped" in line
    assert_back_on_its_top(vm)
    assert not Path(f"/proc/{duplicity}").exists() or _is_zombie(duplicity)


def test_sigterm_mid_backup_merges_and_exits_with_one_line(
    make_domain, environment: BackupEnvironment
) -> None:
    """systemctl stop (KillMode=mixed: SIGTERM to virt-dup alone): duplicity is
    stopped, the overlay merged, the run fails saying so."""
    vm, run, duplicity = held_in_duplicity(make_domain, environment)
    run.send_signal(signal.SIGTERM)
    errors = run_ends(run, duplicity)

    assert run.returncode == 1, errors
    (line,) = error_lines(errors)
    assert "stopped by SIGTERM; merging overlays back" in line
    assert_back_on_its_top(vm)


def run_ends(run: subprocess.Popen[str], duplicity: int) -> str:
    """Wait for a run whose duplicity is held (and let it go, if it is still
    there, whatever happens); returns the run's stderr."""
    try:
        return run.communicate(timeout=120)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(duplicity, signal.SIGCONT)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


# -- 6. managedsave during the backup ------------------------------------------------------


def test_a_domain_managed_saved_mid_backup_resumes_with_its_memory(
    make_domain, environment: BackupEnvironment
) -> None:
    """``virsh managedsave`` (libvirt-guests with ON_SHUTDOWN=suspend) while the
    backup runs: the merge keeps the saved state usable, and the guest resumes
    from it on its own top with every write."""
    vm, run, duplicity = held_in_duplicity(make_domain, environment)
    top = vm.images["vda"][-1]
    vm.write_pattern("vda", 0xE6, 100 * MIB, MIB)  # into the overlay
    vm.domain.managedSave(0)
    os.kill(duplicity, signal.SIGCONT)
    _output, errors = run.communicate(timeout=600)

    assert run.returncode == 0, errors
    assert vm.domain.hasManagedSaveImage(0)
    assert vm.disk_source("vda", inactive=True) == top
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
    assert read_pattern_ok(top, 0xE6, 100 * MIB, MIB, with_backing=False)
    vm.domain.create()  # resumes from the saved state
    assert vm.domain.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_RESTORED]
    assert vm.disk_source("vda") == top
    assert vm.read_pattern_ok(top, 0xE6, 100 * MIB, MIB)


# -- 9. the offline commit: QEMU's image lock, and a kill in the middle --------------------


def test_a_merge_right_after_a_destroy_waits_for_qemus_image_lock(
    make_domain, libvirt_conn
) -> None:
    vm = make_domain(chain=["base", "vm"])
    hypervisor = Hypervisor(libvirt_conn)
    top = vm.images["vda"][-1]
    overlay = Path(overlay_path(str(top), JOB))
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    vm.write_pattern("vda", 0xA9, 3 * MIB, MIB)
    vm.domain.destroy()  # QEMU may hold its locks a moment after this returns

    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)

    assert not overlay.exists()
    assert vm.disk_source("vda", inactive=True) == top
    assert read_pattern_ok(top, 0xA9, 3 * MIB, MIB, with_backing=False)


def test_a_kill_in_the_middle_of_the_offline_commit_loses_nothing(
    make_domain, libvirt_conn
) -> None:
    """``qemu-img commit`` copies the overlay's clusters into its backing file and
    changes nothing else: killed half-way, the overlay still holds every write
    and the definition still names it, so the next merge simply does it again."""
    vm = make_domain(chain=["base", "vm"], size=256 * MIB, running=False)
    hypervisor = Hypervisor(libvirt_conn)
    top = vm.images["vda"][-1]
    overlay = Path(overlay_path(str(top), JOB))
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    patterns = [(0x60 + number, number * 16 * MIB) for number in range(12)]
    for pattern, offset in patterns:
        fill(overlay, pattern, offset, 8 * MIB)
    commit = subprocess.Popen(["qemu-img", "commit", "-q", "-f", "qcow2", str(overlay)])
    time.sleep(0.05)
    commit.kill()
    commit.wait()
    assert vm.disk_source("vda", inactive=True) == overlay

    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)

    assert not overlay.exists()
    assert vm.disk_source("vda", inactive=True) == top
    for pattern, offset in patterns:
        assert read_pattern_ok(top, pattern, offset, 8 * MIB, with_backing=False)


# -- 7. the pivot under sustained guest writes ----------------------------------------------


def test_the_merge_pivots_while_the_guest_keeps_writing(make_domain, libvirt_conn) -> None:
    """A guest that never stops writing: QEMU's commit job is READY while its
    cur trails end; the pivot must not wait for a cur == end sample."""
    vm = make_domain(chain=["base", "vm"], size=128 * MIB)
    hypervisor = Hypervisor(libvirt_conn)
    top = vm.images["vda"][-1]
    overlay = Path(overlay_path(str(top), JOB))
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    written: list[tuple[int, int]] = []
    stop = threading.Event()

    def keep_writing() -> None:
        number = 0
        while not stop.is_set():
            pattern, offset = 0x10 + number % 0xE0, (number % 96) * MIB
            vm.write_pattern("vda", pattern, offset, MIB)
            written.append((pattern, offset))
            number += 1

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    try:
        time.sleep(0.5)
        merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)
    finally:
        stop.set()
        writer.join(30)

    assert not overlay.exists()
    assert vm.disk_source("vda") == top
    assert len(written) > 10
    latest = {offset: pattern for pattern, offset in written}  # the last write at each offset
    for offset, pattern in latest.items():
        assert vm.read_pattern_ok(top, pattern, offset, MIB)


# -- 2c. a domain undefined while it runs ----------------------------------------------------


def test_a_domain_undefined_during_the_backup_is_merged_live(
    make_domain, environment: BackupEnvironment
) -> None:
    """``virsh undefine`` while the backup runs: the domain goes on, transient, on
    its overlay; the merge puts it back on its top with every write."""
    vm, run, duplicity = held_in_duplicity(make_domain, environment)
    top = vm.images["vda"][-1]
    vm.write_pattern("vda", 0xD2, 100 * MIB, MIB)
    vm.domain.undefine()
    os.kill(duplicity, signal.SIGCONT)
    _output, errors = run.communicate(timeout=600)

    assert run.returncode == 0, errors
    assert not vm.domain.isPersistent()
    assert vm.disk_source("vda") == top
    assert vm.domain.blockJobInfo("vda", 0) == {}
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
    assert vm.read_pattern_ok(top, 0xD2, 100 * MIB, MIB)
    # libvirt 9.0 writes the definition file again at the pivot: the domain would
    # be defined again at libvirtd's next start, and the run says so.
    definition = Path("/etc/libvirt/qemu") / f"{vm.name}.xml"
    warnings = [line for line in errors.splitlines() if "was undefined during the backup" in line]
    if definition.exists():
        assert len(warnings) == 1, errors
        assert str(definition) in warnings[0]
    else:
        assert warnings == [], errors


def test_a_domain_that_vanishes_during_the_backup_keeps_its_overlay_and_says_so(
    make_domain, environment: BackupEnvironment
) -> None:
    """Undefined and then stopped while the backup runs, the domain is gone; its
    overlay holds its last writes: kept, and the run fails saying where."""
    vm, run, duplicity = held_in_duplicity(make_domain, environment)
    vm.write_pattern("vda", 0xD3, 100 * MIB, MIB)
    vm.domain.undefine()
    vm.domain.destroy()
    os.kill(duplicity, signal.SIGCONT)
    _output, errors = run.communicate(timeout=600)

    assert run.returncode == 1, errors
    (line,) = error_lines(errors)
    assert "overlays not merged back" in line
    (kept,) = sorted(vm.directory.rglob("*.virt-dup-*"))
    assert read_pattern_ok(kept, 0xD3, 100 * MIB, MIB, with_backing=False)


# -- the backend and duplicity's cache: unreachable, read-only, full ----------------------


def backed_up_domain(make_domain, environment: BackupEnvironment) -> tuple[ScratchDomain, str]:
    vm = make_domain(chain=["base", "vm"], size=128 * MIB, running=False)
    base, top = vm.images["vda"]
    fill(base, 0x22, 0, 16 * MIB)
    fill(top, 0x11, 16 * MIB, 16 * MIB)
    vm.domain.create()
    return vm, environment.virt_dup("add-job", vm.name, *QUICK_FAILURE).stdout.strip()


@pytest.mark.parametrize(
    ("where", "size", "options", "reason"),
    [
        # duplicity cannot make the job's directory: it says "No such file".
        ("backend", "4m", ("ro",), "could not reach file://"),
        ("backend", "1m", (), "No space left on device"),
        # duplicity checks its temporary space first.
        ("cache", "1m", (), "not enough freespace"),
    ],
    ids=["backend-read-only", "backend-full", "cache-full"],
)
def test_a_backend_or_cache_that_cannot_take_the_backup_fails_it_cleanly(
    make_domain,
    environment: BackupEnvironment,
    where: str,
    size: str,
    options: tuple[str, ...],
    reason: str,
) -> None:
    vm, job = backed_up_domain(make_domain, environment)
    directory = environment.backend if where == "backend" else environment.cache
    with tmpfs(directory, size, *options):
        finished = environment.virt_dup("run", job, check=False)

    assert finished.returncode == 1, finished.stderr
    (line,) = error_lines(finished.stderr)
    assert reason in line, line
    assert_back_on_its_top(vm)
    vm.write_pattern("vda", 0xB7, 64 * MIB, MIB)
    # Once there is room again, the next run backs it up.
    environment.virt_dup("run", job)
    assert_back_on_its_top(vm)
    assert vm.read_pattern_ok(vm.images["vda"][-1], 0xB7, 64 * MIB, MIB)


def test_an_unreachable_backend_fails_the_run_before_anything_is_touched(
    make_domain, environment: BackupEnvironment
) -> None:
    vm = make_domain(chain=["base", "vm"])
    job = environment.virt_dup(
        "add-job", vm.name, "--backend", "sftp://nobody@127.0.0.1:1/backups"
    ).stdout.strip()
    finished = environment.virt_dup("run", job, check=False)

    assert finished.returncode == 1
    (line,) = error_lines(finished.stderr)
    assert "could not reach sftp://nobody@127.0.0.1:1/backups" in line
    assert_back_on_its_top(vm)
    assert not environment.run_record(vm.uuid).exists()


def test_a_domain_suspended_during_the_backup_is_merged_and_stays_paused(
    make_domain, environment: BackupEnvironment
) -> None:
    vm, run, duplicity = held_in_duplicity(make_domain, environment)
    vm.write_pattern("vda", 0xD5, 100 * MIB, MIB)
    vm.domain.suspend()
    os.kill(duplicity, signal.SIGCONT)
    _output, errors = run.communicate(timeout=600)

    assert run.returncode == 0, errors
    assert vm.domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert_back_on_its_top(vm)
    vm.domain.resume()
    assert vm.read_pattern_ok(vm.images["vda"][-1], 0xD5, 100 * MIB, MIB)


# -- more of the matrix: killed right after the pivot, destroyed mid-backup -----------------


def test_a_merge_killed_after_its_pivot_is_finished_without_losing_a_write(
    make_domain, libvirt_conn
) -> None:
    """The run was killed right after the pivot, before it could record it: the
    disk is back on its top, the overlay still there.  The next merge deletes
    it only because ``qemu-img compare`` finds nothing in it the top lacks."""
    vm = make_domain(chain=["base", "vm"])
    hypervisor = Hypervisor(libvirt_conn)
    top = vm.images["vda"][-1]
    overlay = Path(overlay_path(str(top), JOB))
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    vm.write_pattern("vda", 0xF1, 5 * MIB, MIB)
    subprocess.run(
        ["virsh", "-q", "blockcommit", vm.name, "vda", "--active", "--shallow", "--pivot"],
        check=True,
        capture_output=True,
    )
    assert vm.disk_source("vda") == top and overlay.exists()

    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)

    assert_back_on_its_top(vm)
    assert vm.read_pattern_ok(top, 0xF1, 5 * MIB, MIB)


def test_a_domain_destroyed_during_the_backup_is_merged_offline(
    make_domain, environment: BackupEnvironment
) -> None:
    vm, run, duplicity = held_in_duplicity(make_domain, environment)
    top = vm.images["vda"][-1]
    vm.write_pattern("vda", 0xD7, 100 * MIB, MIB)
    vm.domain.destroy()
    os.kill(duplicity, signal.SIGCONT)
    _output, errors = run.communicate(timeout=600)

    assert run.returncode == 0, errors
    assert not vm.domain.isActive()
    assert vm.disk_source("vda", inactive=True) == top
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
    assert read_pattern_ok(top, 0xD7, 100 * MIB, MIB, with_backing=False)


@pytest.mark.disruptive
def test_a_libvirtd_restart_during_the_blockcommit_never_strands_the_domain(
    make_domain, environment: BackupEnvironment, require
) -> None:
    """libvirtd goes away while QEMU commits the overlay (QEMU carries on alone,
    and waits READY for a pivot): the run reconnects, finds the job and pivots."""
    vm, run, duplicity = held_in_duplicity(make_domain, environment)
    top = vm.images["vda"][-1]
    for number in range(96):  # 96 MiB in the overlay: the commit takes a moment
        vm.write_pattern("vda", 0x80 + number % 64, 16 * MIB + number * MIB, MIB)
    os.kill(duplicity, signal.SIGCONT)
    wait_for(
        lambda: bool(vm.domain.blockJobInfo("vda", 0)) or run.poll() is not None,
        120,
        "the block commit",
        interval=0.001,
    )
    os.kill(run.pid, signal.SIGSTOP)  # in the middle of its merge
    try:
        assert vm.domain.blockJobInfo("vda", 0), "the merge finished before the stop"
        restart_libvirtd(require)
    finally:
        os.kill(run.pid, signal.SIGCONT)
    make_domain.conn = libvirt.open("qemu:///system")
    vm.domain = make_domain.conn.lookupByUUIDString(vm.uuid)
    _output, errors = run.communicate(timeout=600)

    assert run.returncode == 0, errors
    assert_back_on_its_top(vm)
    for number in range(96):
        assert vm.read_pattern_ok(top, 0x80 + number % 64, 16 * MIB + number * MIB, MIB)


# -- SIGKILL: in the offline commit of a shut-off domain, and with two disks -----------------


def qemu_img_commit_child(pid: int) -> int | None:
    for child in children(pid):
        command = command_of(child)
        if command[:1] and command[0].endswith("qemu-img") and "commit" in command:
            return child
    return None


def test_sigkill_during_the_offline_commit_then_recover(
    make_domain, environment: BackupEnvironment
) -> None:
    vm = make_domain(chain=["base", "vm"], size=320 * MIB, running=False)
    base, top = vm.images["vda"]
    fill(base, 0x22, 0, 8 * MIB)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    overlay = Path(overlay_path(str(top), job))
    run = environment.start_run(job)
    duplicity = backup_duplicity(vm, run)
    os.kill(duplicity, signal.SIGSTOP)
    try:
        fill(overlay, 0xAB, 16 * MIB, 256 * MIB)  # what a power-on during the backup writes
    finally:
        os.kill(duplicity, signal.SIGCONT)
    wait_for(
        lambda: qemu_img_commit_child(run.pid) or run.poll() is not None,
        120,
        "the offline commit",
        interval=0.001,
    )
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait(10) == -signal.SIGKILL, "the run ended before the kill"
    assert vm.disk_source("vda", inactive=True) == overlay
    assert environment.run_record(vm.uuid).exists()

    recovered = environment.virt_dup("recover")

    assert f"domain {vm.name}: disk vda back on {top}" in recovered.stdout
    assert vm.disk_source("vda", inactive=True) == top
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
    assert not environment.run_record(vm.uuid).exists()
    assert read_pattern_ok(top, 0xAB, 16 * MIB, 256 * MIB, with_backing=False)
    environment.virt_dup("run", job)  # the next run succeeds


def test_sigkill_of_a_two_disk_backup_then_recover(
    make_domain, environment: BackupEnvironment
) -> None:
    vm = make_domain(chain=["base", "vm"], disks=("vda", "vdb"), size=128 * MIB, running=False)
    for number, disk in enumerate(("vda", "vdb")):
        fill(vm.images[disk][0], 0x20 + number, 0, 32 * MIB)
    vm.domain.create()
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    run = environment.start_run(job)
    backup_duplicity(vm, run)
    for number, disk in enumerate(("vda", "vdb")):
        vm.write_pattern(disk, 0xE0 + number, 64 * MIB, MIB)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait(10) == -signal.SIGKILL

    recovered = environment.virt_dup("recover")

    for number, disk in enumerate(("vda", "vdb")):
        top = vm.images[disk][-1]
        assert f"domain {vm.name}: disk {disk} back on {top}" in recovered.stdout
        assert vm.disk_source(disk) == top
        assert vm.disk_source(disk, inactive=True) == top
        assert vm.read_pattern_ok(top, 0xE0 + number, 64 * MIB, MIB)
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
    environment.virt_dup("run", job)


# -- a run during a restore of the same domain; recovery past a failing domain ---------------


def test_a_run_during_an_in_place_restore_waits_for_it(
    make_domain, environment: BackupEnvironment
) -> None:
    vm = make_domain(chain=["base", "vm"], size=64 * MIB, running=False)
    base, top = vm.images["vda"]
    fill(base, 0x22, 0, 8 * MIB)
    fill(top, 0x11, 8 * MIB, 8 * MIB)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    environment.virt_dup("run", job)
    fill(top, 0xEE, 0, MIB)  # the disk changes after the backup
    command = [sys.executable, "-m", "virt_dup", "--config", str(environment.config)]
    restore = subprocess.Popen(
        [*command, "restore", vm.name, "--in-place"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment.process_environment,
    )
    lock = environment.lock_path(vm.uuid)
    # Hold the restore in its duplicity while it holds the domain's lock.
    wait_for(
        lambda: (
            (holds_open(restore.pid, lock) and duplicity_child(restore.pid))
            or restore.poll() is not None
        ),
        60,
        "the restore's duplicity under the lock",
        interval=0.001,
    )
    held = duplicity_child(restore.pid)
    assert held is not None, restore.communicate()
    os.kill(held, signal.SIGSTOP)
    try:
        run = environment.start_run(job)
        time.sleep(2)
        assert run.poll() is None, run.communicate()  # waits for the domain's lock
        assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(held, signal.SIGCONT)
    restore_errors = restore.communicate(timeout=300)[1]
    run_errors = run.communicate(timeout=300)[1]

    assert restore.returncode == 0, restore_errors
    assert run.returncode == 0, run_errors
    assert vm.disk_source("vda", inactive=True) == top
    assert sorted(path.name for path in top.parent.iterdir()) == ["base.qcow2", "vm.qcow2"]
    assert not read_pattern_ok(top, 0xEE, 0, MIB, with_backing=False)  # restored, then backed up
    assert read_pattern_ok(top, 0x11, 8 * MIB, 8 * MIB, with_backing=False)


def test_recovery_goes_on_past_a_domain_it_cannot_merge(
    make_domain, libvirt_conn, environment: BackupEnvironment
) -> None:
    """11: one domain's overlay cannot be merged now (another block job holds its
    disk): ``recover`` says so and still recovers the next domain."""
    hypervisor = Hypervisor(libvirt_conn)
    busy, other = (make_domain(chain=["base", "vm"], running=False) for _ in range(2))
    overlays = {}
    for vm in (busy, other):
        fill(vm.images["vda"][0], 0x22, 0, 16 * MIB)  # 16 MiB for a block pull to copy
        vm.domain.create()
        overlays[vm.name] = Path(overlay_path(str(vm.images["vda"][-1]), JOB))
        create_overlays(hypervisor, vm.domain, {"vda": str(overlays[vm.name])}, "auto")
        vm.write_pattern("vda", 0x5A, 2 * MIB, MIB)
    # A slow block pull (64 KiB/s) on the busy domain's overlay: not virt-dup's to touch.
    busy.domain.blockPull("vda", 64 * 1024, libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES)
    try:
        recovered = environment.virt_dup("recover", check=False)
    finally:
        busy.domain.blockJobAbort("vda", 0)

    assert recovered.returncode == 1
    assert f"domain {busy.name}: disk vda is busy with another block job" in recovered.stderr
    assert f"domain {other.name}: disk vda back on {other.images['vda'][-1]}" in recovered.stdout
    assert other.disk_source("vda") == other.images["vda"][-1]
    assert not overlays[other.name].exists()
    assert other.read_pattern_ok(other.images["vda"][-1], 0x5A, 2 * MIB, MIB)
    # Once the other job is gone, recovery finishes the busy domain too.
    environment.virt_dup("recover")
    assert busy.disk_source("vda") == busy.images["vda"][-1]
    assert busy.read_pattern_ok(busy.images["vda"][-1], 0x5A, 2 * MIB, MIB)


def test_sigkill_of_a_shut_off_domains_backup_then_the_next_run_recovers(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    vm = make_domain(chain=["base", "vm"], size=128 * MIB, running=False)
    base, top = vm.images["vda"]
    fill(base, 0x22, 0, 32 * MIB)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    overlay = Path(overlay_path(str(top), job))
    run = environment.start_run(job)
    backup_duplicity(vm, run)
    fill(overlay, 0xE9, 64 * MIB, MIB)  # a power-on and off during the backup wrote this
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait(10) == -signal.SIGKILL
    before = snapshot_files([base], tmp_path / "before")

    finished = environment.virt_dup("run", job)

    assert f"recovered: domain {vm.name}: disk vda back on {top}" in finished.stdout
    assert vm.disk_source("vda", inactive=True) == top
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
    assert read_pattern_ok(top, 0xE9, 64 * MIB, MIB, with_backing=False)
    restored = environment.restore_all(job, tmp_path / "restored")
    assert sha256(restored_path(restored, base)) == sha256(before[base])
    assert read_pattern_ok(restored_path(restored, top), 0xE9, 64 * MIB, MIB, with_backing=False)


def test_a_run_killed_after_recording_its_plan_leaves_nothing_to_undo(
    make_domain, environment: BackupEnvironment
) -> None:
    """SIGKILL between the run record and the snapshot (a window of milliseconds):
    the state it leaves is made here by hand -- the record, no overlay.
    Recovery clears the record and touches nothing; the next run backs up."""
    from virt_dup.backup.plan import DiskPlan
    from virt_dup.backup.state import RunRecord, StateStore
    from virt_dup.config.load import load_config
    from virt_dup.images.chain import read_chain

    vm = make_domain(chain=["base", "vm"])
    top = vm.images["vda"][-1]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    chain = read_chain(str(top))
    overlay = overlay_path(str(top), job)
    record = RunRecord(
        job_uuid=job,
        domain_uuid=vm.uuid,
        domain_name=vm.name,
        started="2026-12-02T02:00:00+00:00",
        pid=1,
        full=True,
        phase="planned",
        disks=(DiskPlan("vda", chain, chain, overlay),),
    )
    StateStore.of(load_config(environment.config)).save_run(record)
    before = file_digests(vm.directory)

    recovered = environment.virt_dup("recover")

    assert "nothing to recover" in recovered.stdout or vm.name in recovered.stdout
    assert not environment.run_record(vm.uuid).exists()
    assert file_digests(vm.directory) == before
    assert vm.disk_source("vda") == top
    environment.virt_dup("run", job)
    assert_back_on_its_top(vm)


# -- a backend password appears nowhere -------------------------------------------------------


def test_a_backend_password_is_in_no_output_file_or_record(
    make_domain, environment: BackupEnvironment
) -> None:
    """A job whose backend URL carries a password (sftp, here to a closed port):
    every line virt-dup prints, every file it writes, shows it masked."""
    secret = "hunter2-never-shown"
    vm = make_domain(chain=["base", "vm"])
    url = f"sftp://backup:{secret}@127.0.0.1:1/backups"
    outputs = [environment.virt_dup("add-job", vm.name, "--backend", url)]
    job = outputs[0].stdout.strip()
    outputs += [
        environment.virt_dup("list-jobs"),
        environment.virt_dup("list-jobs", "--json"),
        environment.virt_dup("run", job, "--dry-run", check=False),
        environment.virt_dup("run", job, check=False),
        environment.virt_dup("backups", vm.name, check=False),
    ]
    printed = "".join(finished.stdout + finished.stderr for finished in outputs)
    assert "sftp://backup:***@127.0.0.1:1/backups" in printed
    assert secret not in printed
    for directory in (environment.state, environment.cache):
        for path in directory.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
