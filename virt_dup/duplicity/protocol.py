"""What duplicity reports: the ``--log-fd`` records and the backup statistics.

Every run gets ``--log-fd N`` on a pipe.  On that
descriptor duplicity 3.2 writes records meant for front-ends (déjà-dup uses
them; ``duplicity/log.py`` promises the codes "should never change")::

    LEVEL CODE [EXTRA...]        control line: ERROR/WARNING/NOTICE/INFO + code
    EXTRA LINE                   more control text (collection status only)
    . message line               the human text, each line prefixed ". "
    (empty line)                 end of record

Records used here (code numbers from ``log.InfoCode``/``log.ErrorCode``):

* ``INFO 2 BYTES`` + ``. Processed volume N``: progress of a backup; BYTES is
  the source bytes read so far (needs ``--verbosity info``).  The total is
  not known to duplicity unless ``--progress`` is given, which reads all
  the data twice (a dry run first); virt-dup knows the image sizes instead.
* ``INFO 3`` + lines ``chain-complete`` / ``chain-no-sig N`` followed by
  `` full|inc TIME VOLUMES enc|noenc`` per backup set, then
  ``orphaned-sets-num N`` and ``incomplete-sets-num N``: the collection
  status (``collection-status``).
* ``INFO 10 TIME 'ESCAPED PATH' TYPE``: one file of ``list-current-files``.
* ``ERROR CODE CLASS`` + the message: why duplicity failed (the exit code is
  the same CODE).

The backup statistics have no record of their own: they are a NOTICE whose
message is the ``--------------[ Backup Statistics ]--------------`` block
(also printed on standard output), parsed by :func:`parse_backup_statistics`.
TIME is duplicity's ``YYYYMMDDTHHMMSSZ`` (UTC).
"""

from __future__ import annotations

import codecs
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from virt_dup.duplicity.times import parse_time
from virt_dup.errors import CommandError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogRecord:
    """One record duplicity wrote to ``--log-fd``.

    ``level``: ERROR, WARNING, NOTICE or INFO.  ``code``: the number after it.
    ``control``: the rest of the control line, then any further control lines.
    ``message``: the human text (without the ``. `` prefixes).
    """

    level: str
    code: int
    control: tuple[str, ...]
    message: str


