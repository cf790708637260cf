"""The words of an alert: which unit failed, which job and domain, the error
line, and the ``journalctl`` command that shows more.  Pure: the status file
and the host name are handed in.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from virt_dup.errors import UsageError
from virt_dup.libvirt.metadata import is_valid_uuid
from virt_dup.systemd.generator import CHECK_SERVICE, RECOVER_SERVICE, RELOAD_SERVICE, TIMER_KINDS

#: What systemd allows in a unit name (``unit_name_is_valid``), and a bound.
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}")

#: Template units whose instance is a job uuid, and what one run of them does.
JOB_UNITS = {kind.prefix: kind.what for kind in TIMER_KINDS}

#: Static units, and what they do.
HOST_UNITS = {
    RECOVER_SERVICE: "boot-time recovery of interrupted runs",
    RELOAD_SERVICE: "sync of the timers with the jobs",
    CHECK_SERVICE: "freshness check of the backups",
}


@dataclass(frozen=True)
class FailedUnit:
    """A virt-dup unit that failed, from its name."""

    unit: str
    #: What the unit does ("backup", "verification", ...).
    action: str
    #: The job's uuid, for the units of one job.
    job_uuid: str | None = None


@dataclass(frozen=True)
class Alert:
    """One alert: a title (an email's subject) and a body of a few lines."""

    title: str
    body: str


def parse_unit(unit: str) -> FailedUnit:
    """The failed unit ``virt-dup@<uuid>.service`` etc.

    A name that is not a systemd unit name raises :class:`UsageError`; a valid
    name virt-dup does not know still gets an alert (an admin may point
    their own unit's ``OnFailure=`` at ours).
    """
    if not _UNIT_NAME.fullmatch(unit):
        raise UsageError(f"{unit[:80]!r} is not a systemd unit name")
    if unit in HOST_UNITS:
        return FailedUnit(unit, HOST_UNITS[unit])
    prefix, at, rest = unit.partition("@")
    if at and prefix in JOB_UNITS and rest.endswith(".service"):
        instance = rest.removesuffix(".service")
        if is_valid_uuid(instance):
            return FailedUnit(unit, JOB_UNITS[prefix], instance)
    return FailedUnit(unit, f"unit {unit}")


def journal_command(unit: str, scope: str) -> str:
    """The command that shows the unit's log: ``journalctl -u UNIT`` (``--user``
    for a user manager)."""
    words = ["journalctl", *(["--user"] if scope == "user" else []), "-u", unit]
    return shlex.join(words)


def failure_alert(
    failed: FailedUnit,
    status: Mapping[str, Any],
    *,
    host: str,
    scope: str,
    status_path: str | None = None,
) -> Alert:
    """The alert for ``failed``, with what the job's status file says
    (``status``: :meth:`virt_dup.backup.state.StateStore.load_status`; empty
    when there is none).

    The error line is the last failure recorded (``last_run`` when it failed);
    when the unit failed before virt-dup could record anything (killed, a
    timeout, a broken installation) the alert says so and points at the
    journal.
    """
    last_run = status.get("last_run")
    run: Mapping[str, Any] = last_run if isinstance(last_run, dict) else {}
    recorded = run.get("result") == "failed"
    domain = str(run.get("domain") or "") if recorded else ""
    if failed.job_uuid is not None and not domain:
        last_success = status.get("last_success")
        if isinstance(last_success, dict):
            domain = str(last_success.get("domain") or "")
    if recorded and run.get("message"):
        error = str(run["message"])
    elif failed.job_uuid is not None:
        where = f" in {status_path}" if status_path else ""
        error = (
            f"no failure recorded{where}: the unit failed before virt-dup could record it "
            "(killed, a timeout, or it could not start)"
        )
    else:
        error = "see the unit's journal"
    what = failed.action
    if failed.job_uuid is not None:
        subject = f"{what} of {domain}" if domain and domain != "?" else f"{what} of job"
        title = f"virt-dup on {host}: {subject} failed"
        lines = [
            f"The {what} of job {failed.job_uuid} (domain {domain or 'unknown'}) failed on {host}.",
            f"error: {_one_line(error)}",
        ]
    else:
        title = f"virt-dup on {host}: {what} failed"
        lines = [f"The {what} ({failed.unit}) failed on {host}.", f"error: {_one_line(error)}"]
    if recorded and run.get("finished"):
        lines.append(f"finished: {run['finished']}")
    lines.append(f"unit: {failed.unit}")
    lines.append(f"more: {journal_command(failed.unit, scope)}")
    return Alert(title=title, body="\n".join(lines) + "\n")


def stale_alert(problems: list[str], *, host: str, scope: str) -> Alert:
    """The alert of ``virt-dup status --check --alert``: one line per job that is
    not fresh (``problems``: what ``--check`` printed)."""
    command = "virt-dup status"
    lines = [
        f"virt-dup on {host}: {len(problems)} problem(s) with the freshness of the backups:",
        *(_one_line(problem) for problem in problems),
        f"more: {command}; {journal_command('virt-dup-check.service', scope)}",
    ]
    return Alert(
        title=f"virt-dup on {host}: backups not fresh ({len(problems)})",
        body="\n".join(lines) + "\n",
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())
