"""A real sshd on 127.0.0.1 for sftp:// backends and qemu+ssh:// connections.

:class:`SshServer` runs ``sshd -D`` from a scratch directory on a free port
with key login for root only; the client key and a ``known_hosts`` holding the
server's host key are in ``home/.ssh`` (paramiko, duplicity's sftp backend,
looks there through ``HOME``).  :meth:`SshServer.stop` and :meth:`SshServer.start`
take it down and bring it back on the same port (a backend that goes away
mid-run).  The process is ours, stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

START_WAIT_S = 10.0


class SshServer:
    """sshd in ``directory``; ``home`` is a HOME for its clients."""

    def __init__(self, directory: Path, home: Path) -> None:
        self.directory = directory
        self.home = home
        self.program = shutil.which("sshd") or "/usr/sbin/sshd"
        directory.mkdir(parents=True, exist_ok=True)
        (home / ".ssh").mkdir(parents=True, exist_ok=True)
        for key in ("host", "client"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)],
                check=True,
            )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        (directory / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host'}\n"
            f"AuthorizedKeysFile {directory / 'client.pub'}\nPasswordAuthentication no\n"
            "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
            "Subsystem sftp internal-sftp\n"
        )
        shutil.copy(directory / "client", self.client_key)
        host_key = (directory / "host.pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(host_key)}\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def client_key(self) -> Path:
        return self.home / ".ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.home / ".ssh" / "known_hosts"

    def sftp_url(self, path: Path | str, user: str = "root") -> str:
        """An sftp:// URL of ``path`` (absolute) on this server.

        duplicity reads ``sftp://host/p`` as ``p`` relative to the login's home
        directory and ``sftp://host//p`` as the absolute ``/p``.
        """
        return f"sftp://{user}@127.0.0.1:{self.port}//{str(path).lstrip('/')}"

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        self.process = subprocess.Popen(
            [self.program, "-D", "-e", "-f", str(self.directory / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_WAIT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"sshd did not start on 127.0.0.1:{self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop sshd and the sessions it forked (they are in its process group only
        when it is the leader, so the children are found by their parent pid)."""
        if self.process is None:
            return
        children = _children(self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        self.process = None


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (sshd's per-connection processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found
