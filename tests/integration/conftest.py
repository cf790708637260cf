"""Fixtures for integration tests against the real libvirtd (``qemu:///system``).

``libvirt_conn``  an open ``libvirt.virConnect`` (the session's, reopened after a
                  libvirtd restart).  Skips when the
                  daemon is unreachable, fails instead when ``CI=true``.
``make_domain``   (function) a :class:`harness.domains.DomainFactory`: call it
                  to get a running (or shut-off) throw-away domain with qcow2
                  chains; everything it made is removed after the test, even a
                  failed one.
``harness_session`` (session) this session's id and image root.
``installation``  (session) a :class:`harness.install.Installation`: this
                  checkout installed by ``scripts/install --root`` into a
                  scratch tree, once per session, removed at its end; the
                  ``user_manager`` fixtures mount it on /opt/virt-dup.
``session_user``  a :class:`harness.session_user.SessionUser`: a temporary
                  non-root user (group kvm) whose commands run the
                  installation's virt-dup; removed after the test with their
                  session libvirtd, domains and files.
``ssh_server``    a started :class:`harness.sshd.SshServer` (sftp:// backends,
                  qemu+ssh://); ``HOME`` holds its client key and known_hosts.
``sftp_server``   its URL prefix ``sftp://root@127.0.0.1:PORT/``.

Example::

    from harness.domains import MIB, DiskSpec

    pytestmark = pytest.mark.integration

    def test_something(make_domain):
        vm = make_domain(chain=["base", "vm"])            # vda: base.qcow2 <- vm.qcow2
        assert vm.disk_source("vda") == vm.images["vda"][-1]
        vm.write_pattern("vda", 0xCD, 1 * MIB, 1 * MIB)
        assert vm.read_pattern_ok(vm.images["vda"][-1], 0xCD, 1 * MIB, 1 * MIB)

At the end of the session every domain whose name carries this session's id
(``<prefix>-<session id>-<n>``) is removed, with the session's image root
``/var/lib/libvirt/images/vdt-<session id>``; other domains are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
from harness.backups import BackupEnvironment
from harness.domains import (
    DEFAULT_IMAGES_PARENT,
    LIBVIRT_URI,
    DomainFactory,
    HarnessSession,
    new_session_id,
    sweep_session,
)
from harness.install import Installation, install_tree
from harness.session_user import SessionUser, temporary_user
from harness.side_by_side import alone, beside_others
from harness.sshd import SshServer


@pytest.fixture(autouse=True)
def _alone_when_disruptive(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test runs beside others unless it is ``disruptive``: that one waits for
    the running ones to end and keeps new ones out until it is done (its
    function-scoped fixtures' teardown included: this one is set up first)."""
    disruptive = request.node.get_closest_marker("disruptive") is not None
    with alone() if disruptive else beside_others():
        yield


@pytest.fixture(scope="session")
def harness_session() -> HarnessSession:
    """This test session's id and image root (created on first use)."""
    parent = Path(os.environ.get("VIRT_DUP_TEST_IMAGES", DEFAULT_IMAGES_PARENT))
    return HarnessSession.new(parent)


