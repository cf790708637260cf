"""What the verbs print: tables, sizes, progress lines and questions.

Only :mod:`virt_dup.cli.main` writes to the terminal; it does it through
these functions.  The actions return data and never print.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from virt_dup.actions.backups import JobListing
from virt_dup.actions.status import JobStatus
from virt_dup.backup.freshness import format_age
from virt_dup.backup.manifest import ManifestDisk
from virt_dup.cli.arguments import PROGRAM
from virt_dup.duplicity.protocol import BackupProgress
from virt_dup.errors import UsageError
from virt_dup.files import human_size
from virt_dup.systemd.journal import JOURNAL_SOCKET, Outcome, is_journal_stream

log = logging.getLogger("virt_dup")

#: The version of every ``--json`` document's schema; a change that is not
#: only an added field raises it.
JSON_VERSION = 1


def json_schema(verb: str) -> str:
    """``virt-dup/<verb>/<version>``: the ``schema`` member of a ``--json`` document."""
    return f"{PROGRAM}/{verb}/{JSON_VERSION}"


def print_json(verb: str, document: Mapping[str, Any], out: TextIO | None = None) -> None:
    """One JSON object on stdout: ``{"schema": "virt-dup/<verb>/1", ...document}``."""
    out = out if out is not None else sys.stdout
    json.dump({"schema": json_schema(verb), **document}, out, indent=2)
    out.write("\n")


def print_summary(outcome: Outcome, out: TextIO | None = None) -> None:
    """The outcome's summary line, unless its journal record already put it
    in the journal that ``out`` (stdout) writes to: under systemd a run
    logs its summary once."""
    stream = out if out is not None else sys.stdout
    if not outcome.in_journal_of(stream):
        print(outcome.summary(), file=stream)


def print_lines(lines: Sequence[str], out: TextIO | None = None) -> None:
    """Lines whose journal records (:func:`virt_dup.systemd.journal.record`)
    already say the same, unless ``out`` is the journal they went to."""
    stream = out if out is not None else sys.stdout
    if is_journal_stream(stream) and (JOURNAL_SOCKET.exists() or is_journal_stream(sys.stderr)):
        return
    for line in lines:
        print(line, file=stream)


def format_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as lines of left-aligned columns two spaces apart (the last column
    is not padded)."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


def format_size(size: int | None) -> str:
    """``8.50GB`` (:func:`~virt_dup.files.human_size`); ``-`` when unknown."""
    return "-" if size is None else human_size(size)


def _last_run(last_run: dict[str, Any] | None) -> str:
    if not last_run:
        return "never"
    when = str(last_run.get("finished", ""))[:16].replace("T", " ")
    return f"{last_run.get('result', '?')} {when}".strip()


def print_jobs(records: list[dict[str, Any]], as_json: bool, out: TextIO | None = None) -> None:
    out = out if out is not None else sys.stdout
    if as_json:
        print_json("list-jobs", {"jobs": records}, out)
        return
    if not records:
        out.write("no jobs\n")
        return
    header = ("DOMAIN", "JOB", "DISKS", "SCHEDULE", "DEPTH", "BACKEND", "LAST RUN")
    rows = [header]
    for record in records:
        options = record["options"]
        disks = record["disks"]["devs"] + record["disks"]["paths"]
        schedule = options.get("schedule") or "(none: no timer)"
        if options.get("full_schedule"):
            schedule += f" full: {options['full_schedule']}"
        rows.append(
            (
                record["domain"],
                record["job"],
                ",".join(disks) or "all",
                schedule,
                str(options.get("depth", 0)),
                ",".join(options.get("backends") or []) or "(none)",
                _last_run(record.get("last_run")),
            )
        )
    for line in format_table(rows):
        out.write(f"{line}\n")


def _when(value: datetime | str | None) -> str:
    """A time as a table shows it: local, to the minute; ``-`` when none."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return "?"
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M")


def print_status(rows: Sequence[JobStatus], backend: bool, out: TextIO | None = None) -> None:
    """``virt-dup status``: one row per job."""
    out = out if out is not None else sys.stdout
    if not rows:
        out.write("no jobs\n")
        return
    header = ["DOMAIN", "JOB", "DISKS", "SCHEDULE", "NEXT RUN", "LAST RUN", "LAST SUCCESS"]
    header += ["LAST FULL", "ENCRYPTION", *(("BACKUPS", "SIZE") if backend else ()), "FRESHNESS"]
    table = [tuple(header)]
    for row in rows:
        schedules = [
            s for s in (row.schedule, row.full_schedule and f"full {row.full_schedule}") if s
        ]
        last = row.last_run or {}
        success = "never"
        if row.last_success_time is not None and row.age is not None:
            success = f"{_when(row.last_success_time)} ({format_age(row.age)} ago)"
        cells = [
            row.domain,
            row.job,
            ",".join(row.disks) or "all",
            f"{'; '.join(schedules)} ({row.phrase})" if schedules else "- (by hand)",
            _when(row.next_run),
            f"{last.get('result', '?')} {_when(last.get('finished'))}" if last else "never",
            success,
            _when((row.last_full or {}).get("finished")),
            "gpg" if row.encrypted else "none",
        ]
        if backend:
            summary = row.backend
            cells += (
                ["?", "?"] if summary is None else [str(summary.backups), format_size(summary.size)]
            )
        mark = row.freshness.mark
        cells.append(f"{mark}: {row.freshness.reason}" if row.freshness.reason else mark)
        table.append(tuple(cells))
    for line in format_table(table):
        out.write(f"{line}\n")
    for row in rows:
        if len(row.destinations) < 2:
            continue
        out.write(f"\njob {row.job} destinations:\n")
        for destination in row.destinations:
            success = (
                "never"
                if destination.last_success is None
                else (
                    f"{_when(destination.last_success)} "
                    f"({format_age(row.now - destination.last_success)} ago)"
                )
            )
            mark = destination.freshness.mark
            if destination.freshness.reason:
                mark += f": {destination.freshness.reason}"
            out.write(
                f"  {destination.backend}: last {destination.last_result or '?'}, "
                f"last success {success}, {mark}\n"
            )


