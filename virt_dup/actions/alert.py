"""``virt-dup alert UNIT``: tell people that a virt-dup unit failed.

What ``virt-dup-alert@.service`` runs when a unit's ``OnFailure=`` starts it:
the failed unit's name gives the job, the job's status file its domain and
error line, and the alert goes to every apprise URL of ``alerts:`` in
virt-dup.yml.  The failure is always in the journal (priority err), whether
or not any alert could be sent; a URL that cannot be reached is a journal
warning, never a failure of this verb (the alert unit has no ``OnFailure=``
of its own: a failed alert alerts nobody, it is logged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from virt_dup.alerts.message import Alert, failure_alert, parse_unit
from virt_dup.alerts.send import alert_urls, hostname, send_alert
from virt_dup.backup.state import StateStore
from virt_dup.config.load import Config
from virt_dup.config.options import masked_url
from virt_dup.errors import ConfigError
from virt_dup.systemd import journal


@dataclass
class AlertResult:
    """What ``virt-dup alert`` did."""

    alert: Alert
    #: The URLs (masked) the alert reached.
    sent: list[str] = field(default_factory=list)
    #: One line per URL it did not reach (or why none was tried).
    problems: list[str] = field(default_factory=list)


def alert_failure(config: Config, unit: str, *, host: str | None = None) -> AlertResult:
    """Record the failure of ``unit`` in the journal and send its alert.

    Raises :class:`~virt_dup.errors.UsageError` only for a ``unit`` that is
    not a unit name; nothing else that goes wrong raises.
    """
    failed = parse_unit(unit)
    store = StateStore.of(config)
    status = store.load_status(failed.job_uuid) if failed.job_uuid else {}
    status_path = str(store.status_path(failed.job_uuid)) if failed.job_uuid else None
    alert = failure_alert(
        failed, status, host=host or hostname(), scope=config.scope, status_path=status_path
    )
    journal.record(
        alert.body.replace("\n", "; ").rstrip("; "),
        priority=journal.PRIORITY_ERR,
        FAILED_UNIT=unit,
        JOB_UUID=failed.job_uuid,
    )
    result = AlertResult(alert)
    if "failure" not in config.alerts.events or not config.alerts.configured:
        return result
    try:
        urls = alert_urls(config.alerts)
    except ConfigError as error:
        result.problems.append(str(error))
        urls = []
    result.problems.extend(send_alert(urls, alert))
    failed_urls = {problem.partition(": ")[0] for problem in result.problems}
    result.sent = [shown for shown in (masked_url(url) for url in urls) if shown not in failed_urls]
    for problem in result.problems:
        journal.record(
            f"alert for {unit} not sent: {problem}",
            priority=journal.PRIORITY_WARNING,
            FAILED_UNIT=unit,
            JOB_UUID=failed.job_uuid,
        )
    return result


def config_failure(unit: str, error: ConfigError) -> None:
    """The failure of ``unit`` when virt-dup.yml cannot be read (so no alert
    can be sent): the journal has it, and why nothing was sent."""
    journal.record(
        f"{unit} failed; see: journalctl -u {unit}",
        priority=journal.PRIORITY_ERR,
        FAILED_UNIT=unit,
    )
    journal.record(
        f"alert for {unit} not sent: {error}",
        priority=journal.PRIORITY_WARNING,
        FAILED_UNIT=unit,
    )
