"""The one way virt-dup talks to libvirt.

:class:`Hypervisor` wraps a ``virConnect``: finding domains by name or UUID,
reading and writing the virt-dup metadata element, describing disks.  It is
injectable (tests and callers that already hold a connection hand it in).
libvirt's own error printing is silenced; failures become
:class:`~virt_dup.errors.LibvirtError` or :class:`~virt_dup.errors.NotFoundError`
with one line that says what failed on what.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt

from virt_dup import NAMESPACE, NAMESPACE_PREFIX
from virt_dup.config.load import Config
from virt_dup.errors import ConfigError, LibvirtError, NotFoundError, shown
from virt_dup.libvirt.domain_xml import Disk, parse_disks
from virt_dup.libvirt.locality import masked, parse_uri, transport_warning
from virt_dup.libvirt.metadata import (
    Job,
    duplicate_job_message,
    parse_instance_text,
    parse_xml,
    render_instance,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


#: Keepalive: a probe every 5 s, the connection closed after 6 unanswered (30 s).
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 6
#: How long a lost connection is tried again (libvirtd restarting after an upgrade).
RECONNECT_WAIT_S = 60.0
#: No connect waits longer than this in all (an ssh or TLS handshake that stalls,
#: a peer that accepts and never answers).
CONNECT_TIMEOUT_S = 15.0
#: A connect refused as a restarting libvirtd refuses it (nothing listens, the
#: socket is not there yet) is tried again while less than this has passed.
CONNECT_RETRY_S = 5.0
CONNECT_RETRY_PAUSE_S = 0.5

_event_loop_started = threading.Event()


def _start_event_loop() -> None:
    """libvirt's own event loop in a daemon thread, once per process: keepalive
    needs one (without it a dead libvirtd is only noticed by the next call,
    and a hung one never)."""
    if _event_loop_started.is_set():
        return
    _event_loop_started.set()
    libvirt.virEventRegisterDefaultImpl()
    # A timer keeps the loop from blocking before the first connection exists.
    libvirt.virEventAddTimeout(60_000, lambda _timer, _opaque: None, None)

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)


def _message(error: libvirt.libvirtError) -> str:
    """libvirt's message as one line (QEMU's log tail comes as several)."""
    text = error.get_error_message() or str(error)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


class Hypervisor:
    """A libvirt connection with the operations virt-dup needs."""

    def __init__(
        self,
        connection: libvirt.virConnect,
        reopen: Callable[[], libvirt.virConnect] | None = None,
    ) -> None:
        self.connection = connection
        self._reopen = reopen

    @classmethod
    def open(
        cls,
        config: Config,
        timeout_s: float = CONNECT_TIMEOUT_S,
        retry_s: float = CONNECT_RETRY_S,
    ) -> Hypervisor:
        """Connect as virt-dup.yml says (URI, optional username and password file),
        within ``timeout_s`` seconds, trying again for ``retry_s`` seconds while
        libvirtd refuses as a restarting one does; with keepalive: a libvirtd
        that stops answering later is noticed in seconds.  Warns (one line)
        when the URI is qemu+tcp:// to a host that is not loopback.

        Raises :class:`LibvirtError` ``cannot connect to libvirt at URI: reason``.
        """
        _start_event_loop()
        warning = transport_warning(config.libvirt_uri)
        if warning is not None:
            log.warning("%s", warning)

        def connect() -> libvirt.virConnect:
            connection = _connect(config, timeout_s, retry_s)
            with contextlib.suppress(libvirt.libvirtError):
                connection.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
            return connection

        return cls(connect(), connect)

    def alive(self) -> bool:
        """Whether libvirtd still answers on this connection."""
        try:
            self.connection.getLibVersion()
        except libvirt.libvirtError:
            return False
        return True

    def reconnect(self, wait_s: float = RECONNECT_WAIT_S) -> None:
        """Open the connection again (libvirtd was restarted: a package upgrade, an
        admin), trying for up to ``wait_s`` seconds.  Domain objects of the old
        connection are dead: look them up again.  Raises :class:`LibvirtError`."""
        if self._reopen is None:
            raise LibvirtError("the libvirt connection is lost and this one cannot be reopened")
        self.close()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.connection = self._reopen()
                log.warning("reconnected to libvirt at %s", self.uri)
                return
            except LibvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.connection.close()

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def library_version(self) -> tuple[int, int]:
        """(major, minor) of the libvirt library the daemon runs."""
        version = int(self.call("cannot ask libvirt its version", self.connection.getLibVersion))
        return version // 1000000, version // 1000 % 1000

    def security_models(self) -> list[str]:
        """libvirt's security drivers for QEMU (``apparmor``, ``selinux``, ``dac``,
        ``none``), from its capabilities."""
        text = self.call("cannot read libvirt's capabilities", self.connection.getCapabilities)
        root = parse_xml(str(text), "libvirt's capabilities")
        return [model.text for model in root.iterfind("host/secmodel/model") if model.text]

    def agent_problem(self, domain: libvirt.virDomain, timeout: int = 5) -> str | None:
        """None when the domain's QEMU guest agent answers a ping within
        ``timeout`` seconds, else libvirt's reason (not configured, not connected...)."""
        import libvirt_qemu

        try:
            libvirt_qemu.qemuAgentCommand(domain, '{"execute": "guest-ping"}', timeout, 0)
        except libvirt.libvirtError as error:
            return _message(error)
        return None

    # -- domains ----------------------------------------------------------
    @property
    def uri(self) -> str:
        return str(self.connection.getURI())

    def call(self, what: str, function: Callable[..., T], *arguments: Any) -> T:
        """Run a libvirt call; failures become one line naming ``what`` (a
        :class:`LibvirtError` that keeps libvirt's error code)."""
        try:
            return function(*arguments)
        except libvirt.libvirtError as error:
            reason = _message(error)
            raise LibvirtError(f"{what}: {reason}", error.get_error_code(), reason) from None

    def domain(self, name_or_uuid: str) -> libvirt.virDomain:
        """A domain by name or UUID; :class:`NotFoundError` when there is none."""
        lookups = [self.connection.lookupByName]
        if _looks_like_uuid(name_or_uuid):
            lookups.insert(0, self.connection.lookupByUUIDString)
        for lookup in lookups:
            try:
                return lookup(name_or_uuid)
            except libvirt.libvirtError as error:
                if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise LibvirtError(
                        f"cannot look up domain {name_or_uuid}: {_message(error)}"
                    ) from None
        raise NotFoundError(f"no domain named {name_or_uuid!r} on {self.uri}")

    def current(self, domain: libvirt.virDomain, uuid: str) -> libvirt.virDomain:
        """``domain`` (whose UUID is ``uuid``) on the connection open now: one of a
        connection :meth:`reconnect` replaced is looked up again."""
        if domain.connect() is self.connection:
            return domain
        return self.domain(uuid)

    def find_domain(self, name_or_uuid: str) -> libvirt.virDomain | None:
        """A domain by name or UUID, or None when there is none."""
        try:
            return self.domain(name_or_uuid)
        except NotFoundError:
            return None

    def define(self, xml: str, what: str) -> libvirt.virDomain:
        """Define (or redefine) a persistent domain from ``xml``; ``what`` names it in errors."""
        return self.call(f"cannot define {what}", self.connection.defineXML, xml)

    def domains(self) -> list[libvirt.virDomain]:
        """Every domain (running or not), sorted by name."""
        found = self.call("cannot list domains", self.connection.listAllDomains, 0)
        return sorted(found, key=lambda domain: domain.name())

    def domain_names(self) -> list[str]:
        return [domain.name() for domain in self.domains()]

    def domain_xml(self, domain: libvirt.virDomain, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(
            self.call(f"cannot read the XML of domain {domain.name()}", domain.XMLDesc, flags)
        )

    def disks(self, domain: libvirt.virDomain, inactive: bool = False) -> list[Disk]:
        return parse_disks(self.domain_xml(domain, inactive), f"domain {domain.name()}")

    def image_directories(self) -> list[str]:
        """Where this host keeps disk images: libvirt's default directory (of the
        system or the session daemon), every directory storage pool's target,
        and the directory of every file disk of every domain defined here."""
        session = self.uri.rstrip("/").endswith("/session")
        default = (
            os.path.expanduser("~/.local/share/libvirt/images")
            if session
            else "/var/lib/libvirt/images"
        )
        directories = [default]
        pools = self.call("cannot list storage pools", self.connection.listAllStoragePools, 0)
        for pool in pools:
            xml = self.call("cannot read a storage pool", pool.XMLDesc, 0)
            root = parse_xml(xml, "a storage pool")
            path = root.findtext("target/path")
            if root.get("type") in ("dir", "fs", "netfs") and path:
                directories.append(os.path.normpath(path))
        for domain in self.domains():
            for disk in self.disks(domain, inactive=True):
                if disk.source_type == "file" and disk.source:
                    directories.append(os.path.dirname(os.path.normpath(disk.source)))
        return list(dict.fromkeys(directories))

    # -- jobs -------------------------------------------------------------
    def metadata_text(self, domain: libvirt.virDomain) -> str | None:
        """The virt-dup element of the domain's current XML, or None."""
        try:
            return str(domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0))
        except libvirt.libvirtError as error:
            # NO_DOMAIN: undefined while we were looking (listing all domains
            # races with other admins' virsh undefine): it holds no jobs now.
            if error.get_error_code() in (
                libvirt.VIR_ERR_NO_DOMAIN_METADATA,
                libvirt.VIR_ERR_NO_DOMAIN,
            ):
                return None
            raise LibvirtError(
                f"cannot read virt-dup metadata of domain {domain.name()}: {_message(error)}"
            ) from None

    def jobs(self, domain: libvirt.virDomain) -> list[Job]:
        """Jobs of one domain (ConfigError when its metadata is malformed)."""
        return parse_instance_text(self.metadata_text(domain), domain.name(), domain.UUIDString())

    def all_jobs(self) -> Iterator[tuple[libvirt.virDomain, list[Job] | ConfigError]]:
        """(domain, its jobs or the error that stops reading them) for every domain.

        A domain undefined (or a transient one stopped) between the listing
        and the reading of its metadata is left out: it has no jobs any more.
        """
        for domain in self.domains():
            try:
                jobs = self.jobs(domain)
            except ConfigError as error:
                yield domain, error
                continue
            except LibvirtError:
                if self.find_domain(domain.UUIDString()) is None:
                    continue
                raise
            yield domain, jobs

    def find_job(self, job_uuid: str) -> tuple[libvirt.virDomain, Job]:
        """The job with this uuid, in whichever domain holds it.

        Raises :class:`NotFoundError` when no domain has it, and
        :class:`ConfigError` when several do (``virt-clone`` copies
        ``<metadata>``): which one to back up is not virt-dup's guess.
        """
        wanted = job_uuid.strip().lower()
        found = [
            (domain, job)
            for domain, jobs in self.all_jobs()
            if not isinstance(jobs, ConfigError)
            for job in jobs
            if job.uuid == wanted
        ]
        if not found:
            raise NotFoundError(f"no job {shown(job_uuid)} in any domain on {self.uri}")
        if len(found) > 1:
            raise ConfigError(duplicate_job_message(wanted, [job.domain_name for _d, job in found]))
        return found[0]

    def write_jobs(self, domain: libvirt.virDomain, jobs: list[Job]) -> None:
        """Replace the domain's virt-dup element (live and persistent) with ``jobs``.

        No jobs removes the element.  Only virt-dup's namespace is touched.
        Raises :class:`LibvirtError` for a transient domain.
        """
        what = f"cannot write virt-dup metadata of domain {domain.name()}"
        if not self.call(what, domain.isPersistent):
            raise LibvirtError(
                f"domain {domain.name()} is transient: jobs must live in a persistent "
                "definition (virsh define)"
            )
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if self.call(what, domain.isActive):
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        text = render_instance(jobs) if jobs else None
        self.call(
            what,
            domain.setMetadata,
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            text,
            NAMESPACE_PREFIX if text else None,
            NAMESPACE,
            flags,
        )


