"""install-units, sync-timers, and the timers following job changes: the
orchestration of :mod:`virt_dup.systemd.units` and the service manager.

:func:`install_units` writes the units and starts them; :func:`sync_timers`
makes the manager's running timers match what the generator writes;
:func:`sync_after_job_change` does it after add-job, remove-job or a restore
that defined a domain.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from virt_dup.config.load import Config
from virt_dup.systemd.generator import TARGET
from virt_dup.systemd.manager import ServiceManager, SystemdError, SystemdUnavailable
from virt_dup.systemd.units import (
    START_UNITS,
    TIMER_PATTERNS,
    Installation,
    InstallSettings,
    check_scope,
    data_directory,
    is_job_timer,
    read_sources,
    render_installation,
    write_installation,
)

log = logging.getLogger(__name__)


def start_installed(manager: ServiceManager) -> list[str]:
    """daemon-reload, then start the target and the watcher; returns what was started."""
    manager.reload()
    jobs = [manager.start_unit(name) for name in START_UNITS]
    manager.wait_for_jobs(jobs)
    return list(START_UNITS)


@dataclass(frozen=True)
class SyncReport:
    started: tuple[str, ...] = ()
    #: Timers whose job is gone (unit file no longer generated): stopped or failed state reset.
    removed: tuple[str, ...] = ()
    #: Started but not active afterwards: (timer, its active state).
    not_active: tuple[tuple[str, str], ...] = ()
    #: Inactive timers left alone because virt-dup.target is stopped (backups paused).
    paused: tuple[str, ...] = ()
    unchanged: int = 0

    def as_json(self) -> dict[str, object]:
        return {
            "started": list(self.started),
            "removed": list(self.removed),
            "not_active": [{"timer": name, "state": state} for name, state in self.not_active],
            "paused": list(self.paused),
            "unchanged": self.unchanged,
        }

    def lines(self) -> list[str]:
        lines = [f"started {name}" for name in self.started]
        lines += [f"stopped {name} (its job is gone)" for name in self.removed]
        lines += [f"{name} did not start: {state}" for name, state in self.not_active]
        if self.paused:
            lines.append(
                f"{TARGET} is not active (stopped to pause backups?): {len(self.paused)} "
                f"timer(s) not started; 'systemctl start {TARGET}' starts them"
            )
        return lines


def watched_files_state(config: Config) -> tuple[tuple[str, int, int, int], ...]:
    """A fingerprint of what virt-dup-reload.path watches: virt-dup.yml and the domain XMLs."""
    paths = [config.path]
    with contextlib.suppress(OSError):
        paths += sorted(config.libvirt_config_dir.glob("*.xml"))
    state = []
    for path in paths:
        try:
            status = path.stat()
        except OSError:
            state.append((str(path), -1, -1, -1))
            continue
        state.append((str(path), status.st_mtime_ns, status.st_size, status.st_ino))
    return tuple(state)


def sync_until_settled(
    manager: ServiceManager,
    watched: Callable[[], object],
    rounds: int = 5,
    settle_seconds: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
) -> SyncReport:
    """:func:`sync_timers` again while the watched files changed during the last one.

    A path unit drops the changes made while its service runs (it neither
    queues a second start nor looks again when the service ends): without
    this, a job edited during a sync would keep its old timer until the next
    change.  ``settle_seconds`` also covers a change made just after the last
    sync: the files must stay unchanged that long.  Returns the merged report.
    """
    merged = SyncReport()
    before = watched()
    for _round in range(rounds):
        report = sync_timers(manager)
        merged = SyncReport(
            started=merged.started + report.started,
            removed=merged.removed + report.removed,
            not_active=report.not_active,
            paused=report.paused,
            unchanged=report.unchanged,
        )
        after = watched()
        if after == before and settle_seconds:
            sleep(settle_seconds)
            after = watched()
        if after == before:
            break
        before = after
    return merged


def sync_timers(manager: ServiceManager) -> SyncReport:
    """Make the running timers match the generated ones.

    daemon-reload (re-runs the generator; changed schedules of running timers
    apply at once), start every generated timer that is not active, stop the
    timers whose unit file is gone (removed jobs).  While virt-dup.target is
    stopped (``systemctl stop virt-dup.target`` pauses every backup), no
    timer is started.  Raises SystemdError.
    """
    manager.reload()
    on_disk = {name for name in manager.list_unit_files(TIMER_PATTERNS) if is_job_timer(name)}
    loaded = {unit.name: unit for unit in manager.list_units(TIMER_PATTERNS)}
    target_active = any(unit.active for unit in manager.list_units([TARGET]))
    started, removed, paused, jobs = [], [], [], []
    for name in sorted(on_disk):
        unit = loaded.get(name)
        if unit is not None and unit.active:
            continue
        if not target_active:
            paused.append(name)
            continue
        jobs.append(manager.start_unit(name))
        started.append(name)
    for name, unit in sorted(loaded.items()):
        if name in on_disk or not is_job_timer(name):
            continue
        if unit.active:
            jobs.append(manager.stop_unit(name))
            removed.append(name)
        elif unit.active_state == "failed":  # what a running timer becomes when its file goes
            manager.reset_failed(name)
            removed.append(name)
    manager.wait_for_jobs(jobs)
    not_active: list[tuple[str, str]] = []
    if started:
        now = {unit.name: unit for unit in manager.list_units(started)}
        not_active = [
            (name, now[name].active_state if name in now else "not loaded")
            for name in started
            if name not in now or not now[name].active
        ]
    return SyncReport(
        started=tuple(started),
        removed=tuple(removed),
        not_active=tuple(not_active),
        paused=tuple(paused),
        unchanged=len(on_disk) - len(started) - len(paused),
    )


@dataclass
class Installed:
    """What :func:`install_units` wrote (or, in a dry run, would write)."""

    scope: str
    dry_run: bool
    #: path -> (text, mode) of every file.
    files: dict[str, tuple[str, int]] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    #: Directories made because they were missing (dry run: that would be, when missing).
    directories: dict[str, int] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    #: Units started after the reload; None when no manager was reachable (or a dry
    #: run, or a scratch root).
    started: list[str] | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "scope": self.scope,
            "dry_run": self.dry_run,
            "files": [
                {"path": path, "mode": f"{mode:04o}", **({"text": text} if self.dry_run else {})}
                for path, (text, mode) in sorted(self.files.items())
            ],
            "symlinks": [
                {"path": link, "target": target} for link, target in sorted(self.symlinks.items())
            ],
            "directories": [
                {"path": path, "mode": f"{mode:04o}"}
                for path, mode in sorted(self.directories.items())
            ],
            "removed": list(self.removed),
            "started": self.started,
        }


def show_installation(installation: Installation, say: Callable[[str], None]) -> None:
    """``install-units --dry-run``: every file with its text, link and directory."""
    for path, (text, mode) in sorted(installation.files.items()):
        say(f"# {path} (mode {mode:04o})")
        say(text.removesuffix("\n"))
    for link, target in sorted(installation.symlinks.items()):
        say(f"# {link} -> {target}")
    for directory, mode in sorted(installation.directories.items()):
        say(f"# directory {directory} (mode {mode:04o}, when missing)")
    for path in installation.removed:
        say(f"# removed if present: {path}")


def install_units(
    config: Config,
    settings: InstallSettings,
    *,
    dry_run: bool,
    say: Callable[[str], None],
    notice: Callable[[str], None],
    root: Path | None = None,
) -> Installed:
    """Write the units and the generator as ``settings`` say, reload the manager
    and start :data:`~virt_dup.systemd.units.START_UNITS`; returns what it did.

    ``dry_run`` prints the files instead.  ``root``: write them into that
    scratch tree instead (``settings`` name the host's paths) and leave the
    running manager alone.  What was done goes to ``say``; a manager that is
    not reachable (the units then take effect at the next boot), one left
    alone, or a scope that is not virt-dup.yml's goes to ``notice``.
    """
    mismatch = check_scope(config, settings.scope)
    if mismatch:
        notice(mismatch)
    unit_sources, generator_source = read_sources(
        data_directory("units"), data_directory("generator")
    )
    installation = render_installation(settings, unit_sources, generator_source)
    installed = Installed(
        settings.scope,
        dry_run,
        files={str(path): content for path, content in installation.files.items()},
        symlinks={str(link): str(target) for link, target in installation.symlinks.items()},
        removed=[str(path) for path in installation.removed],
    )
    if dry_run:
        installed.directories = {str(d): mode for d, mode in installation.directories.items()}
        show_installation(installation, say)
        return installed
    if root is not None:
        installation = installation.under(root)
    missing = [directory for directory in installation.directories if not directory.exists()]
    write_installation(installation)
    installed.directories = {str(d): installation.directories[d] for d in missing}
    for directory in missing:
        say(f"created {directory}")
    for path in sorted(installation.files):
        say(f"installed {path}")
    for link, target in sorted(installation.symlinks.items()):
        say(f"linked {link} -> {target}")
    systemctl = "systemctl" if settings.scope == "system" else "systemctl --user"
    if root is not None:
        notice(
            f"--root {root}: the running {settings.scope} manager is left alone; on the host "
            f"this tree becomes, run: {systemctl} daemon-reload && "
            f"{systemctl} start {' '.join(START_UNITS)}"
        )
        return installed
    try:
        with ServiceManager.connect(settings.scope) as manager:
            installed.started = start_installed(manager)
    except SystemdUnavailable as error:
        log.debug("%s", error)
        notice(
            f"no systemd {settings.scope} manager reachable; the units take effect at the "
            f"next boot, or run: {systemctl} daemon-reload && "
            f"{systemctl} start {' '.join(START_UNITS)}"
        )
        return installed
    say(f"reloaded the {settings.scope} manager; started {', '.join(installed.started)}")
    return installed


def sync_after_job_change(config: Config, report: Callable[[str], None]) -> None:
    """Jobs changed: have the manager run the generator and start/stop timers now.

    No manager is a notice, a failing one a warning (to ``report``, like what
    changed): the XML is written either way, and virt-dup-reload.path or the
    next daemon-reload catches up.
    """
    try:
        with ServiceManager.connect(config.scope) as manager:
            synced = sync_until_settled(manager, lambda: watched_files_state(config))
    except SystemdUnavailable as error:
        log.debug("%s", error)
        report("notice: no systemd manager reachable; timers change at the next daemon-reload")
        return
    except SystemdError as error:
        report(f"warning: {error}; run 'virt-dup sync-timers'")
        return
    for line in synced.lines():
        report(line)