@pytest.fixture(scope="session")
def installation() -> Iterator[Installation]:
    """This checkout installed into a scratch tree (``scripts/install --root``)."""
    root = Path(tempfile.mkdtemp(prefix="vdt-install-"))
    try:
        yield install_tree(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirt_session(
    harness_session: HarnessSession, require: Callable[[bool, str], None]
) -> Iterator[list[libvirt.virConnect]]:
    """The session's connection to ``qemu:///system``, in a one-item list that
    :func:`libvirt_conn` replaces when a disruptive test restarted libvirtd.

    Skips (fails with ``CI=true``) when the daemon does not answer.  At the
    end of the session it removes every domain left over from this session,
    then closes.
    """
    # libvirt-python prints every error to stderr before raising it; the
    # exception carries the message already.
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    try:
        holder = [libvirt.open(LIBVIRT_URI)]
    except libvirt.libvirtError as error:
        require(False, f"libvirtd not reachable at {LIBVIRT_URI} ({error}); run scripts/setup")
        raise
    try:
        yield holder
    finally:
        holder[0].close()
        # Sweep through a fresh connection: a disruptive test may have
        # restarted libvirtd, which breaks every open one.
        sweeper = libvirt.open(LIBVIRT_URI)
        try:
            sweep_session(sweeper, harness_session.id, harness_session.images_root)
        finally:
            sweeper.close()


@pytest.fixture
def libvirt_conn(libvirt_session: list[libvirt.virConnect]) -> libvirt.virConnect:
    """An open connection to ``qemu:///system`` (the session's; opened anew after a
    disruptive test restarted libvirtd, which breaks every open one)."""
    try:
        libvirt_session[0].getLibVersion()
    except libvirt.libvirtError:
        with contextlib.suppress(libvirt.libvirtError):
            libvirt_session[0].close()
        libvirt_session[0] = libvirt.open(LIBVIRT_URI)
    return libvirt_session[0]


def _directory_label(node_name: str) -> str:
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", node_name).strip("-.")
    return label[:60] or "test"


@pytest.fixture
def make_domain(
    request: pytest.FixtureRequest,
    libvirt_conn: libvirt.virConnect,
    harness_session: HarnessSession,
) -> Iterator[DomainFactory]:
    """A factory of throw-away domains; see :meth:`DomainFactory.__call__`.

    ``make_domain(name_prefix="vdt", disks=("vda",), running=True,
    chain=("base", "vm"), size=64 * MIB, guest_agent_channel=False)`` returns
    a :class:`harness.domains.ScratchDomain`.  ``make_domain.create_image(name)``
    makes an image to share as a base (``DiskSpec(backing=...)``).  Images go
    to ``<images root>/<test name>-<n>/<domain>/<target>/``.  After the test
    (passed or failed) every domain made is destroyed and undefined and the
    test's directory deleted.
    """
    directory = harness_session.images_root / (
        f"{_directory_label(request.node.name)}-{new_session_id()[:4]}"
    )
    with DomainFactory(
        libvirt_conn, harness_session.id, directory, label=request.node.nodeid
    ) as factory:
        yield factory


@pytest.fixture
def environment(tmp_path: Path, gpg_home) -> BackupEnvironment:
    """A virt-dup.yml with a file:// backend, a throw-away GPG key, private state and cache."""
    return BackupEnvironment.create(tmp_path, gpg_home.path, gpg_home.fingerprint)


@pytest.fixture
def session_user(
    installation: Installation, require: Callable[[bool, str], None]
) -> Iterator[SessionUser]:
    """A temporary non-root user with a ``qemu:///session`` of their own; see
    :mod:`harness.session_user`.  Removed after the test, passed or failed."""
    require(os.geteuid() == 0, "making a temporary user needs root")
    require(shutil.which("useradd") is not None, "useradd not installed (package passwd)")
    with temporary_user(installation) as user:
        yield user


@pytest.fixture
def ssh_server(tmp_path: Path, require, monkeypatch) -> Iterator[SshServer]:
    """A real sshd on 127.0.0.1 (free port, root's key login), stopped after the
    test; ``HOME`` is its clients' (the key and a known_hosts with its host key,
    where duplicity's paramiko looks)."""
    require(
        shutil.which("sshd") is not None or os.access("/usr/sbin/sshd", os.X_OK),
        "sshd not installed (openssh-server)",
    )
    server = SshServer(tmp_path / "sshd", tmp_path / "home")
    server.start()
    monkeypatch.setenv("HOME", str(server.home))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sftp_server(ssh_server: SshServer) -> str:
    """The URL prefix ``sftp://root@127.0.0.1:PORT/`` of :func:`ssh_server`
    (an absolute path follows: ``PREFIX/srv/b``)."""
    return f"sftp://root@127.0.0.1:{ssh_server.port}/"
