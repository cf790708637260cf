"""A job with two destinations: a local file:// one and an off-site sftp:// one
(a real sshd on 127.0.0.1).  One run reads the disks once and both hold the
same backup; each keeps its own retention; the off-site one going down fails
the run for it alone, and the next run catches it up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness.backups import (
    QUICK_FAILURE,
    BackupEnvironment,
    fill,
    guest_view,
    random_domain,
    same_guest_view,
    wait_for,
)
from harness.domains import MIB
from harness.sshd import SshServer
from test_restore import backups_json, prepared

pytestmark = pytest.mark.integration


def set_files(directory: Path) -> set[str]:
    """The duplicity files of a collection directory (no lock files)."""
    if not directory.is_dir():
        return set()
    return {path.name for path in directory.iterdir() if path.name.startswith("duplicity-")}


def fulls(names: set[str]) -> list[str]:
    return sorted(name for name in names if name.endswith(".manifest.gpg") and "-full." in name)


def manifests(names: set[str]) -> list[str]:
    return sorted(name for name in names if name.endswith(".manifest.gpg"))


def with_offsite(environment: BackupEnvironment, url: str, settings: str = "") -> str:
    """Give the environment's jobs a second destination ``offsite`` at ``url``."""
    local = f"  local: file://{environment.backend}\n"
    config = (
        environment.config.read_text()
        .replace(local, f"{local}  offsite:\n    url: {url}\n{settings}")
        .replace("  backends: [local]\n", "  backends: [local, offsite]\n")
    )
    environment.config.write_text(config)
    return url


def test_two_destinations_one_read_own_retention_and_catching_up(
    make_domain, environment: BackupEnvironment, tmp_path: Path, ssh_server: SshServer
) -> None:
    offsite = tmp_path / "offsite"
    offsite_url = with_offsite(environment, ssh_server.sftp_url(offsite), "    full_retention: 1\n")
    vm = prepared(make_domain, running=False)
    top = vm.images["vda"][-1]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    local_dir, offsite_dir = environment.backend / job, offsite / job

    environment.virt_dup("run", job)
    fill(top, 0x61, 0, 1 << 20)
    environment.virt_dup("run", job)
    # The same files on both: copies of what the one backup wrote, byte for byte.
    assert (
        set_files(local_dir) == set_files(offsite_dir) and len(manifests(set_files(local_dir))) == 2
    )
    for name in set_files(local_dir):
        assert (local_dir / name).read_bytes() == (offsite_dir / name).read_bytes(), name

    # The off-site destination goes down: the run fails for it alone.
    ssh_server.stop()
    fill(top, 0x62, 2 << 20, 1 << 20)
    view = guest_view(top, tmp_path / "view-3.qcow2")
    failed = environment.virt_dup("run", job, check=False)
    assert failed.returncode != 0
    line = failed.stderr.splitlines()[-1]
    assert line.startswith("virt-dup: error: ") and "python" not in failed.stderr, failed.stderr
    assert "backed up vda to file://" in line and f"but not to {offsite_url}" in line
    assert len(manifests(set_files(local_dir))) == 3  # the local backup is whole
    assert len(manifests(set_files(offsite_dir))) == 2
    assert vm.disk_source("vda") == top  # back on its own chain
    assert vm.disk_source("vda", inactive=True) == top
    status = json.loads(environment.virt_dup("status", job, "--json").stdout)
    (row,) = status["jobs"]
    destinations = row["destinations"]
    assert destinations[f"file://{environment.backend}"]["last_result"] == "success"
    assert destinations[offsite_url]["last_result"] == "failed"
    assert row["last_run"]["result"] == "failed"

    ssh_server.start()
    environment.virt_dup("run", job)
    assert set_files(local_dir) == set_files(offsite_dir)  # caught up: 4 sets on both
    assert len(manifests(set_files(offsite_dir))) == 4
    (listing,) = backups_json(environment, "--backend", offsite_url)
    third = listing["backups"][2]["id"]
    restored = tmp_path / "from-offsite"
    environment.virt_dup(
        "restore", vm.name, third, "--backend", offsite_url, "--target-dir", str(restored)
    )
    assert same_guest_view(restored / "vda" / top.name, view)

    # A new chain: the local destination keeps two (the default), the off-site one.
    environment.virt_dup("run", job, "--full")
    assert len(fulls(set_files(local_dir))) == 2
    assert len(fulls(set_files(offsite_dir))) == 1
    assert len(manifests(set_files(offsite_dir))) == 1
    latest = guest_view(top, tmp_path / "view-latest.qcow2")
    newest_restore = tmp_path / "latest-from-offsite"
    environment.virt_dup(
        "restore", vm.name, "--backend", offsite_url, "--target-dir", str(newest_restore)
    )
    assert same_guest_view(newest_restore / "vda" / top.name, latest)


