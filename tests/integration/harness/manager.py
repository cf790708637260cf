"""A real systemd user manager (``systemd --user``) for tests, in a private mount namespace.

The test machines do not boot with systemd, but systemd 252 runs a user
manager when ``/run/systemd/system`` exists (see /work/shared/ENVIRONMENT.md).
:func:`start_user_manager` starts one so that the host stays untouched:

* ``unshare -m --propagation private``: mounts made for it are invisible
  outside.  A tmpfs on ``/run/systemd`` holds ``system/`` (the "booted with
  systemd" marker), ``user-generators/`` (where a test installs
  virt-dup-generator) and ``inaccessible/``: the nodes PID 1 makes at boot
  and over which sandboxing settings (``ProtectKernelTunables=``...) mount;
  without them such a service fails with status 226/NAMESPACE.
* ``/run`` a mount point of its own, as on every host booted with systemd.
  On this VM it is a plain directory of the root file system, and then
  ``ProtectKernelTunables=`` / ``ProtectControlGroups=`` (which imply
  ``MountAPIVFS=``) give a service an *empty* tmpfs on /run: no libvirt
  socket, no harness directory.  A bind mount of /run onto itself fixes that.
* Its own cgroup (``/<hierarchy>/vdt-systemd-<id>``): the manager puts its
  units below it, not next to the host's, and teardown can find every
  process it left.
* Its log: the manager (``--log-level=debug``) and the programs it runs
  write to /dev/console or /dev/kmsg when there is no journald; inside the
  namespace both are a FIFO that a reader appends to ``manager.log``.
* ``HOME``, ``XDG_*`` all under one directory in ``/run`` (override the
  parent with ``VIRT_DUP_TEST_SYSTEMD_DIR``), deliberately not under /tmp:
  a unit's sandbox may hide it, and a test must not depend on it. No
  config file goes there.

Every process is ended by its pid (manager first, with SIGTERM, then its
leftovers), the cgroups removed, the directory deleted.

The fixture ``user_manager`` (import it into a test module:
``from harness.manager import user_manager  # noqa: F401``) yields a
:class:`UserManager`; run commands "on that host" with
:meth:`UserManager.run` (inside the namespace, with its environment).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from harness.install import VIRT_DUP as INSTALLED_VIRT_DUP
from harness.install import Installation, mount_environment, mount_script

SYSTEMD = Path("/lib/systemd/systemd")
DEFAULT_PARENT = Path("/run")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
#: cgroup hierarchies a user manager uses (hybrid: both; unified: the first one only).
CGROUP_ROOTS = (
    Path("/sys/fs/cgroup/unified"),
    Path("/sys/fs/cgroup/systemd"),
    Path("/sys/fs/cgroup"),
)

T = TypeVar("T")

# Runs as the namespace's first process; "$@" are cgroup.procs files to join.
_NAMESPACE_SCRIPT = r"""
set -eu
for procs in "$@"; do echo $$ > "$procs"; done
if ! mountpoint -q /run; then mount --rbind /run /run; fi
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/systemd/system /run/systemd/user-generators /run/systemd/inaccessible
cd /run/systemd/inaccessible
mkdir -m 0 dir
install -m 0 /dev/null reg
mkfifo -m 0 fifo
mknod -m 0 chr c 0 0
mknod -m 0 blk b 0 0
"$VDT_PYTHON" -c 'import os, stat; os.mknod("sock", 0o000 | stat.S_IFSOCK)'
cd /
eval "$VDT_MOUNT_INSTALLATION"
mkfifo -m 0600 /run/systemd/console
chown "$VDT_UID:$VDT_GID" /run/systemd/console
# Opened read-write: the reader never sees EOF, writers never block.
exec 3<>/run/systemd/console
cat <&3 >>"$VDT_LOG" &
echo $! >"$VDT_READER_PID"
exec 3<&-
for device in /dev/console /dev/kmsg; do
    if [ -e "$device" ]; then mount --bind /run/systemd/console "$device"; fi
done
exec setpriv --reuid="$VDT_UID" --regid="$VDT_GID" --clear-groups \
    "$VDT_SYSTEMD" --user --log-level=debug --log-target=console
