"""sftp:// end to end against a real sshd on 127.0.0.1, and backends that fail.

The sftp server is :class:`harness.sshd.SshServer`: key login for root, its
host key in ``known_hosts`` under a scratch ``HOME`` (where duplicity's
paramiko backend looks).  Every backup is made by ``virt-dup run`` as its own
process; what a disk looked like when a backup started is a flat copy made
just before the run, and a restore is right when ``qemu-img compare`` finds
the restored chain identical to it.  A failed run must leave the domain on
its own chain, no virt-dup overlay, no run record and no success recorded.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.backups import (
    QUICK_FAILURE,
    BackupEnvironment,
    error_lines,
    fill,
    guest_view,
    random_domain,
    same_guest_view,
    use_backend,
    wait_for,
)
from harness.domains import MIB, ScratchDomain

pytestmark = pytest.mark.integration

SIZE = 16 * MIB


def filled_domain(make_domain, running: bool, size: int = SIZE) -> ScratchDomain:
    """base.qcow2 <- vm.qcow2, each holding data of its own."""
    vm = make_domain(running=False, size=size)
    base, top = vm.images["vda"]
    fill(base, 0x21, 1 * MIB, 2 * MIB)
    fill(top, 0x22, 5 * MIB, 2 * MIB)
    if running:
        vm.domain.create()
    return vm


def backups_json(environment: BackupEnvironment, *arguments: str) -> list[dict]:
    document = json.loads(environment.virt_dup("backups", "--json", *arguments).stdout)
    return document["jobs"]


def assert_back_on_its_chain(vm: ScratchDomain) -> None:
    """The domain's disk is its own top again (live and persistent), no overlay left."""
    base, top = vm.images["vda"]
    if vm.is_running():
        assert vm.disk_chain("vda") == (base, top)
    assert vm.disk_source("vda", inactive=True) == top
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []


def assert_failed_and_nothing_recorded(
    environment: BackupEnvironment, vm: ScratchDomain, job: str, successes: int
) -> None:
    """The run is recorded as failed; no run in flight; the successes are as before."""
    assert not environment.run_record(vm.uuid).exists()
    status = environment.status(job)
    assert status["last_run"]["result"] == "failed"
    if successes == 0:
        assert "last_success" not in status
    jobs = json.loads(environment.virt_dup("status", "--json").stdout)["jobs"]
    (listed,) = [entry for entry in jobs if entry["job"] == job]
    assert listed["last_run"]["result"] == "failed"


def test_full_incremental_retention_list_restore_verify_over_sftp(
    make_domain, environment, tmp_path, ssh_server
) -> None:
    remote = tmp_path / "remote"
    use_backend(environment, ssh_server.sftp_url(remote))
    vm = filled_domain(make_domain, running=True)
    top = vm.images["vda"][-1]
    job = environment.virt_dup(
        "add-job", vm.name, "--full-retention", "2", "--incremental-retention", "2"
    ).stdout.strip()

    views: list[Path] = []
    timings = []
    # full A, full B, incremental C, full D: full_retention=2 prunes chain A
    for number, (pattern, full) in enumerate(
        [(0xA1, False), (0xA2, True), (0xA3, False), (0xA4, True)]
    ):
        vm.write_pattern("vda", pattern, (8 + number) * MIB, 256 * 1024)
        views.append(guest_view(top, tmp_path / "views" / f"{number}.qcow2"))
        started = time.monotonic()
        environment.virt_dup("run", *(["--full"] if full else []), job)
        timings.append(time.monotonic() - started)
    print("runs over sftp (s):", " ".join(f"{elapsed:.1f}" for elapsed in timings))
    assert_back_on_its_chain(vm)

    (listing,) = backups_json(environment, vm.name)
    assert [entry["type"] for entry in listing["backups"]] == ["full", "incremental", "full"]
    ids = [entry["id"] for entry in listing["backups"]]
    # what is left on the server: chains B (full + incremental) and D, nothing of A
    names = sorted(path.name for path in (remote / job).iterdir())
    fulls = {name.split(".")[1] for name in names if name.startswith("duplicity-full.")}
    incrementals = [name for name in names if name.startswith("duplicity-inc.")]
    assert len(fulls) == 2, names
    assert len({name.split(".")[1] for name in incrementals}) == 1, names
    assert not [name for name in names if not name.startswith("duplicity-")], names

    for backup_id, view in zip(ids, views[1:], strict=True):
        directory = tmp_path / "restored" / backup_id.replace(":", "")
        environment.virt_dup("restore", vm.name, backup_id, "--target-dir", str(directory))
        assert same_guest_view(directory / "vda" / "vm.qcow2", view), backup_id
    assert not same_guest_view(views[1], views[3])

    finished = environment.virt_dup("verify", job, "--scratch-dir", str(tmp_path / "scratch"))
    assert f"verified backup {ids[-1]} of job {job}" in finished.stdout
    assert vm.is_running() and vm.disk_source("vda") == top