def test_a_destination_that_goes_down_mid_copy_is_caught_up_by_the_next_run(
    make_domain, environment: BackupEnvironment, tmp_path: Path, ssh_server: SshServer
) -> None:
    offsite = tmp_path / "offsite"
    offsite_url = with_offsite(environment, ssh_server.sftp_url(offsite))
    vm = random_domain(make_domain, tmp_path, 64 * MIB)
    top = vm.images["vda"][-1]
    job = environment.virt_dup("add-job", vm.name, *QUICK_FAILURE).stdout.strip()
    local_dir, offsite_dir = environment.backend / job, offsite / job

    run = environment.start_run(job)
    try:
        wait_for(
            lambda: (
                bool(list(offsite_dir.glob("duplicity-full.*.vol1.*"))) or run.poll() is not None
            ),
            120,
            "the copy to the off-site destination",
        )
        assert run.poll() is None, run.communicate()
        ssh_server.stop()
        _output, errors = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode != 0
    line = errors.splitlines()[-1]
    assert "backed up vda to file://" in line and f"but not to {offsite_url}" in line, errors
    assert len(manifests(set_files(local_dir))) == 1  # the local backup is whole
    assert manifests(set_files(offsite_dir)) == []  # the cut copy is no backup there
    assert vm.disk_source("vda") == top

    ssh_server.start()
    view = guest_view(top, tmp_path / "view.qcow2")
    environment.virt_dup("run", job)
    assert set_files(offsite_dir) == set_files(local_dir)
    assert len(manifests(set_files(offsite_dir))) == 2
    for name in set_files(local_dir):
        assert (local_dir / name).read_bytes() == (offsite_dir / name).read_bytes(), name
    restored = tmp_path / "restored"
    environment.virt_dup("restore", vm.name, "--backend", "offsite", "--target-dir", str(restored))
    assert same_guest_view(restored / "vda" / top.name, view)


def test_when_the_first_destination_is_down_the_next_one_gets_the_backup(
    make_domain, environment: BackupEnvironment, tmp_path: Path, ssh_server: SshServer
) -> None:
    """The off-site destination is listed first: down for a night, the backup goes to
    the local one, and once it is back it gets that backup before the next one
    continues the chain on it."""
    offsite = tmp_path / "offsite"
    offsite_url = with_offsite(environment, ssh_server.sftp_url(offsite))
    config = environment.config.read_text().replace(
        "  backends: [local, offsite]\n", "  backends: [offsite, local]\n"
    )
    environment.config.write_text(config)
    vm = prepared(make_domain, running=False)
    top = vm.images["vda"][-1]
    job = environment.virt_dup("add-job", vm.name, *QUICK_FAILURE).stdout.strip()
    local_dir, offsite_dir = environment.backend / job, offsite / job
    environment.virt_dup("run", job)

    ssh_server.stop()
    fill(top, 0x63, 0, 1 << 20)
    view = guest_view(top, tmp_path / "view-2.qcow2")
    failed = environment.virt_dup("run", job, check=False)
    assert failed.returncode != 0
    line = failed.stderr.splitlines()[-1]
    assert "backed up vda to file://" in line and f"but not to {offsite_url}" in line, line
    assert len(manifests(set_files(local_dir))) == 2
    assert len(manifests(set_files(offsite_dir))) == 1

    ssh_server.start()
    fill(top, 0x64, 2 << 20, 1 << 20)
    environment.virt_dup("run", job)
    assert set_files(offsite_dir) == set_files(local_dir)
    assert len(manifests(set_files(offsite_dir))) == 3  # one chain: full, inc, inc
    assert len([name for name in manifests(set_files(offsite_dir)) if "-full." in name]) == 1
    (listing,) = backups_json(environment, "--backend", "offsite")
    second = listing["backups"][1]["id"]
    restored = tmp_path / "restored"
    environment.virt_dup(
        "restore", vm.name, second, "--backend", "offsite", "--target-dir", str(restored)
    )
    assert same_guest_view(restored / "vda" / top.name, view)
