"""The ways a backup could lose a write, strand a domain on its overlay or claim a
backup it cannot restore -- each one provoked on real libvirtd + QEMU.

Every test names the defect it covers (issue "Trust", numbered as there) and
checks what a user relies on: the domain is back on its own chain, the
backup restores byte for byte, and a failure is one clear line, never a
success.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
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
from harness.domains import MIB, ScratchDomain, read_pattern_ok

from virt_dup.backup.overlay import OverlayKept, create_overlays, merge_overlay, overlay_path
from virt_dup.libvirt.connection import Hypervisor

pytestmark = pytest.mark.integration

_INACTIVE = 2  # libvirt.VIR_DOMAIN_XML_INACTIVE
JOB = "0b9f6c1e-6f43-4c1e-9d1a-2b8f3c4d5e6f"
MERGE_TIMEOUT_S = 60.0


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


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("virt-dup: error: ")]


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


@pytest.fixture
def small_state_directory(environment: BackupEnvironment) -> Iterator[Path]:
    """virt-dup's state directory on a 2 MiB tmpfs, to fill up mid-run."""
    environment.state.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(environment.state)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield environment.state
    finally:
        subprocess.run(["umount", "--lazy", str(environment.state)], check=False)


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