def _connect(
    config: Config,
    timeout_s: float = CONNECT_TIMEOUT_S,
    retry_s: float = CONNECT_RETRY_S,
) -> libvirt.virConnect:
    """A new connection as virt-dup.yml says, within ``timeout_s`` seconds in all;
    refusals that a restarting libvirtd gives are tried again while less than
    ``retry_s`` seconds have passed.

    Raises :class:`LibvirtError` ``cannot connect to libvirt at URI: reason``
    (the URI with any password masked), :class:`ConfigError` when the password
    file cannot be read.
    """
    uri = config.libvirt_uri
    shown_uri = masked(uri)
    settings = config.libvirt
    password = _password(config)
    secrets = [secret for secret in (password, parse_uri(uri).password) if secret]

    def open_connection() -> libvirt.virConnect:
        if settings.username is None and password is None:
            # openAuth(uri, None, ...) segfaults in libvirt-python; open() is the same call.
            if settings.flags & libvirt.VIR_CONNECT_RO:
                return libvirt.openReadOnly(uri)
            return libvirt.open(uri)
        return libvirt.openAuth(uri, _credentials(settings.username, password), settings.flags)

    def failure(reason: str, code: int | None = None) -> LibvirtError:
        for secret in secrets:
            reason = reason.replace(secret, "***")
        return LibvirtError(f"cannot connect to libvirt at {shown_uri}: {reason}", code, reason)

    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        try:
            return _within(open_connection, deadline)
        except TimeoutError:
            raise failure(f"no answer within {timeout_s:g} s") from None
        except libvirt.libvirtError as error:
            now = time.monotonic()
            if not _is_transient(error) or now - started >= retry_s or now >= deadline:
                reason = _message(error)
                if _is_transient(error) and retry_s > 0:
                    reason += f" (tried for {now - started:.0f} s)"
                raise failure(reason, error.get_error_code()) from None
            log.debug("libvirt at %s refused (%s); trying again", shown_uri, _message(error))
            time.sleep(min(CONNECT_RETRY_PAUSE_S, max(0.0, deadline - now)))


