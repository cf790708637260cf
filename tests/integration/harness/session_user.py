"""A throw-away non-root user with a libvirt session daemon of their own.

:func:`temporary_user` (the ``session_user`` fixture wraps it) makes a
system user ``vdt-<random>`` in group ``kvm`` (``/dev/kvm`` is ``root:kvm
0660`` after scripts/setup) whose home lies in a fresh directory under
/tmp, and ``/run/user/<uid>`` (0700, theirs) as their ``XDG_RUNTIME_DIR``.
:meth:`SessionUser.run` runs a command as that user with a clean
environment (``HOME``, ``USER``, ``LOGNAME``, ``PATH``, ``XDG_RUNTIME_DIR``
and nothing of root's), through ``runuser``.

The user cannot run the checkout's virt-dup: its ``.venv`` interpreter
links into ``/root/.pyenv``, behind ``/root`` (0700).  So commands run in
a private mount namespace where ``/opt/virt-dup`` is the ``installation``
tree (``scripts/install --root``, Debian's ``/usr/bin/python3``): the user
runs ``/opt/virt-dup/bin/virt-dup`` exactly as on a host with virt-dup
installed.  A bind mount needs no read access to the directories above the
tree, so the tree stays root's 0700 scratch directory.

Measured here (libvirt 9.0): the first ``qemu:///session`` connect spawns
``libvirtd --timeout=120`` as the user (~8 s: it probes QEMU's capabilities
into an empty ``~/.cache/libvirt``), which spawns ``virtlogd
--timeout=120`` when a domain starts; both write pid files in
``$XDG_RUNTIME_DIR/libvirt/`` (``libvirtd.pid``, ``virtlogd.pid``).  A
daemon spawned by a command keeps that command's mount namespace; nothing it
does needs ``/opt/virt-dup``.

Teardown, also after a failed test: the user's domains destroyed and
undefined (when their daemon runs), their gpg-agent stopped, the daemons
stopped by the pids in their pid files, any other process still running as
the user killed by pid (and reported), then ``userdel -r``, the runtime dir
and the temporary directory removed.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.install import VIRT_DUP, Installation, mount_environment, mount_script

SESSION_URI = "qemu:///session"
KVM_GROUP = "kvm"
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
#: The session daemons libvirt spawns, by their pid files in ``$XDG_RUNTIME_DIR/libvirt``.
DAEMON_PID_FILES = ("libvirtd.pid", "virtlogd.pid")
STOP_TIMEOUT = 10.0
COMMAND_TIMEOUT = 120.0


class SessionUserError(Exception):
    """The temporary user could not be made, driven or removed."""


def kvm_usable_by_group() -> bool:
    """True when ``/dev/kvm`` is read-writable by group ``kvm`` (or by everyone):
    then a member of ``kvm`` can run ``<domain type='kvm'>``."""
    try:
        device = os.stat("/dev/kvm")
        kvm_gid = grp.getgrnam(KVM_GROUP).gr_gid
    except (FileNotFoundError, KeyError):
        return False
    group_rw = stat.S_IRGRP | stat.S_IWGRP
    others_rw = stat.S_IROTH | stat.S_IWOTH
    by_group = device.st_gid == kvm_gid and device.st_mode & group_rw == group_rw
    return by_group or device.st_mode & others_rw == others_rw


@dataclass
class SessionUser:
    """A temporary user; ``home`` is theirs, ``base`` (root's, 0755) holds it."""

    name: str
    uid: int
    gid: int
    base: Path
    home: Path
    runtime_dir: Path
    installation: Installation

    @property
    def environment(self) -> dict[str, str]:
        """The whole environment of the user's commands (nothing of root's)."""
        return {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": USER_PATH,
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "LANG": "C.UTF-8",
        }

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        check: bool = True,
        input: str | None = None,
        environment: dict[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the user (``/opt/virt-dup`` is the installation's).

        ``environment`` is added to :attr:`environment`.  Raises
        :class:`SessionUserError` with the output when ``check`` and it fails.
        """
        words = [os.fspath(word) for word in argv]
        assignments = [
            f"{key}={value}" for key, value in {**self.environment, **(environment or {})}.items()
        ]
        script = mount_script() + 'exec "$@"\n'
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            "runuser",
            "-u",
            self.name,
            "--",
            "env",
            "-i",
            *assignments,
            *words,
        ]
        result = subprocess.run(
            command,
            env={"PATH": USER_PATH, **mount_environment(self.installation.root)},
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )
        if check and result.returncode != 0:
            raise SessionUserError(
                f"as {self.name}: {' '.join(words)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def virt_dup(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The installed ``/opt/virt-dup/bin/virt-dup ARGUMENTS``, as the user."""
        return self.run([str(VIRT_DUP), *arguments], check=check)

    def virsh(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["virsh", "-c", SESSION_URI, *arguments], check=check)

    def write_file(self, path: Path, text: str) -> Path:
        """Write ``text`` to ``path`` (parents made) as the user, mode 0600."""
        self.run(
            ["sh", "-c", 'umask 077 && mkdir -p "${1%/*}" && cat >"$1"', "sh", str(path)],
            input=text,
        )
        return path

    def daemon_pids(self) -> dict[str, int]:
        """The pid of each session daemon whose pid file names a live process."""
        pids = {}
        for name in DAEMON_PID_FILES:
            try:
                pid = int((self.runtime_dir / "libvirt" / name).read_text().strip())
            except (OSError, ValueError):
                continue
            if _alive(pid) and _owner(pid) == self.uid:
                pids[name] = pid
        return pids

    def processes(self) -> list[int]:
        """Every live (not zombie) process running as the user."""
        return [
            int(entry.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit()
            and _owner(int(entry.name)) == self.uid
            and _alive(int(entry.name))
        ]


def _owner(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _alive(pid: int) -> bool:
    """True for a process that exists and is not a zombie (this machine's PID 1
    reaps orphans slowly: a stopped daemon lingers as a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _stop(pids: Sequence[int], timeout: float = STOP_TIMEOUT) -> list[int]:
    """SIGTERM ``pids``, then SIGKILL what is still alive after ``timeout``;
    returns the pids that needed SIGKILL."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    killed = [pid for pid in pids if _alive(pid)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return killed


def _remove_domains(user: SessionUser) -> list[str]:
    """Destroy and undefine every domain of the user's session daemon, if it runs
    (connecting to a stopped one would spawn it: ~8 s, and it has no running domain)."""
    if "libvirtd.pid" not in user.daemon_pids():
        return []
    problems = []
    listed = user.virsh("list", "--all", "--name", check=False)
    for name in filter(None, (line.strip() for line in listed.stdout.splitlines())):
        user.virsh("destroy", name, check=False)
        undefined = user.virsh(
            "undefine",
            name,
            "--managed-save",
            "--snapshots-metadata",
            "--checkpoints-metadata",
            "--nvram",
            check=False,
        )
        if undefined.returncode != 0:
            problems.append(f"domain {name}: {undefined.stderr.strip()}")
    return problems


@contextlib.contextmanager
def temporary_user(installation: Installation) -> Iterator[SessionUser]:
    """A fresh user ``vdt-<random>`` (see the module docstring); removed on exit,
    with everything it made and ran.  Raises :class:`SessionUserError` when the
    clean-up leaves something behind (after trying all of it)."""
    name = f"vdt-{secrets.token_hex(4)}"
    base = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    base.chmod(0o755)  # the user must traverse it to reach their home
    home = base / "home"
    user: SessionUser | None = None
    created_user = False
    try:
        subprocess.run(
            [
                "useradd",
                "--create-home",
                "--home-dir",
                str(home),
                "--user-group",
                "--groups",
                KVM_GROUP,
                "--shell",
                "/usr/sbin/nologin",
                "--no-log-init",
                "--comment",
                "virt-dup test user",
                name,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        created_user = True
        account = pwd.getpwnam(name)
        uid, gid = account.pw_uid, account.pw_gid
        runtime_dir = Path("/run/user") / str(uid)
        runtime_dir.parent.mkdir(mode=0o755, exist_ok=True)
        shutil.rmtree(runtime_dir, ignore_errors=True)  # a stale one of an earlier uid holder
        runtime_dir.mkdir(mode=0o700)
        os.chown(runtime_dir, uid, gid)
        user = SessionUser(name, uid, gid, base, home, runtime_dir, installation)
        yield user
    finally:
        problems = []
        if user is not None:
            problems += _remove_domains(user)
            user.run(["gpgconf", "--kill", "all"], check=False)
            daemons = user.daemon_pids()
            killed = _stop(list(daemons.values()))
            problems += [f"session daemon pid {pid} needed SIGKILL" for pid in killed]
            leftovers = user.processes()
            if leftovers:
                _stop(leftovers, timeout=2.0)
                problems.append(f"processes left running as {name}, killed: {leftovers}")
            shutil.rmtree(user.runtime_dir, ignore_errors=True)
        if created_user:
            deleted = subprocess.run(["userdel", "--remove", name], capture_output=True, text=True)
            # 12: the home could not be removed (the rmtree below removes it);
            # a missing mail spool is only a message (exit 0).
            if deleted.returncode not in (0, 12):
                problems.append(
                    f"userdel --remove {name}: {deleted.returncode} {deleted.stderr.strip()}"
                )
        shutil.rmtree(base, ignore_errors=True)
        if problems:
            raise SessionUserError("; ".join(problems))
