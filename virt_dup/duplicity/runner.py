"""Running duplicity: :class:`Duplicity`, the one way virt-dup starts it.

``Duplicity(program, timeout)`` finds the executable once (next to this
Python, else on ``PATH``) and runs every action of a :class:`Target` with a
pipe on ``--log-fd``: records arrive as duplicity writes them, failures
become one :class:`~virt_dup.errors.CommandError` line saying what failed,
where and why, with the secrets masked.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from virt_dup.config.options import JobOptions
from virt_dup.duplicity import arguments
from virt_dup.duplicity.collection import Collection, parse_collection_status, retention_due
from virt_dup.duplicity.exits import BACKEND_CODES, EXIT_MEANINGS, GPG_CODES, DuplicityExit
from virt_dup.duplicity.protocol import (
    BackupProgress,
    BackupStats,
    ListedFile,
    LogParser,
    LogRecord,
    backup_set_time,
    parse_backup_statistics,
    parse_listed_file,
)
from virt_dup.duplicity.target import Target, environment, local_directory_problem, secrets
from virt_dup.errors import CommandError, VirtDupError
from virt_dup.execute import (
    CommandFailed,
    Completed,
    Stall,
    how_it_ended,
    meaningful_lines,
    run,
)

logger = logging.getLogger(__name__)

SUPPORTED_MAJOR = 3


def find_executable() -> str:
    """duplicity next to this Python (the venv virt-dup runs in), else on PATH.

    Raises :class:`VirtDupError` naming what to install when there is none.
    """
    beside = Path(sys.executable).parent / "duplicity"
    if os.access(beside, os.X_OK):
        return os.fspath(beside)
    found = shutil.which("duplicity")
    if found:
        return found
    raise VirtDupError(
        f"duplicity is not installed (not in {beside.parent} nor on PATH): "
        f"install duplicity {SUPPORTED_MAJOR}.x into virt-dup's environment, "
        "e.g. pip install --no-deps duplicity==3.2.1 fasteners (see scripts/setup)"
    )


def parse_version(output: str) -> str:
    """The version from ``duplicity --version`` (``duplicity 3.2.1 September 28, 2024``).

    Raises :class:`VirtDupError` unless it is a supported (3.x) version.
    """
    match = re.search(r"\bduplicity\s+(\d+)\.(\d+)(?:\.(\d+))?\S*", output)
    if not match:
        first = output.strip().splitlines()[0] if output.strip() else "nothing"
        raise VirtDupError(f"cannot tell the duplicity version from {first!r}")
    version_text = match.group(0).split()[-1]
    if int(match.group(1)) != SUPPORTED_MAJOR:
        raise VirtDupError(f"duplicity {version_text} is not supported (need {SUPPORTED_MAJOR}.x)")
    return version_text


@dataclass
class _Run:
    completed: Completed
    records: list[LogRecord]


class Duplicity:
    """duplicity at ``program`` (``None``: :func:`find_executable`, on first use);
    every action it runs is killed after ``timeout`` seconds (``None``: never).
    """

    def __init__(self, program: str | None = None, timeout: float | None = None) -> None:
        self._program = program
        self.timeout = timeout

    @property
    def program(self) -> str:
        if self._program is None:
            self._program = find_executable()
        return self._program

    def version(self) -> str:
        """The version, e.g. ``3.2.1``; raises VirtDupError when it is not 3.x."""
        completed = run([self.program, "--version"], environment={"LC_ALL": "C.UTF-8"}, timeout=120)
        return parse_version(completed.stdout)

    # -- actions -------------------------------------------------------------------
    def backup(
        self,
        target: Target,
        include_paths: Sequence[str],
        *,
        full: bool,
        source_root: str = "/",
        progress: Callable[[BackupProgress], None] | None = None,
        stall_seconds: float | None = None,
    ) -> BackupStats:
        """A ``full`` backup, or an incremental one onto the newest chain, of
        ``include_paths`` (see :func:`~.arguments.backup_arguments`); returns its
        statistics.  ``progress`` is called after each volume with the bytes
        read so far.  ``stall_seconds``: how long duplicity may show no
        progress (a dead backend) before it is stopped.  Raises
        :class:`CommandError` (one line) when duplicity fails.
        """

        def on_record(record: LogRecord) -> None:
            if progress is not None and record.level == "INFO" and record.code == 2:
                volume = re.search(r"volume (\d+)", record.message)
                bytes_read = int(record.control[0].split()[0]) if record.control else 0
                progress(BackupProgress(bytes_read, int(volume.group(1)) if volume else None))

        result = self._run(
            target,
            lambda log_fd: arguments.backup_arguments(
                target, full, source_root, include_paths, log_fd
            ),
            "backup to",
            on_record=on_record,
            stall_seconds=stall_seconds,
        )
        values = parse_backup_statistics(result.completed.stdout)
        kind = "full" if full else "incremental"
        return BackupStats(kind=kind, time=backup_set_time(result.records), **values)

    def collection_status(self, target: Target) -> Collection:
        """The chains of ``target``'s collection; an empty :class:`Collection` when
        there is no backup yet.  Raises :class:`CommandError`."""
        result = self._run(
            target,
            lambda log_fd: arguments.collection_status_arguments(target, log_fd),
            "status of",
        )
        for record in result.records:
            if record.level == "INFO" and record.code == 3:
                return parse_collection_status(record.control)
        raise CommandError(f"duplicity collection-status of {target.display_url} reported nothing")

    def restore(
        self,
        target: Target,
        destination: str | os.PathLike[str],
        *,
        time: str | datetime | None = None,
        path_to_restore: str | None = None,
    ) -> None:
        """Restore the backup at ``time`` (or the latest) to ``destination`` (see
        :func:`~.arguments.restore_arguments`).  Raises :class:`CommandError`."""
        self._run(
            target,
            lambda log_fd: arguments.restore_arguments(
                target, time, path_to_restore, destination, log_fd
            ),
            "restore from",
        )

    def list_files(
        self, target: Target, *, time: str | datetime | None = None
    ) -> tuple[ListedFile, ...]:
        """The files in the backup at ``time`` (or the latest)."""
        result = self._run(
            target,
            lambda log_fd: arguments.list_files_arguments(target, time, log_fd),
            "file list of",
        )
        return tuple(
            parse_listed_file(record.control)
            for record in result.records
            if record.level == "INFO" and record.code == 10
        )

    def remove_all_but_n_full(self, target: Target, count: int) -> None:
        """Keep the ``count`` newest chains, delete the others."""
        self._run(
            target,
            lambda log_fd: arguments.remove_all_but_n_full_arguments(target, count, log_fd),
            "retention (remove-all-but-n-full) on",
        )

    def remove_all_inc_of_but_n_full(self, target: Target, count: int) -> None:
        """Delete the incrementals of all chains but the ``count`` newest."""
        self._run(
            target,
            lambda log_fd: arguments.remove_all_inc_of_but_n_full_arguments(target, count, log_fd),
            "retention (remove-all-inc-of-but-n-full) on",
        )

    def remove_older_than(self, target: Target, age: str) -> None:
        """Delete chains older than ``age`` (never the one the latest backup needs)."""
        self._run(
            target,
            lambda log_fd: arguments.remove_older_than_arguments(target, age, log_fd),
            "retention (remove-older-than) on",
        )

    def cleanup(self, target: Target) -> None:
        """Delete the leftovers of failed runs on the backend."""
        self._run(target, lambda log_fd: arguments.cleanup_arguments(target, log_fd), "cleanup of")

    def apply_retention(
        self,
        target: Target,
        options: JobOptions,
        *,
        collection: Collection | None = None,
        now: datetime | None = None,
    ) -> tuple[str, ...]:
        """Delete what the job's retention options say is no longer kept; return
        the options that were applied.

        ``max_age`` (``remove-older-than``), then ``full_retention`` chains
        (``remove-all-but-n-full``), then the incrementals of all but the
        ``incremental_retention`` newest chains.  Unset options delete nothing.
        With ``collection`` (the collection as it is now), only the options that
        would delete something run (:func:`~.collection.retention_due`): each is
        a duplicity run that lists the whole backend.
        """
        if collection is None:
            due = retention_due(None, options, now or datetime.now(UTC))
        else:
            due = retention_due(collection, options, now or datetime.now(UTC))
        if "max_age" in due and options.max_age:
            self.remove_older_than(target, options.max_age)
        if "full_retention" in due and options.full_retention:
            self.remove_all_but_n_full(target, options.full_retention)
        if "incremental_retention" in due and options.incremental_retention:
            self.remove_all_inc_of_but_n_full(target, options.incremental_retention)
        return due

    # -- running -------------------------------------------------------------------
    def _run(
        self,
        target: Target,
        build: Callable[[int], Sequence[str]],
        what: str,
        *,
        on_record: Callable[[LogRecord], None] | None = None,
        stall_seconds: float | None = None,
    ) -> _Run:
        """Run ``duplicity *build(log_fd)`` with a pipe on ``log_fd``.

        ``what`` names the action in errors ("backup to", "restore from").
        Records reach ``on_record`` as duplicity writes them.  With
        ``stall_seconds`` duplicity is killed when it writes nothing (no
        output, no record) for that long.  Raises :class:`CommandError` with
        one line saying what failed and why.
        """
        problem = local_directory_problem(target.url)
        if problem is not None:
            raise CommandError(f"cannot use the backend {target.display_url}: {problem}")
        if target.tempdir is not None:
            target.tempdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        read_end, write_end = os.pipe()
        records: list[LogRecord] = []
        alive = [time.monotonic()]
        stall = None if stall_seconds is None else Stall(stall_seconds, lambda: alive[0])
        reader = threading.Thread(
            target=_read_records, args=(read_end, records, on_record, alive), daemon=True
        )
        reader.start()
        try:
            try:
                completed = run(
                    [self.program, *build(write_end)],
                    environment=environment(target),
                    secrets=secrets(target),
                    timeout=self.timeout,
                    output_handler=_log_output,
                    pass_fds=(write_end,),
                    exit_meanings=EXIT_MEANINGS,
                    stall=stall,
                )
            finally:
                os.close(write_end)
                # gpg-agent, started by duplicity's gpg, may hold the pipe: do not wait for it.
                reader.join(10.0)
        except CommandFailed as failure:
            raise CommandError(_failure_message(target, what, failure, records)) from failure
        return _Run(completed, records)


def restore_path_missing(error: CommandError) -> bool:
    """Whether ``error`` (of :meth:`Duplicity.restore`) says the path is not in the backup."""
    cause = error.__cause__
    return (
        isinstance(cause, CommandFailed)
        and cause.returncode == DuplicityExit.RESTORE_PATH_NOT_FOUND
    )


def signature_refused(error: CommandError) -> bool:
    """Whether ``error`` says a volume read was not signed by the target's sign key."""
    cause = error.__cause__
    return isinstance(cause, CommandFailed) and cause.returncode == DuplicityExit.UNSIGNED_VOLUME


