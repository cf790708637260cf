"""libvirtd listening on 127.0.0.1 for ``qemu+tcp://`` and ``qemu+tls://`` tests.

:func:`listening_libvirtd` stops the libvirtd that scripts/setup started
(``libvirtd -d``, by its pid file, as :func:`harness.domains.restart_libvirtd`
does), starts ``libvirtd -d --listen -f <conf>`` with a copy of
/etc/libvirt/libvirtd.conf plus TCP (``auth_tcp = "none"``, the original
virt-dup's mode) and TLS listeners on 127.0.0.1, on free ports, with
certificates made for the test by certtool, and afterwards — also when the
test failed or the listening daemon never came up — stops it and starts the
original ``libvirtd -d`` again.  Every libvirt connection dies twice on the
way (the domains keep running): tests that use it are ``disruptive``.

:func:`make_pki` makes a CA, a server certificate for 127.0.0.1/localhost and
a client certificate, laid out as libvirt's ``pkipath=DIR`` URI parameter
wants them (``cacert.pem``, ``clientcert.pem``, ``clientkey.pem``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PID_FILE = Path("/run/libvirtd.pid")
SYSTEM_CONFIG = Path("/etc/libvirt/libvirtd.conf")
START_WAIT_S = 60.0
STOP_WAIT_S = 60.0


@dataclass(frozen=True)
class Pki:
    """Certificates of one test: ``server`` (for libvirtd's config), ``client``
    (a ``pkipath`` directory) and ``wrong_ca_client`` (a client of another CA:
    its own certificate is valid, the server's is not signed by the CA it trusts)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client: Path
    wrong_ca_client: Path


def _certtool(*arguments: str | Path) -> None:
    subprocess.run(
        ["certtool", *map(str, arguments)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )


def _private_key(path: Path) -> Path:
    # RSA: libvirt wants digital signature and key encipherment in the key
    # usage of both certificates, and certtool sets the latter for RSA keys only.
    _certtool("--generate-privkey", "--key-type", "rsa", "--bits", "2048", "--outfile", path)
    return path


def _authority(directory: Path, name: str) -> tuple[Path, Path]:
    key = _private_key(directory / f"{name}-key.pem")
    template = directory / f"{name}.info"
    template.write_text(f"cn = {name}\nca\ncert_signing_key\nexpiration_days = 2\n")
    cert = directory / f"{name}-cert.pem"
    _certtool(
        "--generate-self-signed", "--load-privkey", key, "--template", template, "--outfile", cert
    )
    return key, cert


def _signed(directory: Path, name: str, template_text: str, ca: tuple[Path, Path]) -> Path:
    key = _private_key(directory / f"{name}-key.pem")
    template = directory / f"{name}.info"
    template.write_text(template_text + "encryption_key\nsigning_key\nexpiration_days = 2\n")
    cert = directory / f"{name}-cert.pem"
    _certtool(
        "--generate-certificate",
        "--load-privkey",
        key,
        "--load-ca-privkey",
        ca[0],
        "--load-ca-certificate",
        ca[1],
        "--template",
        template,
        "--outfile",
        cert,
    )
    return cert


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate (127.0.0.1, localhost), a client certificate,
    and a second CA with a client certificate of its own, all valid for two
    days, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _authority(directory, "virt-dup-test-ca")
    server_cert = _signed(
        directory,
        "server",
        "organization = virt-dup test\ncn = localhost\ndns_name = localhost\n"
        "ip_address = 127.0.0.1\ntls_www_server\n",
        ca,
    )
    client_cert = _signed(
        directory, "client", "organization = virt-dup test\ncn = virt-dup\ntls_www_client\n", ca
    )
    other_ca = _authority(directory, "another-ca")
    other_client_cert = _signed(
        directory,
        "other-client",
        "organization = elsewhere\ncn = virt-dup\ntls_www_client\n",
        other_ca,
    )
    pki_directories = []
    for name, trusted, cert, key in (
        ("client", ca[1], client_cert, directory / "client-key.pem"),
        ("wrong-ca-client", other_ca[1], other_client_cert, directory / "other-client-key.pem"),
    ):
        pki = directory / name
        pki.mkdir()
        (pki / "cacert.pem").write_bytes(trusted.read_bytes())
        (pki / "clientcert.pem").write_bytes(cert.read_bytes())
        (pki / "clientkey.pem").write_bytes(key.read_bytes())
        pki_directories.append(pki)
    return Pki(ca[1], server_cert, directory / "server-key.pem", *pki_directories)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class ListeningLibvirtd:
    """The listening daemon: its ports, certificates and config file."""

    tcp_port: int
    tls_port: int
    pki: Pki
    config: Path
    pid: int

    def tcp_uri(self) -> str:
        return f"qemu+tcp://127.0.0.1:{self.tcp_port}/system"

    def tls_uri(self, pki_directory: Path | None = None) -> str:
        pki = pki_directory or self.pki.client
        return f"qemu+tls://127.0.0.1:{self.tls_port}/system?pkipath={pki}"


def _answers(uri: str = "qemu:///system") -> bool:
    return (
        subprocess.run(
            ["virsh", "-c", uri, "version"],
            capture_output=True,
            check=False,
            stdin=subprocess.DEVNULL,
            timeout=30,
        ).returncode
        == 0
    )


def _running_pid() -> int | None:
    try:
        pid = int(PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"libvirtd (pid {pid}) did not stop within {STOP_WAIT_S:g} s")
        time.sleep(0.1)


def _start(arguments: list[str], ready: Callable[[], bool]) -> int:
    subprocess.run(["libvirtd", "-d", *arguments], check=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_WAIT_S
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"libvirtd {' '.join(arguments)} did not answer in time")
        time.sleep(0.2)
    pid = _running_pid()
    assert pid is not None, f"libvirtd wrote no pid to {PID_FILE}"
    return pid


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def listening_libvirtd(
    directory: Path, require: Callable[[bool, str], None]
) -> Iterator[ListeningLibvirtd]:
    """The host's libvirtd swapped for one that also listens on 127.0.0.1 (TCP
    with ``auth_tcp = "none"`` and TLS), and swapped back afterwards, always."""
    original = _running_pid()
    require(original is not None, f"libvirtd was not started by scripts/setup (no {PID_FILE})")
    assert original is not None
    directory.mkdir(parents=True, exist_ok=True)
    pki = make_pki(directory / "pki")
    tcp_port, tls_port = free_port(), free_port()
    config = directory / "libvirtd.conf"
    config.write_text(
        SYSTEM_CONFIG.read_text()
        + "\n# virt-dup tests: listeners on 127.0.0.1 only\n"
        + 'listen_tcp = 1\nlisten_tls = 1\nlisten_addr = "127.0.0.1"\nauth_tcp = "none"\n'
        + f'auth_tls = "none"\ntcp_port = "{tcp_port}"\ntls_port = "{tls_port}"\n'
        + f'ca_file = "{pki.ca_cert}"\ncert_file = "{pki.server_cert}"\n'
        + f'key_file = "{pki.server_key}"\n'
        + f'log_outputs = "3:file:{directory / "libvirtd.log"}"\n'
    )
    ours: int | None = None
    try:
        _stop(original)
        ours = _start(
            ["--listen", "-f", str(config)],
            lambda: _answers() and _listening(tcp_port) and _listening(tls_port),
        )
        yield ListeningLibvirtd(tcp_port, tls_port, pki, config, ours)
    finally:
        if ours is None:
            ours = _running_pid()  # ours started and never answered, or none did
        if ours is not None and ours != original:
            _stop(ours)
        if _running_pid() is None:
            _start([], _answers)
