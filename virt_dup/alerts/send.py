"""Delivery: alerts through apprise, pings over HTTP.  Never raises for a
delivery that fails: each failure comes back as one line (passwords masked),
which the caller logs as a journal warning.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from virt_dup.alerts.message import Alert
from virt_dup.config.load import AlertSettings, Config
from virt_dup.config.options import masked_url
from virt_dup.errors import ConfigError
from virt_dup.systemd import journal

#: How long one ping may take: a slow monitoring service must not delay a backup.
PING_TIMEOUT_SECONDS = 10.0

#: The suffixes of healthchecks.io's ping API (the bare URL is "success").
PING_SUFFIXES = {"start": "/start", "success": "", "failure": "/fail"}

#: The most of a failure's message a ping carries (healthchecks keeps 100 kB).
_PING_BODY_LIMIT = 10_000


def alert_urls(settings: AlertSettings) -> list[str]:
    """``alerts.urls`` and the lines of ``alerts.urls_file`` (blank lines and
    ``#`` comments left out).

    Raises :class:`ConfigError` for a file that cannot be read or that others
    can read (it holds passwords).
    """
    urls = list(settings.urls)
    path = settings.urls_file
    if path is not None:
        try:
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise ConfigError(
                    f"{path}: alerts.urls_file is readable by others (mode {mode:o}); chmod 600 it"
                )
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise ConfigError(f"{path}: cannot read alerts.urls_file: {reason}") from None
        for line in text.splitlines():
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                urls.append(stripped)
    return urls


def send_alert(urls: list[str], alert: Alert, *, failure: bool = True) -> list[str]:
    """Send ``alert`` to each apprise URL; returns one line per URL it did not reach.

    Each URL is tried on its own (one broken receiver does not keep the
    others from theirs); apprise bounds each attempt (its ``cto``/``rto``
    URL parameters: 4 s by default).  apprise's own log lines are kept from
    the journal (they may name a URL); the reason for a failure is its last
    warning, with the URL's password masked.
    """
    import apprise

    problems = []
    for url in urls:
        shown = masked_url(url) if "://" in url else url[:40]
        notifier = apprise.Apprise()
        with _apprise_log() as lines:
            added = notifier.add(url)
            sent = bool(
                added
                and notifier.notify(
                    body=alert.body,
                    title=alert.title,
                    notify_type=apprise.NotifyType.FAILURE if failure else apprise.NotifyType.INFO,
                    body_format=apprise.NotifyFormat.TEXT,
                )
            )
        if not added:
            problems.append(f"{shown}: not a URL apprise can send to")
        elif not sent:
            reason = _masked(lines[-1], url) if lines else "apprise gave no reason"
            problems.append(f"{shown}: not sent: {reason}")
    return problems


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(" ".join(record.getMessage().split()))


@contextmanager
def _apprise_log() -> Iterator[list[str]]:
    """apprise's warnings while the block runs, instead of on stderr."""
    logger = logging.getLogger("apprise")
    handler = _Lines()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _masked(text: str, url: str) -> str:
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def ping_url(template: str, job_uuid: str, event: str) -> str:
    """The URL to ping for ``event`` (start, success, failure) of the job."""
    return template.replace("{job}", job_uuid).rstrip("/") + PING_SUFFIXES[event]


def ping(template: str, job_uuid: str, event: str, message: str = "") -> str | None:
    """POST ``message`` to the job's ping URL for ``event``; returns None when it
    answered 2xx, else one line saying why not (the URL's password masked).
    Bounded by :data:`PING_TIMEOUT_SECONDS`; never raises."""
    url = ping_url(template, job_uuid, event)
    request = urllib.request.Request(
        url,
        data=message.encode("utf-8", "replace")[:_PING_BODY_LIMIT],
        headers={"User-Agent": "virt-dup", "Content-Type": "text/plain; charset=utf-8"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=PING_TIMEOUT_SECONDS) as response:
            response.read(1024)
        return None
    except urllib.error.HTTPError as error:
        return f"ping {masked_url(url)}: HTTP {error.code} {error.reason}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        return f"ping {masked_url(url)}: {_masked(str(reason), url)}"


class Pings:
    """The pings of one job's run: :meth:`start`, then :meth:`success` or
    :meth:`failure`.  Does nothing without ``alerts.ping_url``; a ping that
    fails is a journal warning, never a failure of the run."""

    def __init__(self, config: Config, job_uuid: str) -> None:
        self.template = config.alerts.ping_url
        self.job_uuid = job_uuid

    def start(self) -> None:
        self._ping("start")

    def success(self, message: str = "") -> None:
        self._ping("success", message)

    def failure(self, message: str) -> None:
        self._ping("failure", message)

    def _ping(self, event: str, message: str = "") -> None:
        if self.template is None:
            return
        problem = ping(self.template, self.job_uuid, event, message)
        if problem is not None:
            journal.record(
                f"could not ping for the {event} of job {self.job_uuid}: {problem}",
                priority=journal.PRIORITY_WARNING,
                JOB_UUID=self.job_uuid,
            )


def hostname() -> str:
    """The host's name, as alerts name it."""
    return os.uname().nodename
