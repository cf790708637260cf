"""The one way virt-dup talks to a systemd service manager: D-Bus through pystemd.

Which manager is a setting (``scope`` in virt-dup.yml), independent of the
libvirt URI:

* ``system``: PID 1.  As root, its private socket ``/run/systemd/private``
  (what systemctl uses: works before and without dbus-daemon), else the
  system bus.
* ``user``: the calling user's ``systemd --user``.  Its private socket
  ``$XDG_RUNTIME_DIR/systemd/private`` (peer-to-peer, no bus daemon needed),
  else the user bus.

:meth:`ServiceManager.connect` raises :class:`SystemdUnavailable` when no
manager answers (a container, a chroot, a machine not booted with systemd);
callers decide whether that is an error or a notice.  Every other failed
call becomes a :class:`SystemdError` naming the manager, the unit and what
systemd said.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from virt_dup.errors import VirtDupError

#: PID 1's private socket (root only).
SYSTEM_PRIVATE_SOCKET = Path("/run/systemd/private")
#: A user manager's private socket, relative to its $XDG_RUNTIME_DIR.
USER_PRIVATE_SOCKET = Path("systemd/private")

#: How long :meth:`ServiceManager.wait_for_jobs` waits by default (timer jobs take ms).
JOB_TIMEOUT = 30.0
_JOB_POLL_INTERVAL = 0.02
# Timestamps systemd uses for "never".
_USEC_INFINITY = 2**64 - 1


class SystemdError(VirtDupError):
    """The service manager refused or failed a request (message says which, on what)."""


class SystemdUnavailable(SystemdError):
    """No systemd manager of the wanted scope is reachable."""


@dataclass(frozen=True)
class UnitStatus:
    """A loaded unit as the manager reports it (``systemctl list-units`` columns)."""

    name: str
    description: str
    load_state: str  # loaded, not-found, masked, error...
    active_state: str  # active, inactive, failed, activating...
    sub_state: str  # waiting, running, dead...

    @property
    def active(self) -> bool:
        return self.active_state in ("active", "activating", "reloading")


@dataclass(frozen=True)
class BusCandidate:
    """One way to reach a manager: ``where`` for messages, ``open`` makes the bus."""

    where: str
    open: Callable[[], Any]


def bus_candidates(
    scope: str, environ: Mapping[str, str] | None = None, euid: int | None = None
) -> list[BusCandidate]:
    """The ways to reach the ``scope`` manager, most direct first."""
    from pystemd.dbuslib import DBus, DBusAddress

    environ = os.environ if environ is None else environ
    euid = os.geteuid() if euid is None else euid

    def private(socket: Path) -> BusCandidate:
        address = b"unix:path=" + os.fsencode(socket)
        return BusCandidate(str(socket), lambda: DBusAddress(address, peer_to_peer=True))

    if scope == "system":
        candidates = [private(SYSTEM_PRIVATE_SOCKET)] if euid == 0 else []
        return [*candidates, BusCandidate("the system bus", lambda: DBus(user_mode=False))]
    if scope == "user":
        runtime_dir = environ.get("XDG_RUNTIME_DIR") or f"/run/user/{euid}"
        return [
            private(Path(runtime_dir) / USER_PRIVATE_SOCKET),
            BusCandidate("the user bus", lambda: DBus(user_mode=True)),
        ]
    raise ValueError(f"scope must be system or user, not {scope!r}")


def _dbus_error_message(error: Exception) -> str:
    """What went wrong, in words: systemd's message, else the errno's."""
    message = getattr(error, "err_message", None)
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    errno_value = getattr(error, "errno", None)
    reason = os.strerror(abs(errno_value)) if isinstance(errno_value, int) and errno_value else ""
    if message and not (reason and message.startswith("Could not open a bus")):
        return str(message)  # systemd's own words ("Unit x.timer not found.")
    return reason or str(error) or type(error).__name__


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class ServiceManager:
    """A connection to one systemd manager, with the few calls virt-dup needs."""

    def __init__(self, bus: Any, scope: str, where: str) -> None:
        from pystemd.systemd1 import Manager

        self.bus = bus
        self.scope = scope
        self.where = where
        self._manager = Manager(bus=bus, _autoload=True)

    @classmethod
    def connect(
        cls,
        scope: str,
        environ: Mapping[str, str] | None = None,
        candidates: Iterable[BusCandidate] | None = None,
    ) -> ServiceManager:
        """Connect to the ``scope`` (system or user) manager.

        ``candidates`` (default :func:`bus_candidates`) are tried in order.
        Raises :class:`SystemdUnavailable` listing what was tried and why it failed.
        """
        from pystemd.dbusexc import DBusBaseError

        tried = []
        for candidate in candidates if candidates is not None else bus_candidates(scope, environ):
            bus = None
            try:
                bus = candidate.open()
                bus.open()
                return cls(bus, scope, candidate.where)
            except (DBusBaseError, OSError) as error:
                tried.append(f"{candidate.where}: {_dbus_error_message(error)}")
                if bus is not None:
                    bus.close()
        raise SystemdUnavailable(
            f"no systemd {scope} manager reachable ({'; '.join(tried) or 'nothing to try'})"
        )

    def close(self) -> None:
        self.bus.close()

    def __enter__(self) -> ServiceManager:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, what: str, function: Callable[..., Any], *arguments: Any) -> Any:
        from pystemd.dbusexc import DBusBaseError

        try:
            return function(*arguments)
        except DBusBaseError as error:
            raise SystemdError(
                f"systemd {self.scope} manager ({self.where}): {what}: {_dbus_error_message(error)}"
            ) from None

    # -- manager ------------------------------------------------------------------
    @property
    def version(self) -> str:
        return _text(self._call("cannot read Version", getattr, self._manager.Manager, "Version"))

    def reload(self) -> None:
        """``systemctl daemon-reload``: re-run generators, re-read unit files.

        Returns when the manager has finished reloading.
        """
        self._call("daemon-reload failed", self._manager.Manager.Reload)

    def start_unit(self, name: str, mode: str = "replace") -> str:
        """Queue a start job for unit ``name``; returns the job's object path."""
        path = self._call(
            f"cannot start {name}", self._manager.Manager.StartUnit, name.encode(), mode.encode()
        )
        return _text(path)

    def stop_unit(self, name: str, mode: str = "replace") -> str:
        """Queue a stop job for unit ``name``; returns the job's object path."""
        path = self._call(
            f"cannot stop {name}", self._manager.Manager.StopUnit, name.encode(), mode.encode()
        )
        return _text(path)

    def reset_failed(self, name: str) -> None:
        """Forget that unit ``name`` failed (``systemctl reset-failed``)."""
        self._call(
            f"cannot reset the failed state of {name}",
            self._manager.Manager.ResetFailedUnit,
            name.encode(),
        )

    def pending_jobs(self) -> set[str]:
        """Object paths of the jobs queued or running now."""
        jobs = self._call("cannot list jobs", self._manager.Manager.ListJobs)
        return {_text(job[4]) for job in jobs}

    def wait_for_jobs(self, job_paths: Iterable[str], timeout: float = JOB_TIMEOUT) -> None:
        """Return once none of ``job_paths`` is queued any more.

        Raises :class:`SystemdError` naming the jobs still pending after ``timeout`` s.
        """
        waiting = set(job_paths)
        deadline = time.monotonic() + timeout
        while waiting:
            waiting &= self.pending_jobs()
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise SystemdError(
                    f"systemd {self.scope} manager ({self.where}): jobs still pending after "
                    f"{timeout:.0f}s: {', '.join(sorted(waiting))}"
                )
            time.sleep(_JOB_POLL_INTERVAL)

    def list_units(self, patterns: Iterable[str], states: Iterable[str] = ()) -> list[UnitStatus]:
        """Loaded units matching the glob ``patterns``, in ``states`` (empty: any)."""
        rows = self._call(
            "cannot list units",
            self._manager.Manager.ListUnitsByPatterns,
            [state.encode() for state in states],
            [pattern.encode() for pattern in patterns],
        )
        return sorted(
            (UnitStatus(*(_text(value) for value in row[:5])) for row in rows),
            key=lambda unit: unit.name,
        )

    def list_unit_files(self, patterns: Iterable[str]) -> dict[str, str]:
        """Unit files on disk (generated ones included) matching ``patterns``: {name: state}."""
        rows = self._call(
            "cannot list unit files",
            self._manager.Manager.ListUnitFilesByPatterns,
            [],
            [pattern.encode() for pattern in patterns],
        )
        return {Path(_text(path)).name: _text(state) for path, state in rows}

    # -- units --------------------------------------------------------------------
    def unit_properties(self, name: str) -> Any:
        """The pystemd unit object of ``name`` (loads it if needed), for reading properties."""
        from pystemd.systemd1 import Unit

        return self._call(f"cannot read unit {name}", Unit, name.encode(), self.bus, True)

    def next_elapse(self, timer: str, now: datetime | None = None) -> datetime | None:
        """When ``timer`` fires next (aware, UTC), or None when it is not scheduled.

        Like ``systemctl list-timers``: the earlier of the calendar and the
        monotonic (``OnBootSec=``...) elapse, the latter converted with ``now``.
        """
        timer_interface = self.unit_properties(timer).Timer
        what = f"cannot read the next elapse of {timer}"
        realtime = int(self._call(what, getattr, timer_interface, "NextElapseUSecRealtime"))
        monotonic = int(self._call(what, getattr, timer_interface, "NextElapseUSecMonotonic"))
        candidates = []
        if realtime not in (0, _USEC_INFINITY):
            candidates.append(datetime.fromtimestamp(realtime / 1e6, UTC))
        if monotonic not in (0, _USEC_INFINITY):
            now = now or datetime.now(UTC)
            seconds_from_now = monotonic / 1e6 - time.monotonic()
            candidates.append(datetime.fromtimestamp(now.timestamp() + seconds_from_now, UTC))
        return min(candidates) if candidates else None