def _password(config: Config) -> str | None:
    """The libvirt password: from ``libvirt.password_file``, else the legacy key."""
    settings = config.libvirt
    if settings.password_file is None:
        return settings.password
    try:
        return settings.password_file.read_text().rstrip("\n")
    except OSError as error:
        raise ConfigError(
            f"{config.path}: libvirt.password_file: cannot read "
            f"{settings.password_file}: {error.strerror}"
        ) from None


def _within(function: Callable[[], libvirt.virConnect], deadline: float) -> libvirt.virConnect:
    """``function()`` in a daemon thread, given up at ``deadline`` (TimeoutError).

    libvirt has no connect timeout of its own for every transport (a TCP peer
    that accepts and never answers, an ssh stuck in its key exchange, a TLS
    handshake that stalls all block ``virConnectOpen`` for good), and a
    blocked C call cannot be interrupted: the thread is left behind, and a
    connection it still makes later is closed at once.
    """
    lock = threading.Lock()
    outcome: list[Any] = []
    abandoned = False

    def attempt() -> None:
        try:
            result: Any = ("connection", function())
        except libvirt.libvirtError as error:
            result = ("error", error)
        with lock:
            if abandoned:
                if result[0] == "connection":
                    with contextlib.suppress(libvirt.libvirtError):
                        result[1].close()
                return
            outcome.append(result)

    thread = threading.Thread(target=attempt, name="libvirt-connect", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        if not outcome:
            abandoned = True
            raise TimeoutError
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


#: errno values of a socket connect that a libvirtd being restarted gives
#: (nothing listens yet, the socket file is being recreated).
_TRANSIENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENOENT})


