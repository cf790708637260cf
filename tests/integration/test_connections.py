"""virt-dup over every libvirt connection it supports, against the real libvirtd,
sshd, QEMU, duplicity and gpg of this machine.

* ``qemu+ssh://`` (openssh, through a ``command=`` wrapper that checks the host
  key against the test's own known_hosts) and ``qemu+libssh://`` (libvirt's
  ``known_hosts=`` parameter) to a real sshd on 127.0.0.1: add-job, run,
  restore; a host key that does not match is refused.  Nothing is written
  into /root/.ssh.
* A libvirtd that does not answer (a closed port, a socket that does not
  exist, a peer that accepts and never speaks): one line naming the URI,
  within the connect bound.  A URI naming another host is refused before
  anything connects; so is a disk whose source file is not on this host.
* ``qemu+tcp://`` (``auth_tcp = "none"``) and ``qemu+tls://`` (certificates
  made by certtool) to a libvirtd that listens on 127.0.0.1
  (:mod:`harness.libvirtd`): ``disruptive``, it swaps the host's libvirtd
  once for the whole class, and back.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.backups import BackupEnvironment, guest_view, same_guest_view
from harness.domains import MIB, ScratchDomain
from harness.libvirtd import ListeningLibvirtd, free_port, listening_libvirtd
from harness.side_by_side import alone
from harness.sshd import SshServer

from virt_dup.libvirt.connection import CONNECT_RETRY_S, CONNECT_TIMEOUT_S

pytestmark = pytest.mark.integration

#: What a CLI run costs besides connecting (Python start-up, config, imports).
STARTUP_S = 5.0


def use_uri(environment: BackupEnvironment, uri: str) -> None:
    """virt-dup.yml's libvirt.uri becomes ``uri`` (the environment writes
    ``libvirt:`` first, its ``uri:`` the only one)."""
    text = environment.config.read_text()
    changed, count = re.subn(r"^  uri: .*$", f"  uri: '{uri}'", text, count=1, flags=re.M)
    assert count == 1, text
    environment.config.write_text(changed)


def error_line(finished: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed virt-dup (and nothing else on stderr but
    notices and warnings)."""
    assert finished.returncode != 0, finished.stdout
    lines = finished.stderr.splitlines()
    errors = [line for line in lines if line.startswith("virt-dup: error: ")]
    assert len(errors) == 1, finished.stderr
    assert all(line.startswith("virt-dup: ") for line in lines), finished.stderr
    return errors[0]