def signature_problem(message: str, sign_key: str | None) -> str:
    """duplicity's ``Volume was signed by key X, not Y`` in words.

    duplicity compares only as many trailing hex digits as both ids have, and
    says ``None`` for a volume with no good signature (unsigned, or signed by
    a key the keyring does not hold), so ``Y`` can be as short as 4 digits:
    name the whole configured key instead.
    """
    match = re.search(r"signed by key (\S+), not (\S+)", message)
    if not match:
        return message
    expected = sign_key or match.group(2)
    if match.group(1) == "None":
        return f"a volume carries no valid signature (expected one by {expected})"
    return f"a volume is signed by key {match.group(1)}, not by {expected}"


def _read_records(
    read_end: int,
    records: list[LogRecord],
    on_record: Callable[[LogRecord], None] | None,
    alive: list[float],
) -> None:
    parser = LogParser()

    def take(record: LogRecord | None) -> None:
        if record is None:
            return
        records.append(record)
        if on_record is not None:
            try:
                on_record(record)
            except Exception:  # a broken progress display must not stop the backup
                logger.exception("duplicity progress handler failed")

    with os.fdopen(read_end, encoding="utf-8", errors="replace") as stream:
        for line in stream:
            alive[0] = time.monotonic()
            take(parser.feed(line.rstrip("\n")))
    take(parser.flush())


