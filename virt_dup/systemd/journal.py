"""Structured records of what virt-dup did: to the journal, or one line on stderr.

:class:`Outcome` is what one action did (its summary line, journal record
and status-file entry); :func:`recorded` runs an action and records it.

:func:`record` sends one journal entry (``MESSAGE=`` plus upper-case fields
such as ``JOB_UUID=``, ``DOMAIN=``, ``RESULT=``) through systemd-python when
journald listens on its socket, so ``journalctl JOB_UUID=...`` finds it.
Where no journald runs (a container, a user manager without one) the same
record becomes one plain line on stderr, which the service manager keeps.

Every record names its kind in ``MESSAGE_ID=`` (one fixed id per kind, the
``MESSAGE_*`` constants, documented in virt-dup(8) JOURNAL) and carries
``SYSLOG_IDENTIFIER=virt-dup``, so ``journalctl -t virt-dup MESSAGE_ID=...``
finds every backup that failed, on any job.  A summary line that the record
already put in the journal is not printed again on the journal's stream
(:meth:`Outcome.in_journal_of`): a run under systemd logs it once.
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TextIO, TypeVar

from virt_dup.errors import VirtDupError

#: journald's native protocol socket; present whenever journald runs.
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")

# syslog priorities (PRIORITY=), as journalctl -p names them.
PRIORITY_ERR = 3
PRIORITY_WARNING = 4
PRIORITY_NOTICE = 5
PRIORITY_INFO = 6

#: ``MESSAGE_ID=`` of each kind of record: fixed 128-bit ids (made once with
#: ``systemd-id128 new``), never changed, so filters and catalogs keep working.
MESSAGE_BACKUP_DONE = "fc1ce2470f30485e8b13a9fc121d76c6"
MESSAGE_BACKUP_FAILED = "ee7dc2593f17402f87f2fe6df6e7436f"
MESSAGE_RESTORE = "118650c5e67b4dc6b77bc4a8386fcc06"
MESSAGE_VERIFY = "ff168e0506644e19bddf932182c06a69"
MESSAGE_RECOVERY = "a9a4ae801f0d4da8a8787fa2f1761eb3"
#: Each id by the kind of record it marks (for the man page and tests).
MESSAGE_IDS = {
    "backup done": MESSAGE_BACKUP_DONE,
    "backup failed": MESSAGE_BACKUP_FAILED,
    "restore": MESSAGE_RESTORE,
    "verify": MESSAGE_VERIFY,
    "recovery": MESSAGE_RECOVERY,
}
_MESSAGE_ID = re.compile(r"[0-9a-f]{32}")

OutcomeT = TypeVar("OutcomeT", bound="Outcome")

#: What journald accepts as a field name we set (``journal_field_valid``: at most 64
#: characters, no leading digit, no leading "_": those are trusted fields).
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def record(
    message: str,
    *,
    priority: int = PRIORITY_INFO,
    socket: Path = JOURNAL_SOCKET,
    stream: TextIO | None = None,
    **fields: object,
) -> bool:
    """Log ``message`` with structured ``fields`` (``JOB_UUID="..."``, ``RESULT="ok"``,
    ``MESSAGE_ID=`` one of the ``MESSAGE_*`` ids).

    Field values are sent as text; ``None`` values are left out.  Goes to the
    journal when ``socket`` exists, else one line on ``stream`` (stderr):
    ``virt-dup: MESSAGE [FIELD=value ...]``.  Returns True when the record
    went to the journal, False when to the stream.  Never raises for a
    journal that went away: the record then falls back to the stream.
    Raises ValueError for a field name the journal would reject or a
    ``MESSAGE_ID`` that is no 128-bit id (programming errors).
    """
    values = {name: str(value) for name, value in fields.items() if value is not None}
    for name in values:
        if not _FIELD_NAME.fullmatch(name) or name in (
            "MESSAGE",
            "PRIORITY",
            "SYSLOG_IDENTIFIER",
        ):
            raise ValueError(f"not a journal field name for record(): {name!r}")
    if "MESSAGE_ID" in values and not _MESSAGE_ID.fullmatch(values["MESSAGE_ID"]):
        raise ValueError(f"not a 128-bit MESSAGE_ID for record(): {values['MESSAGE_ID']!r}")
    if socket.exists():
        try:
            from systemd import journal

            journal.send(
                message,
                PRIORITY=str(priority),
                SYSLOG_IDENTIFIER="virt-dup",
                **values,
            )
            return True
        except OSError:
            pass  # journald went away between the check and the send: say it on stderr
    details = " ".join(f"{name}={value}" for name, value in values.items())
    line = f"virt-dup: {message}" + (f" [{details}]" if details else "")
    print(_one_line(line), file=stream if stream is not None else sys.stderr)
    return False


def is_journal_stream(stream: TextIO, environment: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal stream systemd connected to this
    service: ``$JOURNAL_STREAM`` (``DEVICE:INODE``) names its file.

    A child that merely inherited the variable, or whose output was
    redirected, does not match: its stream is another file.
    """
    value = (os.environ if environment is None else environment).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, io.UnsupportedOperation):
        return False


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass
class Outcome:
    """What one action (a backup, a restore, a verification) did for one job.

    The one shape behind the line a user reads (:meth:`summary`), the journal
    record (:meth:`record`: ``JOB_UUID=``, ``DOMAIN=``, ``ACTION=``,
    ``RESULT=``, ``DURATION_SEC=`` and the action's own fields) and the job's
    status file (:meth:`as_status`).  Each action subclasses it with its own
    fields, :data:`ACTION`, :meth:`success_line` and :meth:`details`.

    ``result``: ``success``, ``failed``, ``skipped`` or ``dry-run`` (a dry
    run changes nothing and leaves no record); empty while it runs.
    """

    ACTION: ClassVar[str] = "action"
    #: ``MESSAGE_ID=`` of its record (each action sets its own), and of its
    #: record when it failed, where that is a kind of its own.
    MESSAGE_ID: ClassVar[str | None] = None
    FAILED_MESSAGE_ID: ClassVar[str | None] = None

    job_uuid: str
    domain: str = "?"
    result: str = ""
    message: str = ""
    duration_seconds: float = 0.0
    finished: str = ""
    #: systemd's $INVOCATION_ID when a unit runs us: ties the result to the journal.
    invocation_id: str | None = field(default_factory=lambda: os.environ.get("INVOCATION_ID"))
    _started: float = field(default_factory=time.monotonic, repr=False, compare=False)
    #: Whether its record went to the journal (None: not recorded yet).
    _journaled: bool | None = field(default=None, repr=False, compare=False)

    @property
    def succeeded(self) -> bool:
        return self.result == "success"

    def summary(self) -> str:
        """One line for the terminal and the journal's ``MESSAGE=``."""
        return self.success_line() if self.succeeded else self.failure_line()

    def success_line(self) -> str:
        return f"{self.ACTION} of job {self.job_uuid} (domain {self.domain}) done"

    def failure_line(self) -> str:
        return f"job {self.job_uuid} of domain {self.domain}: {self.result}: {self.message}"

    def details(self) -> dict[str, object]:
        """The action's own journal fields (``None`` values are left out)."""
        return {}

    def finish(self, result: str, message: str | None = None) -> None:
        """Set the result (and its message), the duration and the end time."""
        self.result = result
        if message is not None:
            self.message = message
        self.duration_seconds = round(time.monotonic() - self._started, 3)
        self.finished = datetime.now(UTC).isoformat()

    def message_id(self) -> str | None:
        """The ``MESSAGE_ID=`` of this outcome's record."""
        if self.result == "failed" and self.FAILED_MESSAGE_ID:
            return self.FAILED_MESSAGE_ID
        return self.MESSAGE_ID

    def record(self) -> None:
        """The journal record of this outcome."""
        fields: dict[str, object] = {
            "MESSAGE_ID": self.message_id(),
            "JOB_UUID": self.job_uuid,
            "DOMAIN": self.domain,
            "ACTION": self.ACTION,
            "RESULT": self.result,
            **self.details(),
            "DURATION_SEC": self.duration_seconds,
        }
        self._journaled = record(
            self.summary(),
            priority=PRIORITY_ERR if self.result == "failed" else PRIORITY_INFO,
            **fields,  # type: ignore[arg-type]
        )

    def in_journal_of(self, stream: TextIO, stderr: TextIO | None = None) -> bool:
        """True when printing the summary on ``stream`` would put it in the
        journal a second time: ``stream`` is the service's journal stream and
        the record is there already (sent to journald, or on a ``stderr``
        that is the journal stream too)."""
        if self._journaled is None or not is_journal_stream(stream):
            return False
        return self._journaled or is_journal_stream(stderr if stderr is not None else sys.stderr)

    def as_json(self) -> dict[str, Any]:
        """The outcome as ``--json`` prints it: the status fields, the action and
        the summary line."""
        return {"action": self.ACTION, **self.as_status(), "summary": self.summary()}

    def as_status(self) -> dict[str, Any]:
        """The outcome as a job's status file keeps it."""
        return {name: value for name, value in asdict(self).items() if not name.startswith("_")}


@contextmanager
def recorded(outcome: OutcomeT, *also: Callable[[OutcomeT], object]) -> Iterator[OutcomeT]:
    """Carry out the block as ``outcome``'s action, and record how it ended.

    A :class:`~virt_dup.errors.VirtDupError` makes the outcome ``failed``
    with the error's line (and is raised again), any other exception too (as
    an internal error); a block that ends normally
    is a ``success`` unless it set another result (``skipped``, ``dry-run``).
    Then the outcome gets its duration and end time and, unless it is a dry
    run, its journal record and each of ``also`` (the status file...): a
    failing ``also`` never stops the journal record.
    """
    try:
        yield outcome
    except VirtDupError as error:
        outcome.finish("failed", str(error))
        raise
    except BaseException as error:  # a bug, or Ctrl-C outside an interruptible section
        outcome.finish("failed", f"internal error: {type(error).__name__}: {error}")
        raise
    else:
        outcome.finish(outcome.result or "success")
    finally:
        if outcome.result != "dry-run":
            try:
                for action in also:
                    action(outcome)
            finally:
                outcome.record()
