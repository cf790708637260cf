"""``virt-dup migrate-backend``: a job's collection moved file:// -> sftp:// and
back (a real sshd on 127.0.0.1), with restores from the target; an interrupted
copy is finished by the next attempt; a copy that does not check out leaves the
job and its source as they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from harness.backups import BackupEnvironment, fill, guest_view, same_guest_view
from harness.sshd import SshServer
from test_destinations import manifests, set_files
from test_restore import backups_json, prepared

pytestmark = pytest.mark.integration


def job_backends(environment: BackupEnvironment, job: str) -> list[str]:
    jobs = json.loads(environment.virt_dup("list-jobs", "--json").stdout)["jobs"]
    (record,) = [record for record in jobs if record["job"] == job]
    return list(record["options"]["backends"])


def test_migrate_to_sftp_and_back_with_restores_from_the_target(
    make_domain, environment: BackupEnvironment, tmp_path: Path, ssh_server: SshServer
) -> None:
    offsite = tmp_path / "offsite"
    offsite_url = ssh_server.sftp_url(offsite)
    vm = prepared(make_domain, running=False)
    top = vm.images["vda"][-1]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    local_dir, offsite_dir = environment.backend / job, offsite / job
    environment.virt_dup("run", job)
    fill(top, 0x71, 0, 1 << 20)
    environment.virt_dup("run", job)
    view = guest_view(top, tmp_path / "view-2.qcow2")
    before = set_files(local_dir)
    contents = {name: (local_dir / name).read_bytes() for name in before}

    # A first attempt was cut short: one volume of the full is there, no manifest.
    offsite_dir.mkdir(parents=True)
    volume = next(name for name in sorted(before) if ".vol1." in name)
    (offsite_dir / volume).write_bytes((local_dir / volume).read_bytes()[:1000])

    moved = environment.virt_dup("migrate-backend", job, "--to", offsite_url)
    assert f"backs up to {offsite_url} now" in moved.stdout
    assert {name: (offsite_dir / name).read_bytes() for name in before} == contents
    assert set_files(offsite_dir) == before  # every set, the cut one replaced
    assert not local_dir.exists()  # deleted, after the check
    assert job_backends(environment, job) == [offsite_url]

    restored = tmp_path / "restored-from-sftp"
    environment.virt_dup("restore", vm.name, "--target-dir", str(restored))
    assert same_guest_view(restored / "vda" / top.name, view)

    # The next backup continues the chain on the new backend.
    fill(top, 0x72, 2 << 20, 1 << 20)
    environment.virt_dup("run", job)
    assert len(manifests(set_files(offsite_dir))) == 3
    latest = guest_view(top, tmp_path / "view-3.qcow2")

    # And back, by name, keeping the sftp copy.
    back = environment.virt_dup("migrate-backend", job, "--to", "local", "--keep-source", "--json")
    document = json.loads(back.stdout)
    assert document["schema"] == "virt-dup/migrate-backend/1"
    assert (document["backups"], document["source_deleted"]) == (3, False)
    assert set_files(local_dir) == set_files(offsite_dir)
    assert job_backends(environment, job) == ["local"]
    again = tmp_path / "restored-from-local"
    environment.virt_dup("restore", vm.name, "--target-dir", str(again))
    assert same_guest_view(again / "vda" / top.name, latest)
    leftovers = [p.name for p in environment.cache.iterdir() if p.name.startswith(job + ".")]
    assert leftovers == []  # the caches the migrations used are gone


def test_a_copy_that_does_not_verify_changes_nothing(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    vm = prepared(make_domain, running=False)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    environment.virt_dup("run", job)
    local_dir = environment.backend / job
    before = {name: (local_dir / name).read_bytes() for name in set_files(local_dir)}
    # The target already holds the set, whole as far as names go, with a volume damaged.
    other_dir = tmp_path / "other" / job
    shutil.copytree(local_dir, other_dir)
    volume = next(name for name in before if ".vol1." in name)
    damaged = bytearray(before[volume])
    damaged[len(damaged) // 2] ^= 0xFF
    (other_dir / volume).write_bytes(bytes(damaged))

    failed = environment.virt_dup(
        "migrate-backend", job, "--to", f"file://{tmp_path / 'other'}", check=False
    )
    assert failed.returncode == 1
    line = failed.stderr.splitlines()[-1]
    assert "stopped, the job still uses" in line and "nothing there was deleted" in line
    assert {name: (local_dir / name).read_bytes() for name in set_files(local_dir)} == before
    assert job_backends(environment, job) == ["local"]
    assert not (environment.state / "migrations" / f"{job}.json").exists()

    missing = environment.virt_dup("migrate-backend", job, "--to", "nowhere", check=False)
    assert missing.returncode != 0 and "no backend named 'nowhere'" in missing.stderr


def test_a_migration_cut_after_the_switch_is_finished_by_the_same_command(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    """Killed between switching the job and deleting the old collection: the record
    in the state directory says what is left, and the same command does it."""
    vm = prepared(make_domain, running=False)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    environment.virt_dup("run", job)
    local_dir = environment.backend / job
    other_url = f"file://{tmp_path / 'other'}"
    shutil.copytree(local_dir, tmp_path / "other" / job)
    environment.virt_dup("edit-job", job, "--backend", other_url)
    record = environment.state / "migrations" / f"{job}.json"
    record.parent.mkdir(parents=True)
    record.write_text(
        json.dumps(
            {"source": f"file://{environment.backend}", "target": other_url, "keep_source": False}
        )
    )

    finished = environment.virt_dup("migrate-backend", job, "--to", other_url)
    assert "deleted from file://" in finished.stdout
    assert not local_dir.exists() and not record.exists()
    (listing,) = backups_json(environment, vm.name)
    assert len(listing["backups"]) == 1

    again = environment.virt_dup("migrate-backend", job, "--to", other_url, check=False)
    assert again.returncode != 0 and f"already backs up to {other_url}" in again.stderr