def _log_output(line: str) -> None:
    if line.strip():
        logger.debug("duplicity: %s", line)


def _failure_message(
    target: Target, what: str, failure: CommandFailed, records: Sequence[LogRecord]
) -> str:
    """One line: what duplicity could not do, where, and why."""
    where = target.display_url
    errors = [record for record in records if record.level == "ERROR"]
    code = failure.returncode
    if code is None and failure.limit_reached:
        return f"duplicity {what} {where} {failure.limit_reached} and was stopped"
    if code is None or code < 0:
        return f"duplicity {what} {where} {how_it_ended(code)}"
    reason = _reason(errors[-1]) if errors else _join(meaningful_lines(failure.stderr_tail))
    reason = reason or how_it_ended(code, EXIT_MEANINGS)
    if code in BACKEND_CODES or _NO_SPACE in reason:
        return _backend_failure(what, where, code, reason)
    if code in GPG_CODES:
        return f"duplicity {what} {where}: encryption failed: {reason}"
    if code == DuplicityExit.UNSIGNED_VOLUME:
        reason = f"the signature did not verify: {signature_problem(reason, target.sign_key)}"
    elif code == DuplicityExit.RESTORE_PATH_EXISTS:
        reason = f"{reason} (restore into a new path)"
    if code in (DuplicityExit.UNSIGNED_VOLUME, DuplicityExit.RESTORE_PATH_EXISTS):
        return f"duplicity {what} {where}: {reason}"
    meaning = EXIT_MEANINGS.get(code, "")
    return f"duplicity {what} {where} failed ({meaning or f'exit code {code}'}): {reason}"


