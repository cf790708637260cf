"""Structured records of what virt-dup did: to the journal, or one line on stderr.

:func:`record` sends one journal entry (``MESSAGE=`` plus upper-case fields
such as ``JOB_UUID=``, ``DOMAIN=``, ``RESULT=``) through systemd-python when
journald listens on its socket, so ``journalctl JOB_UUID=...`` finds it.
Where no journald runs (a container, a user manager without one) the same
record becomes one plain line on stderr, which the service manager keeps.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TextIO

#: journald's native protocol socket; present whenever journald runs.
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")

# syslog priorities (PRIORITY=), as journalctl -p names them.
PRIORITY_ERR = 3
PRIORITY_WARNING = 4
PRIORITY_NOTICE = 5
PRIORITY_INFO = 6

#: What systemd's journal accepts as a field name we set (no leading "_": trusted fields).
_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]*")


def record(
    message: str,
    *,
    priority: int = PRIORITY_INFO,
    socket: Path = JOURNAL_SOCKET,
    stream: TextIO | None = None,
    **fields: object,
) -> None:
    """Log ``message`` with structured ``fields`` (``JOB_UUID="..."``, ``RESULT="ok"``).

    Field values are sent as text; ``None`` values are left out.  Goes to the
    journal when ``socket`` exists, else one line on ``stream`` (stderr):
    ``virt-dup: MESSAGE [FIELD=value ...]``.  Never raises for a journal that
    went away: the record then falls back to the stream.  Raises ValueError
    for a field name the journal would reject (a programming error).
    """
    values = {name: str(value) for name, value in fields.items() if value is not None}
    for name in values:
        if not _FIELD_NAME.fullmatch(name) or name in ("MESSAGE", "PRIORITY"):
            raise ValueError(f"not a journal field name for record(): {name!r}")
    if socket.exists():
        try:
            from systemd import journal

            journal.send(
                message,
                PRIORITY=str(priority),
                SYSLOG_IDENTIFIER="virt-dup",
                **values,
            )
            return
        except OSError:
            pass  # journald went away between the check and the send: say it on stderr
    details = " ".join(f"{name}={value}" for name, value in values.items())
    line = f"virt-dup: {message}" + (f" [{details}]" if details else "")
    print(_one_line(line), file=stream if stream is not None else sys.stderr)


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