@pytest.mark.parametrize("known_host", ["another key", "no entry"])
def test_the_host_key_is_checked(
    make_domain, environment, tmp_path, ssh_server, known_host
) -> None:
    remote = tmp_path / "remote"
    use_backend(environment, ssh_server.sftp_url(remote))
    vm = filled_domain(make_domain, running=True)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    if known_host == "another key":
        other = tmp_path / "other-host-key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True
        )
        kind, key = Path(f"{other}.pub").read_text().split()[:2]
        ssh_server.known_hosts.write_text(f"[127.0.0.1]:{ssh_server.port} {kind} {key}\n")
    else:
        ssh_server.known_hosts.write_text("")

    started = time.monotonic()
    finished = environment.virt_dup("run", job, check=False)
    elapsed = time.monotonic() - started
    print(f"host key ({known_host}): failed in {elapsed:.1f} s: {finished.stderr}")
    assert finished.returncode != 0
    (line,) = error_lines(finished.stderr)
    assert f"ssh connection to root@127.0.0.1:{ssh_server.port} failed" in line, line
    said = "is not in" if known_host == "no entry" else "does not match"
    assert f"the server's host key {said}" in line and str(ssh_server.known_hosts) in line
    assert "AAAA" not in line  # the fact, not two base64 keys
    assert_back_on_its_chain(vm)
    assert_failed_and_nothing_recorded(environment, vm, job, successes=0)
    assert not list(remote.rglob("duplicity-*"))


#: A dead backend fails fast in tests: 2 tries 1 s apart, 5 s per network wait.


def test_sshd_stopped_mid_backup_fails_cleanly_and_the_next_run_succeeds(
    make_domain, environment, tmp_path, ssh_server
) -> None:
    remote = tmp_path / "remote"
    url = ssh_server.sftp_url(remote)
    use_backend(environment, url)
    vm = random_domain(make_domain, tmp_path, 64 * MIB)
    top = vm.images["vda"][-1]
    job = environment.virt_dup("add-job", vm.name, *QUICK_FAILURE).stdout.strip()

    run = environment.start_run(job)
    try:
        wait_for(
            lambda: (
                bool(list(remote.glob("*/duplicity-full.*.vol1.difftar.gpg")))
                or run.poll() is not None
            ),
            60,
            "the first volume on the server",
        )
        assert run.poll() is None, run.communicate()
        ssh_server.stop()
        stopped = time.monotonic()
        _output, errors = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    elapsed = time.monotonic() - stopped
    print(f"sshd stopped mid-upload: the run failed {elapsed:.1f} s later:\n{errors}")
    assert run.returncode != 0
    (line,) = error_lines(errors)
    assert f"duplicity could not reach {url}/{job}" in line, line
    assert elapsed < 30
    assert_back_on_its_chain(vm)
    assert_failed_and_nothing_recorded(environment, vm, job, successes=0)

    ssh_server.start()
    view = guest_view(top, tmp_path / "view.qcow2")
    environment.virt_dup("run", job)
    assert environment.status(job)["last_success"]["result"] == "success"
    (listing,) = backups_json(environment, vm.name)
    (backup,) = listing["backups"]
    assert backup["type"] == "full"
    environment.virt_dup("restore", vm.name, "--target-dir", str(tmp_path / "restored"))
    assert same_guest_view(tmp_path / "restored" / "vda" / "vm.qcow2", view)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never says a word
    (a hung sshd, a firewall that swallows the session); yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for connection in held:
            connection.close()
        listener.close()


def test_a_server_that_never_answers_fails_the_run_in_bounded_time(
    make_domain, environment, tmp_path, silent_server, monkeypatch
) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    url = f"sftp://root@127.0.0.1:{silent_server}//srv/virt-dup"
    use_backend(environment, url)
    vm = filled_domain(make_domain, running=True)
    job = environment.virt_dup("add-job", vm.name, *QUICK_FAILURE).stdout.strip()

    started = time.monotonic()
    finished = environment.virt_dup("run", job, check=False)
    elapsed = time.monotonic() - started
    print(f"silent server: failed in {elapsed:.1f} s:\n{finished.stderr}")
    assert finished.returncode != 0
    (line,) = error_lines(finished.stderr)
    assert f"duplicity could not reach {url}/{job}" in line, line
    assert "sent no SSH banner" in line
    assert elapsed < 45
    assert_back_on_its_chain(vm)
    assert_failed_and_nothing_recorded(environment, vm, job, successes=0)