def _disk_summary(disk: ManifestDisk) -> str:
    count = len(disk.selected)
    return f"{disk.target} ({count} file{'' if count == 1 else 's'})"


def print_backups(listings: Sequence[JobListing], as_json: bool, out: TextIO | None = None) -> None:
    out = out if out is not None else sys.stdout
    if as_json:
        print_json("backups", {"jobs": [listing.as_json() for listing in listings]}, out)
        return
    for number, listing in enumerate(listings):
        if number:
            out.write("\n")
        manifest = listing.metadata.manifest if listing.metadata else None
        domain = f"domain {manifest.domain_name}" if manifest else "domain unknown"
        out.write(f"job {listing.source.job_uuid} of {domain} on {listing.source.display_url}\n")
        backups = listing.backups or []
        if not backups:
            out.write("  no backups\n")
            continue
        rows = [("BACKUP ID", "TYPE", "CHAIN", "VOLUMES", "SIZE", "DISKS")]
        for entry in backups:
            disks = (
                "?"
                if entry.disks is None
                else ", ".join(_disk_summary(disk) for disk in entry.disks)
            )
            rows.append(
                (
                    entry.id,
                    entry.kind,
                    entry.chain,
                    str(entry.volumes),
                    format_size(entry.size),
                    disks,
                )
            )
        for line in format_table(rows):
            out.write(f"  {line}\n")


def showing_progress() -> bool:
    """Progress is for a person: stderr is a terminal and -q was not given."""
    return sys.stderr.isatty() and log.isEnabledFor(logging.INFO)


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


class ProgressBar:
    """A byte count's progress on stderr (tqdm: total, percent, rate, ETA), for
    a terminal only; :meth:`close` ends it (its line stays) before the summary.

    ``total``: the bytes expected (None: unknown, tqdm then shows no percent).
    """

    def __init__(self, description: str, total: int | None) -> None:
        from tqdm import tqdm  # only on a terminal: importing it costs ~0.1 s

        # A terminal that says it is 0x0 (a bare pty, some serial consoles):
        # tqdm would draw nothing at all there; 80x24 then.
        sized = _terminal_columns() > 0
        self._bar = tqdm(
            total=total,
            desc=f"{PROGRAM}: {description}",
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            file=sys.stderr,
            leave=True,
            dynamic_ncols=sized,
            ncols=None if sized else 80,
            nrows=None if sized else 24,
            disable=not showing_progress(),
        )

    def to(self, done: int) -> None:
        """``done`` bytes so far (never goes back)."""
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)

    def write(self, line: str) -> None:
        """A line above the bar (the bar stays whole)."""
        self._bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


def backup_progress() -> tuple[Callable[[BackupProgress], None] | None, Callable[[], None]]:
    """(the progress callback of one backup, what ends its bar); no callback when
    no one watches."""
    if not showing_progress():
        return None, lambda: None
    bar: list[ProgressBar] = []

    def on_progress(progress: BackupProgress) -> None:
        if not bar:
            bar.append(ProgressBar("backup", progress.total_bytes))
        bar[0].to(progress.bytes_read)

    def close() -> None:
        for each in bar:
            each.close()

    return on_progress, close


def restore_progress() -> tuple[
    Callable[[int, int | None], None] | None, Callable[[str], None], Callable[[], None]
]:
    """(the progress callback of one restore, its progress lines, what ends its
    bar): a bar of the bytes restored on a terminal, the lines above it."""
    report = progress_reporter()
    if not showing_progress():
        return None, report, lambda: None
    bar: list[ProgressBar] = []

    def on_progress(done: int, total: int | None) -> None:
        if not bar:
            bar.append(ProgressBar("restore", total))
        bar[0].to(done)

    def say(line: str) -> None:
        if bar:
            bar[0].write(f"{PROGRAM}: {line}")
        else:
            report(line)

    def close() -> None:
        for each in bar:
            each.close()

    return on_progress, say, close


def progress_reporter() -> Callable[[str], None]:
    """Progress lines on a terminal (stderr) unless -q; debug log lines otherwise."""
    if showing_progress():
        return lambda line: print(f"{PROGRAM}: {line}", file=sys.stderr, flush=True)
    return lambda line: log.debug("%s", line)


def confirmation(assume_yes: bool) -> Callable[[str], bool]:
    """Ask a yes/no question on the terminal (``--yes``: always yes); without a
    terminal to ask, refuse with a :class:`UsageError`."""

    def confirm(question: str) -> bool:
        if assume_yes:
            return True
        if not sys.stdin.isatty():
            raise UsageError(f"{question} refusing without --yes (no terminal to ask)")
        answer = input(f"{question} [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    return confirm