def _is_transient(error: libvirt.libvirtError) -> bool:
    """Whether a failed connect may well succeed in a moment: libvirt's system
    errors carry the errno of the failed call (``int1``)."""
    return (
        error.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR
        and error.get_int1() in _TRANSIENT_ERRNOS
    )


def _looks_like_uuid(text: str) -> bool:
    import uuid

    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _credentials(username: str | None, password: str | None) -> list[Any]:
    def answer(credentials: list[list[Any]], _data: object) -> int:
        for credential in credentials:
            if credential[0] == libvirt.VIR_CRED_AUTHNAME:
                credential[4] = username or ""
            elif credential[0] == libvirt.VIR_CRED_PASSPHRASE:
                credential[4] = password or ""
            else:
                return -1
        return 0

    return [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], answer, None]


class DiskOperations:
    """What virt-dup's overlays need from libvirt for one domain: its state,
    disk-only snapshots, active block commits and the persistent disk
    definition.  Every call goes through :meth:`Hypervisor.call`."""

    def __init__(self, hypervisor: Hypervisor, domain: libvirt.virDomain) -> None:
        self.hypervisor = hypervisor
        self.domain = domain
        self.name = domain.name()

    def is_active(self) -> bool:
        """Running or paused (a QEMU process exists)."""
        what = f"cannot read the state of domain {self.name}"
        return bool(self.hypervisor.call(what, self.domain.isActive))

    def is_persistent(self) -> bool:
        what = f"cannot read the state of domain {self.name}"
        return bool(self.hypervisor.call(what, self.domain.isPersistent))

    def disks(self, *, inactive: bool) -> list[Disk]:
        return self.hypervisor.disks(self.domain, inactive=inactive)

    def snapshot_disks(self, snapshot_xml: str, *, quiesce: bool) -> None:
        """One atomic, disk-only snapshot without libvirt metadata (external
        overlays).  With ``quiesce`` libvirt freezes the guest's filesystems
        through the guest agent around it, and thaws them also when it fails.
        Raises :class:`LibvirtError` (``ATOMIC``: then nothing was created)."""
        flags = SNAPSHOT_FLAGS | (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE if quiesce else 0)
        what = f"cannot create the virt-dup overlay of domain {self.name}"
        self.hypervisor.call(what, self.domain.snapshotCreateXML, snapshot_xml, flags)

    def block_job(self, target: str, what: str) -> dict[str, int] | None:
        """The block job running on disk ``target`` (``type``, ``cur``, ``end``), or None."""
        info = self.hypervisor.call(what, self.domain.blockJobInfo, target, 0)
        return dict(info) if info else None

    def start_active_commit(self, target: str, bandwidth: int, what: str) -> None:
        """A shallow active blockcommit of the disk's top into its backing file."""
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
        if bandwidth:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES
        self.hypervisor.call(what, self.domain.blockCommit, target, None, None, bandwidth, flags)

    def pivot(self, target: str, what: str) -> bool:
        """End the active commit on ``target`` by pivoting to its base; False while
        libvirt is not ready for that yet (it has not handled QEMU's READY event)."""
        try:
            flags = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
            self.hypervisor.call(what, self.domain.blockJobAbort, target, flags)
        except LibvirtError as error:
            if error.code == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                return False
            raise
        return True

    def abort_block_job(self, target: str, what: str) -> None:
        """Cancel the block job on ``target`` (the disk stays where it was)."""
        self.hypervisor.call(what, self.domain.blockJobAbort, target, 0)

    def has_managed_save(self) -> bool:
        """Whether the domain was saved with its memory (``virsh managedsave``,
        libvirt-guests ``ON_SHUTDOWN=suspend``): its next start resumes from it."""
        what = f"cannot read the state of domain {self.name}"
        return bool(self.hypervisor.call(what, self.domain.hasManagedSaveImage, 0))

    def managed_save_xml(self) -> str:
        what = f"cannot read the saved state of domain {self.name}"
        return str(self.hypervisor.call(what, self.domain.managedSaveGetXMLDesc, 0))

    def define_managed_save(self, xml: str, what: str) -> None:
        """Replace the definition inside the managed save image (same ABI)."""
        self.hypervisor.call(what, self.domain.managedSaveDefineXML, xml, 0)

    def define_disk(self, disk_xml: str, what: str) -> None:
        """Replace one ``<disk>`` of the persistent definition (by its target)."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        self.hypervisor.call(what, self.domain.updateDeviceFlags, disk_xml, flags)


#: A disk-only, all-or-nothing snapshot that leaves no libvirt snapshot metadata.
SNAPSHOT_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
)
#: The block job type of an active commit.
ACTIVE_COMMIT = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
#: libvirt errors that mean "the guest agent cannot freeze now", not "the snapshot is wrong".
_AGENT_ERRORS = frozenset({libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED})
#: Generic codes libvirt also uses for agent trouble ("QEMU guest agent is not configured",
#: a freeze command that failed or timed out in the guest).
_GENERIC_ERRORS = frozenset(
    {
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
        libvirt.VIR_ERR_OPERATION_FAILED,
        libvirt.VIR_ERR_OPERATION_TIMEOUT,
        libvirt.VIR_ERR_INTERNAL_ERROR,
    }
)


def is_agent_error(error: LibvirtError) -> bool:
    """Whether a failed quiesced snapshot failed because the guest agent cannot
    freeze (not configured, not connected, unresponsive), not because of the
    snapshot itself."""
    if error.code in _AGENT_ERRORS:
        return True
    return error.code in _GENERIC_ERRORS and "agent" in error.reason.lower()