class LogParser:
    """Turns the lines of the log descriptor into :class:`LogRecord`, as they come."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def feed(self, line: str) -> LogRecord | None:
        """Take one line (without newline); return a record when one is complete."""
        if line:
            self._lines.append(line)
            return None
        return self.flush()

    def flush(self) -> LogRecord | None:
        """The record in progress, if any (at the end of the stream)."""
        lines, self._lines = self._lines, []
        if not lines:
            return None
        head = lines[0].rstrip().split(" ", 2)
        if len(head) < 2 or not head[1].isdigit():
            logger.debug("duplicity log: unexpected record %r", lines[0])
            return None
        control = ([head[2]] if len(head) > 2 else []) + [
            line for line in lines[1:] if not line.startswith(".")
        ]
        message = "\n".join(line[2:] for line in lines[1:] if line.startswith("."))
        return LogRecord(head[0], int(head[1]), tuple(control), message)


def parse_log(text: str) -> list[LogRecord]:
    """All records of a whole log (see :class:`LogParser`)."""
    parser = LogParser()
    records = [record for line in text.split("\n") if (record := parser.feed(line))]
    if (last := parser.flush()) is not None:
        records.append(last)
    return records


@dataclass(frozen=True)
class BackupProgress:
    """A backup's progress: ``bytes_read`` so far of the files being backed
    up, after ``volume`` was written; ``total_bytes``: their size, when the
    caller added it (duplicity does not say)."""

    bytes_read: int
    volume: int | None
    total_bytes: int | None = None

    def __str__(self) -> str:
        where = f" (volume {self.volume} written)" if self.volume is not None else ""
        return f"read {self.bytes_read / 2**20:.1f} MiB{where}"


@dataclass(frozen=True)
class BackupStats:
    """duplicity's "Backup Statistics" of one run.

    ``bytes_read``: size of the selected files (SourceFileSize; duplicity
    reads every file whose mtime or size changed).  ``new_bytes``/
    ``changed_bytes``: of new and changed files.  ``delta_entries``: files in
    the backup set.  ``raw_delta_bytes``: the data (deltas or whole files)
    before compression/encryption.  ``bytes_uploaded``: the volumes written
    to the backend (TotalDestinationSizeChange: without the signature and
    manifest files; the signature holds 12 bytes per block of every
    changed file).  ``kind``: ``full`` or ``incremental`` (what virt-dup
    asked for, which duplicity does); ``time``: the new backup set's time
    (its id for ``--time``)."""

    kind: str
    time: datetime | None
    source_files: int
    bytes_read: int
    new_bytes: int
    changed_bytes: int
    delta_entries: int
    raw_delta_bytes: int
    bytes_uploaded: int
    elapsed_seconds: float
    errors: int


_STATISTICS_HEADER = "--------------[ Backup Statistics ]--------------"
_STATISTICS_FIELDS = {
    "SourceFiles": "source_files",
    "SourceFileSize": "bytes_read",
    "NewFileSize": "new_bytes",
    "ChangedFileSize": "changed_bytes",
    "DeltaEntries": "delta_entries",
    "RawDeltaSize": "raw_delta_bytes",
    "TotalDestinationSizeChange": "bytes_uploaded",
    "ElapsedTime": "elapsed_seconds",
    "Errors": "errors",
}
_VOLUME_NAME = re.compile(
    r"duplicity-(?P<kind>full|inc)\.(?P<start>\d{8}T\d{6}Z)(?:\.to\.(?P<end>\d{8}T\d{6}Z))?\.vol"
)


def parse_backup_statistics(text: str) -> dict[str, Any]:
    """The fields of the first "Backup Statistics" block in ``text`` (stdout or a
    log message), as :class:`BackupStats` field names.  Raises CommandError
    when there is no such block."""
    start = text.find(_STATISTICS_HEADER)
    if start < 0:
        raise CommandError("duplicity printed no backup statistics")
    values: dict[str, Any] = {}
    for line in text[start + len(_STATISTICS_HEADER) :].splitlines():
        words = line.split()
        if words and set(words[0]) == {"-"}:
            break
        if len(words) >= 2 and words[0] in _STATISTICS_FIELDS:
            name = _STATISTICS_FIELDS[words[0]]
            values[name] = float(words[1]) if name == "elapsed_seconds" else int(words[1])
    missing = set(_STATISTICS_FIELDS.values()) - set(values)
    if missing:
        raise CommandError(f"duplicity backup statistics lack {', '.join(sorted(missing))}")
    return values


def backup_set_time(records: Iterable[LogRecord]) -> datetime | None:
    """The time (id) of the backup set a backup wrote, from the volume names in its log."""
    for record in records:
        match = _VOLUME_NAME.search(record.message)
        if match:
            return parse_time(match.group("end") or match.group("start"))
    return None


@dataclass(frozen=True)
class ListedFile:
    """A file in a backup: ``path`` relative to ``/``, its mtime, duplicity's
    type (``reg``, ``dir``, ``sym``...)."""

    path: str
    mtime: datetime
    type: str


_FILE_LIST = re.compile(r"^(?P<time>\S+) '(?P<path>.*)' (?P<type>\S+)$")


def parse_listed_file(control: Sequence[str]) -> ListedFile:
    """A :class:`ListedFile` from an ``INFO 10`` record's control text."""
    match = _FILE_LIST.match(" ".join(control))
    if not match:
        raise CommandError(f"duplicity file list: unexpected record {' '.join(control)!r}")
    # duplicity wrote the path with Python's "unicode-escape" (ASCII only).
    path = codecs.decode(match.group("path"), "unicode-escape")
    return ListedFile(path=path, mtime=parse_time(match.group("time")), type=match.group("type"))