def timed(
    environment: BackupEnvironment, *arguments: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    finished = environment.virt_dup(*arguments, check=False)
    return finished, time.monotonic() - started


def back_up_and_restore(
    environment: BackupEnvironment, vm: ScratchDomain, tmp_path: Path, uri: str
) -> None:
    """add-job, run and restore --target-dir through ``uri``; the restored chain
    is what the guest saw, and the domain runs on its own files again."""
    base, top = vm.images["vda"]
    vm.write_pattern("vda", 0xC7, 3 * MIB, 2 * MIB)
    view = guest_view(top, tmp_path / "view.qcow2")
    use_uri(environment, uri)

    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    listed = environment.virt_dup("list-jobs").stdout
    assert job in listed and vm.name in listed
    started = time.monotonic()
    environment.virt_dup("run", job)
    print(f"run over {uri.split('?')[0]}: {time.monotonic() - started:.2f} s")
    assert vm.disk_source("vda") == top and vm.disk_source("vda", inactive=True) == top
    assert vm.is_running()

    target = tmp_path / "restored"
    environment.virt_dup("restore", vm.name, "--target-dir", str(target))
    restored = target / "vda" / top.name
    assert (target / "vda" / base.name).exists()
    assert same_guest_view(restored, view)
    assert vm.disk_source("vda") == top and vm.disk_source("vda", inactive=True) == top


# -- ssh -----------------------------------------------------------------------------


def ssh_command(directory: Path, known_hosts: Path) -> Path:
    """An ssh for libvirt's ``command=`` parameter: openssh reads ~/.ssh of root's
    passwd entry (not $HOME), so this one reads no configuration file and
    checks the host key against ``known_hosts`` only, strictly."""
    wrapper = directory / "ssh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec ssh -F none -o UserKnownHostsFile={known_hosts} -o GlobalKnownHostsFile=/dev/null "
        '-o StrictHostKeyChecking=yes "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def ssh_uri(server: SshServer, known_hosts: Path, directory: Path) -> str:
    command = ssh_command(directory, known_hosts)
    return (
        f"qemu+ssh://root@127.0.0.1:{server.port}/system"
        f"?keyfile={server.client_key}&command={command}&no_tty=1"
    )


def wrong_known_hosts(server: SshServer, directory: Path) -> Path:
    """A known_hosts that records another key for the server."""
    other = (server.directory / "client.pub").read_text().split()[:2]
    path = directory / "wrong_known_hosts"
    path.write_text(f"[127.0.0.1]:{server.port} {' '.join(other)}\n")
    return path


def test_a_backup_over_qemu_ssh_is_restored(
    make_domain, environment: BackupEnvironment, ssh_server: SshServer, tmp_path: Path
) -> None:
    root_ssh = Path("/root/.ssh")
    before = sorted(root_ssh.iterdir()) if root_ssh.exists() else None
    vm = make_domain()
    uri = ssh_uri(ssh_server, ssh_server.known_hosts, tmp_path)
    back_up_and_restore(environment, vm, tmp_path, uri)
    assert (sorted(root_ssh.iterdir()) if root_ssh.exists() else None) == before


def test_qemu_ssh_and_libssh_refuse_a_host_key_that_does_not_match(
    make_domain, environment: BackupEnvironment, ssh_server: SshServer, tmp_path: Path
) -> None:
    vm = make_domain(running=False)
    wrong = wrong_known_hosts(ssh_server, tmp_path)
    libssh = (
        f"qemu+libssh://root@127.0.0.1:{ssh_server.port}/system"
        f"?keyfile={ssh_server.client_key}&sshauth=privkey&known_hosts="
    )
    # libssh checks the host key itself, from known_hosts=
    use_uri(environment, libssh + str(ssh_server.known_hosts))
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    assert job in environment.virt_dup("list-jobs").stdout
    for uri in (ssh_uri(ssh_server, wrong, tmp_path), libssh + str(wrong)):
        use_uri(environment, uri)
        finished, elapsed = timed(environment, "run", job)
        line = error_line(finished)
        assert line.startswith(f"virt-dup: error: cannot connect to libvirt at {uri}: ")
        if uri.startswith("qemu+libssh:"):
            assert "SSH HOST KEY VERIFICATION FAILED" in line, line
        # openssh's reason is its banner on stderr, which libvirt reads into a
        # buffer of 1 KiB: with this test's long paths it overflows, and libvirt
        # says "Value too large for defined data type" instead.
        assert elapsed < STARTUP_S, elapsed
        print(f"wrong host key over {uri.split(':')[0]}: {elapsed:.2f} s: {line}")
    assert vm.disk_source("vda", inactive=True) == vm.images["vda"][-1]


# -- libvirtd not answering ----------------------------------------------------------
def test_libvirtd_not_answering_fails_in_one_line_within_the_bound(
    environment: BackupEnvironment,
) -> None:
    closed = free_port()
    for uri in (
        f"qemu+tcp://127.0.0.1:{closed}/system",
        "qemu+unix:///system?socket=/nonexistent",
    ):
        use_uri(environment, uri)
        for arguments in (
            ("add-job", "vdt-anything"),
            ("run", "0b9f6c1e-6f43-4c1e-9d1a-2b8f3c4d5e6f"),
        ):
            finished, elapsed = timed(environment, *arguments)
            line = error_line(finished)
            assert line.startswith(f"virt-dup: error: cannot connect to libvirt at {uri}: "), line
            assert f"(tried for {CONNECT_RETRY_S:.0f} s)" in line
            assert CONNECT_RETRY_S <= elapsed < CONNECT_RETRY_S + STARTUP_S, elapsed
            print(f"{arguments[0]} at {uri}: {elapsed:.2f} s: {line}")


def test_a_peer_that_never_answers_is_given_up_at_the_bound(environment: BackupEnvironment) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"qemu+tcp://127.0.0.1:{silent.getsockname()[1]}/system"
        use_uri(environment, uri)
        finished, elapsed = timed(environment, "list-jobs")
    line = error_line(finished)
    assert line == (
        f"virt-dup: error: cannot connect to libvirt at {uri}: no answer within "
        f"{CONNECT_TIMEOUT_S:g} s"
    )
    assert CONNECT_TIMEOUT_S <= elapsed < CONNECT_TIMEOUT_S + STARTUP_S, elapsed
    print(f"silent peer {uri}: {elapsed:.2f} s")


def test_a_uri_naming_another_host_is_refused_before_connecting(
    environment: BackupEnvironment,
) -> None:
    """Refused first: no ssh to a host whose disks virt-dup could not read anyway
    (a connect would have said 'Could not resolve hostname' after a while)."""
    uri = "qemu+ssh://root@backup.example.invalid/system"
    use_uri(environment, uri)
    for arguments in (("add-job", "vm01"), ("run", "0b9f6c1e-6f43-4c1e-9d1a-2b8f3c4d5e6f")):
        finished, elapsed = timed(environment, *arguments)
        assert finished.returncode == 2
        assert error_line(finished) == (
            f"virt-dup: error: libvirt URI {uri} names host backup.example.invalid, which is not "
            "this host: virt-dup reads disk images where it runs, so run it on that host (with "
            "qemu:///system)"
        )
        assert elapsed < STARTUP_S


def test_a_disk_whose_source_file_is_not_here_is_refused(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    """add-job and run refuse before writing anything: no job, no overlay."""
    vm = make_domain(running=False)
    top = vm.images["vda"][-1]
    aside = tmp_path / "aside.qcow2"
    expected = (
        f"virt-dup: error: disk vda of domain {vm.name}: its source file {top} does not "
        "exist on this host (virt-dup reads disk images where it runs)"
    )
    top.rename(aside)
    try:
        assert error_line(environment.virt_dup("add-job", vm.name, check=False)) == expected
        assert "virt-dup:job" not in vm.domain.XMLDesc(0)
    finally:
        aside.rename(top)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    files_before = sorted(top.parent.iterdir())
    top.rename(aside)
    try:
        line = error_line(environment.virt_dup("run", job, check=False))
        assert line == expected.replace("error: ", f"error: job {job} of domain {vm.name}: ")
        assert sorted(top.parent.iterdir()) == [p for p in files_before if p != top]
    finally:
        aside.rename(top)
    assert vm.disk_source("vda", inactive=True) == top
    assert not environment.backend.exists() or not any(environment.backend.rglob("*.gpg"))


# -- tcp and tls: libvirtd listening on 127.0.0.1 ---------------------------------------
@pytest.fixture(scope="module")
def listening(tmp_path_factory, require) -> Iterator[ListeningLibvirtd]:
    """One swap of the host's libvirtd for a listening one, for the whole class
    (no test runs beside it meanwhile: tests/conftest.py)."""
    with alone(), listening_libvirtd(tmp_path_factory.mktemp("libvirtd"), require) as daemon:
        yield daemon


@pytest.mark.disruptive
class TestTcpAndTls:
    def test_a_backup_over_qemu_tcp_is_restored(
        self, listening: ListeningLibvirtd, make_domain, environment, tmp_path
    ) -> None:
        vm = make_domain()
        back_up_and_restore(environment, vm, tmp_path, listening.tcp_uri())

    def test_a_backup_over_qemu_tls_is_restored(
        self, listening: ListeningLibvirtd, make_domain, environment, tmp_path
    ) -> None:
        vm = make_domain()
        back_up_and_restore(environment, vm, tmp_path, listening.tls_uri())

    def test_a_server_certificate_of_another_ca_is_refused(
        self, listening: ListeningLibvirtd, environment
    ) -> None:
        uri = listening.tls_uri(listening.pki.wrong_ca_client)
        use_uri(environment, uri)
        finished, elapsed = timed(environment, "list-jobs")
        line = error_line(finished)
        assert line.startswith(f"virt-dup: error: cannot connect to libvirt at {uri}: "), line
        # the client's own certificate is fine; the server's is not of the CA it trusts
        assert line.endswith("authentication failed: Failed to verify peer's certificate"), line
        assert elapsed < STARTUP_S
        print(f"wrong CA: {elapsed:.2f} s: {line}")