"""


class SystemdHarnessError(Exception):
    """The user manager could not be started, driven or stopped."""


@dataclass
class UserManager:
    """A running ``systemd --user`` in its own mount namespace.

    ``pid``: the manager (also the namespace's first process); ``root``:
    the directory holding ``home/`` (HOME, XDG_CONFIG_HOME=home/.config...),
    ``runtime/`` (XDG_RUNTIME_DIR) and ``manager.log``; ``env``: the
    environment of the manager and of :meth:`run`; ``uid``/``gid``: whose
    manager it is (root's unless the test asked for an unprivileged one).
    """

    pid: int
    root: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    cgroups: list[Path] = field(default_factory=list)
    reader_pid: int | None = None
    uid: int = 0
    gid: int = 0
    #: The virt-dup command "on this host": the installed one (/opt/virt-dup,
    #: mounted from a scratch tree) when the manager has an installation,
    #: else the virt-dup of the running virtualenv.
    virt_dup: Path = field(default_factory=lambda: Path(sys.executable).parent / "virt-dup")

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def runtime_dir(self) -> Path:
        return self.root / "runtime"

    @property
    def log_path(self) -> Path:
        return self.root / "manager.log"

    @property
    def config_home(self) -> Path:
        return Path(self.env["XDG_CONFIG_HOME"])

    def log(self, last: int = 60) -> str:
        """The last ``last`` lines the manager logged."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-last:])

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 120.0,
        as_root: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace, with this manager's environment (plus ``env``),
        as the manager's user (or as root with ``as_root``).

        Raises SystemdHarnessError with the command line, exit code and output
        when ``check`` and it fails.
        """
        args = [os.fspath(arg) for arg in argv]
        command = ["nsenter", f"--target={self.pid}", "--mount", "--"]
        if self.uid != 0 and not as_root:
            command += ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        command += args
        result = subprocess.run(
            command,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise SystemdHarnessError(
                f"{shlex.join(args)} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    @contextlib.contextmanager
    def journald(self) -> Iterator[None]:
        """A systemd-journald of this namespace's own while the block runs.

        Its journal is volatile, on a tmpfs over ``/run/log`` inside the
        namespace (the host's /run/log is untouched); its sockets are in the
        namespace's own /run/systemd.  Services log there and ``journalctl``
        reads it.  systemd does not see the harness cgroup as a user
        manager's, so entries carry ``_SYSTEMD_CGROUP=`` (ending in the
        unit's name) but no ``_SYSTEMD_USER_UNIT=``.  Stopped by its pid
        afterwards.
        """
        self.run(["mkdir", "-p", "/run/log"], as_root=True)
        self.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run/log"], as_root=True)
        daemon = subprocess.Popen(
            ["nsenter", f"--target={self.pid}", "--mount", "--", "/lib/systemd/systemd-journald"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.wait_for(
                "systemd-journald listening",
                lambda: (
                    self.run(["test", "-S", "/run/systemd/journal/socket"], check=False).returncode
                    == 0
                ),
                timeout=10,
            )
            yield
        finally:
            daemon.terminate()
            try:
                daemon.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=STOP_TIMEOUT)
            self.run(["umount", "/run/log"], as_root=True, check=False)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``systemctl --user ARGS`` against this manager."""
        return self.run(["systemctl", "--user", "--no-pager", *args], check=check)

    def wait_for(
        self, what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.25
    ) -> T:
        """Call ``probe`` until it returns something true; return that.

        Raises SystemdHarnessError naming ``what``, with the manager's log, on timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise SystemdHarnessError(
                    f"{what}: not after {timeout:.0f}s; manager log:\n{self.log()}"
                )
            time.sleep(interval)

    def stop(self) -> None:
        """End the manager (SIGTERM, then SIGKILL), every process left in its
        cgroups, the log reader; remove the cgroups and the directory."""
        problems = []
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"manager {self.pid} ignored SIGTERM for {STOP_TIMEOUT:.0f}s")
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)
        leftovers = _cgroup_pids(self.cgroups)
        if self.reader_pid is not None:
            leftovers.add(self.reader_pid)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _remove_cgroups(self.cgroups, problems)
        shutil.rmtree(self.root, ignore_errors=True)
        if problems:
            raise SystemdHarnessError("; ".join(problems))


def _cgroup_pids(cgroups: list[Path]) -> set[int]:
    pids: set[int] = set()
    for cgroup in cgroups:
        for procs in cgroup.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(line) for line in procs.read_text().split())
    return pids


def _remove_cgroups(cgroups: list[Path], problems: list[str]) -> None:
    for cgroup in cgroups:
        if not cgroup.exists():
            continue
        directories = sorted(
            (path for path in cgroup.rglob("*") if path.is_dir()),
            key=lambda path: len(path.parts),
            reverse=True,
        )
        for directory in [*directories, cgroup]:
            for _attempt in range(50):  # the kernel frees a cgroup shortly after its last process
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                problems.append(f"cannot remove cgroup {directory}")


def _make_cgroups(name: str, uid: int, gid: int) -> list[Path]:
    """One cgroup per hierarchy the manager uses, delegated to ``uid`` (as
    user@.service is), or none where that is not possible."""
    roots = []
    if (CGROUP_ROOTS[0] / "cgroup.procs").exists():  # hybrid: unified + name=systemd
        roots = [CGROUP_ROOTS[0], CGROUP_ROOTS[1]]
    elif (CGROUP_ROOTS[2] / "cgroup.controllers").exists():  # pure cgroup v2
        roots = [CGROUP_ROOTS[2]]
    made = []
    for root in roots:
        cgroup = root / name
        try:
            cgroup.mkdir()
        except OSError:
            continue  # not ours to create: the manager then shares the caller's cgroup
        made.append(cgroup)
        for path in (cgroup, *cgroup.iterdir()):
            os.chown(path, uid, gid)
    return made


def _manager_environment(root: Path) -> dict[str, str]:
    home = root / "home"
    bin_directory = str(Path(sys.executable).parent)
    return {
        "PATH": f"{bin_directory}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_RUNTIME_DIR": str(root / "runtime"),
    }


def start_user_manager(
    parent: Path = DEFAULT_PARENT,
    uid: int = 0,
    gid: int = 0,
    installation: Installation | None = None,
) -> UserManager:
    """Start ``systemd --user`` in a new private mount namespace; wait until it is up.

    ``uid``/``gid``: run an unprivileged user's manager instead of root's
    (its home, runtime dir and cgroups are given to it).  ``installation``: a
    tree made by ``scripts/install --root`` (:mod:`harness.install`), whose
    /opt/virt-dup is mounted on /opt/virt-dup in the namespace; the
    manager's :attr:`~UserManager.virt_dup` is then that one.

    Raises SystemdHarnessError (with the manager's log) when it does not come up;
    what was started is stopped again.
    """
    if os.geteuid() != 0:
        raise SystemdHarnessError("needs root (mount namespace, cgroups)")
    for program in ("unshare", "nsenter", "setpriv", "systemctl"):
        if shutil.which(program) is None:
            raise SystemdHarnessError(f"{program} not found")
    if not SYSTEMD.exists():
        raise SystemdHarnessError(f"{SYSTEMD} not found (package systemd)")
    name = f"vdt-systemd-{secrets.token_hex(4)}"
    root = parent / name
    root.mkdir(mode=0o700)
    env = _manager_environment(root)
    for directory in (env["XDG_CONFIG_HOME"], env["XDG_CACHE_HOME"], env["XDG_STATE_HOME"]):
        Path(directory).mkdir(parents=True)
    (root / "runtime").mkdir(mode=0o700)
    for path in (root, *root.rglob("*")):
        os.chown(path, uid, gid)
    cgroups = _make_cgroups(name, uid, gid)
    reader_pid_file = root / "log-reader.pid"
    process = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _NAMESPACE_SCRIPT,
            "vdt-user-manager",
            *(str(cgroup / "cgroup.procs") for cgroup in cgroups),
        ],
        env={
            **env,
            "VDT_PYTHON": sys.executable,
            "VDT_LOG": str(root / "manager.log"),
            "VDT_READER_PID": str(reader_pid_file),
            "VDT_SYSTEMD": str(SYSTEMD),
            "VDT_UID": str(uid),
            "VDT_GID": str(gid),
            "VDT_MOUNT_INSTALLATION": mount_script() if installation else "",
            **(mount_environment(installation.root) if installation else {}),
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(root / "namespace.log", "wb"),  # noqa: SIM115 - the child keeps it
        start_new_session=True,
    )
    manager = UserManager(
        pid=process.pid, root=root, env=env, process=process, cgroups=cgroups, uid=uid, gid=gid
    )
    if installation is not None:
        manager.virt_dup = INSTALLED_VIRT_DUP
    try:
        manager.reader_pid = manager.wait_for(
            "the log reader", lambda: _read_pid(reader_pid_file, process), START_TIMEOUT, 0.05
        )
        manager.wait_for(
            "systemd --user to finish starting",
            lambda: _started(manager),
            START_TIMEOUT,
            0.1,
        )
    except BaseException:
        namespace_log = (root / "namespace.log").read_text(errors="replace")
        with contextlib.suppress(SystemdHarnessError):
            manager.stop()
        if namespace_log.strip():
            raise SystemdHarnessError(f"namespace setup failed:\n{namespace_log}") from None
        raise
    return manager


def _read_pid(path: Path, process: subprocess.Popen[bytes]) -> int | None:
    if process.poll() is not None:
        raise SystemdHarnessError(f"the namespace ended early (exit code {process.returncode})")
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _started(manager: UserManager) -> bool:
    if manager.process.poll() is not None:
        raise SystemdHarnessError(
            f"systemd --user exited with {manager.process.returncode}:\n{manager.log()}"
        )
    if not (manager.runtime_dir / "systemd" / "private").exists():
        return False
    state = manager.systemctl("is-system-running", check=False).stdout.strip()
    return state in ("running", "degraded")


def install_system_sandbox(unit_dir: Path, owner: tuple[int, int] | None = None) -> list[Path]:
    """Add what ``install-units --scope system`` installs beyond ``--scope user``
    (the system manager's sandbox drop-ins) to a user manager's unit dir.

    Root's user manager stands in for PID 1 here: it can apply them, so the
    services run under the very sandbox of a host.  Returns the files written;
    reload the manager afterwards.
    """
    from virt_dup.systemd import units

    sources, _generator = units.read_sources(
        units.data_directory("units"), units.data_directory("generator")
    )
    written = []
    for drop_in in units.DROP_INS:
        if "user" in drop_in.scopes:
            continue
        for service in drop_in.services:
            path = unit_dir / f"{service}.d" / drop_in.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(units.installed_header(drop_in.source) + sources[drop_in.source])
            if owner is not None:
                os.chown(path, *owner)
            written.append(path)
    return written


@pytest.fixture
def user_manager(
    require: Callable[[bool, str], None], installation: Installation
) -> Iterator[UserManager]:
    """A fresh ``systemd --user`` in a private mount namespace, with the
    session's ``installation`` on /opt/virt-dup; stopped after the test.

    Skips (fails with ``CI=true``) when this machine cannot run one (not root,
    no systemd, no unshare).
    """
    require(os.geteuid() == 0, "a user manager in a mount namespace needs root")
    require(SYSTEMD.exists(), f"{SYSTEMD} not found (package systemd)")
    parent = Path(os.environ.get("VIRT_DUP_TEST_SYSTEMD_DIR", DEFAULT_PARENT))
    manager = start_user_manager(parent, installation=installation)
    try:
        yield manager
    finally:
        manager.stop()


#: The unprivileged user for :func:`unprivileged_user_manager` (Debian's nobody:nogroup).
UNPRIVILEGED_UID = 65534
UNPRIVILEGED_GID = 65534


@pytest.fixture
def unprivileged_user_manager(
    require: Callable[[bool, str], None], installation: Installation
) -> Iterator[UserManager]:
    """Like ``user_manager``, but the manager of an unprivileged user (nobody),
    as on a desktop: no capabilities, so sandboxing works only as far as an
    unprivileged user manager can set it up."""
    require(os.geteuid() == 0, "a user manager in a mount namespace needs root")
    require(SYSTEMD.exists(), f"{SYSTEMD} not found (package systemd)")
    parent = Path(os.environ.get("VIRT_DUP_TEST_SYSTEMD_DIR", DEFAULT_PARENT))
    manager = start_user_manager(
        parent, UNPRIVILEGED_UID, UNPRIVILEGED_GID, installation=installation
    )
    try:
        yield manager
    finally:
        manager.stop()