_NO_SPACE = "No space left on device"


def _backend_failure(what: str, where: str, code: int, reason: str) -> str:
    """A backend's failure in one line: full, or not reached (and why)."""
    if code == DuplicityExit.BACKEND_NO_SPACE or _NO_SPACE in reason:
        return f"duplicity {what} {where} failed: the backend is full (ENOSPC): {reason}"
    return f"duplicity could not reach {where}: {backend_reason(reason)}"


def backend_reason(reason: str, home: Path | None = None) -> str:
    """duplicity's reason a backend failed, where it says less than it means.

    The sftp backend (paramiko) asks on stdin whether to trust a host key
    that no known_hosts file holds; virt-dup's stdin is ``/dev/null``, so the
    answer is "EOF when reading a line".  A key that differs from the known
    one is named with both keys in base64: the fact is what matters.
    ``home``: whose ``~/.ssh`` (default: this process's ``HOME``).
    """
    known_hosts = (home or Path.home()) / ".ssh" / "known_hosts"
    if re.search(r"ssh connection to \S+ failed: EOF when reading a line", reason):
        where = reason.split(" failed:")[0]
        return (
            f"{where} failed: the server's host key is not in {known_hosts} nor "
            "/etc/ssh/ssh_known_hosts (add it after checking its fingerprint, e.g. "
            "ssh-keyscan -p PORT HOST)"
        )
    if re.search(r"ssh connection to \S+ failed: Error reading SSH protocol banner", reason):
        where = reason.split(" failed:")[0]
        return (
            f"{where} failed: the server took the connection but sent no SSH banner "
            "within 15 s (a hung or overloaded sshd, or not an SSH server)"
        )
    mismatch = re.search(r"Host key for server '?([^' ]+)'? does not match", reason)
    if mismatch:
        where = reason.split(" failed:")[0]
        return (
            f"{where} failed: the server's host key does not match the one "
            f"{known_hosts} (or /etc/ssh/ssh_known_hosts) holds for {mismatch.group(1)}: "
            "refused (a changed server or someone in between)"
        )
    return reason


def _reason(record: LogRecord) -> str:
    """The useful lines of an ERROR record's message."""
    lines = [
        line
        for line in record.message.splitlines()
        if not re.match(r"\s*=+ (Begin|End) GnuPG log =+", line)
    ]
    kept = meaningful_lines(lines, limit=3)
    if len(kept) > 1 and kept[0].endswith("see log below:"):
        kept = kept[1:]
    # "BackendException: ..." says nothing the message after it does not.
    return _join(re.sub(r"^(\w+(Exception|Error)): ", "", line) for line in kept)


def _join(lines: Iterable[str]) -> str:
    return "; ".join(line.rstrip(".").strip() for line in lines)
