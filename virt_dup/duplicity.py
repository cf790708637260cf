"""The duplicity adapter: command lines (pure), runners, and what duplicity reports.

One duplicity *collection* per job: ``Target`` says where it lives (backend
URL), where its local cache is and how it is encrypted.  The
``*_arguments`` functions build duplicity's argv as tuples and are tested by
equality; the runners (:func:`backup`, :func:`collection_status`,
:func:`restore`, :func:`list_files`, the retention runners) run them through
:func:`virt_dup.execute.run`.

**Source directory.**  duplicity refuses an incremental whose source directory
differs from the chain's (exit 42, "source mismatch"), and the files a job
backs up (chain files, the metadata folder) live in different directories
and change between runs.  So the source is always ``/`` and the files are
selected with ``--include PATH ... --exclude '**'``: the source is the same
on every run and restores see the absolute paths (``var/lib/...``).

**Machine-readable output.**  Every run gets ``--log-fd N`` on a pipe.  On that
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
TIME is duplicity's ``YYYYMMDDTHHMMSSZ`` (UTC); ``--time`` accepts it as is.

Secrets (the GPG passphrase, a password in the backend URL) go to duplicity
in ``PASSPHRASE``/``SIGN_PASSPHRASE``/``FTP_PASSWORD`` only, never in argv,
and are masked in every log line and error.
"""

from __future__ import annotations

import codecs
import fcntl
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from virt_dup.errors import CommandError, ConfigError, VirtDupError
from virt_dup.execute import CommandFailed, Completed, how_it_ended, meaningful_lines, run
from virt_dup.options import ENCRYPTION_MODES, JobOptions

logger = logging.getLogger(__name__)

SUPPORTED_MAJOR = 3
TIME_FORMAT = "%Y%m%dT%H%M%SZ"

# Defaults chosen from bench/RESULTS.md, section "duplicity settings" (1 GiB
# qcow2 of random data, then 1 % of it rewritten in scattered 4 KiB writes).
#
# Compression off: gzip (unencrypted) or gpg's zlib (encrypted) made a full
# backup 4.5-6x slower (39 s against 6-8.5 s; cp: 1.3 s) and saved nothing on
# incompressible guest data.  duplicity 3's --no-compression also turns gpg's
# compression off.  A setting, for images that do compress.
DEFAULT_COMPRESSION = False
# --max-blocksize 4096: duplicity's own block size is sqrt(file size) (32 KiB
# for 1 GiB, 320 KiB for 100 GiB), so a scattered 4 KiB guest write costs a
# whole block: the incremental uploaded 8.7x the change, against 1.0x (data)
# + 0.29 % of the image (signature, 12 bytes per block, uploaded with every
# incremental and kept in the local cache per backup set) at 4096.
DEFAULT_MAX_BLOCKSIZE = 4096
# duplicity's own default volume size (MiB): temp space is about twice this.
DEFAULT_VOLSIZE_MB = 200


class DuplicityExit(IntEnum):
    """duplicity's exit codes that virt-dup tells apart (``duplicity/log.py`` ErrorCode)."""

    GENERIC = 1
    COMMAND_LINE = 2
    HOSTNAME_MISMATCH = 3
    NO_MANIFESTS = 4
    MISMATCHED_MANIFESTS = 5
    UNREADABLE_MANIFESTS = 6
    BAD_URL = 8
    BAD_ARCHIVE_DIR = 9
    RESTORE_PATH_EXISTS = 11
    BACKUP_DIR_DOESNT_EXIST = 13
    INC_WITHOUT_SIGS = 17
    NO_SIGS = 18
    RESTORE_PATH_NOT_FOUND = 19
    NO_RESTORE_FILES = 20
    MISMATCHED_HASH = 21
    USER_ERROR = 23
    EXCEPTION = 30
    GPG_FAILED = 31
    NOT_ENOUGH_FREESPACE = 35
    CONNECTION_FAILED = 38
    SOURCE_PATH_MISMATCH = 42
    ENCRYPTION_MISMATCH = 45
    BACKEND_ERROR = 50
    BACKEND_PERMISSION_DENIED = 51
    BACKEND_NOT_FOUND = 52
    BACKEND_NO_SPACE = 53
    BACKEND_COMMAND_ERROR = 54
    BACKEND_CODE_ERROR = 55
    BACKEND_VALIDATION_FAILED = 56
    BAD_SIGN_KEY = 80
    BAD_ENCRYPT_KEY = 81


EXIT_MEANINGS: Mapping[int, str] = {
    code.value: code.name.lower().replace("_", " ") for code in DuplicityExit
}
_BACKEND_CODES = frozenset(
    {DuplicityExit.CONNECTION_FAILED, *range(DuplicityExit.BACKEND_ERROR, 70)}
)
_GPG_CODES = frozenset(
    {DuplicityExit.GPG_FAILED, DuplicityExit.BAD_SIGN_KEY, DuplicityExit.BAD_ENCRYPT_KEY, 82}
)


# --- what a job's collection is ---------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One job's duplicity collection and how to read and write it.

    ``url``: duplicity backend URL; a password in it (``sftp://u:PW@host/p``)
    is taken out of argv and given as ``FTP_PASSWORD``.  ``archive_dir``:
    duplicity's local cache for this job (``<cache>/<job-uuid>``; duplicity
    keeps its files in ``archive_dir/name``).  ``name``: ``--name``, the job
    uuid.  ``encryption``: ``gpg`` or ``none``.  With ``gpg``,
    ``encrypt_keys`` are the recipients (``--encrypt-key``); with none,
    duplicity encrypts symmetrically with ``passphrase``.  ``sign_key``:
    ``--sign-key``.  ``gnupg_home``: ``GNUPGHOME``.  ``passphrase``: of the
    secret key (restores, signing) or the symmetric passphrase; only ever in
    the environment.  ``compression``: gzip / gpg compression (see
    :data:`DEFAULT_COMPRESSION`).  ``max_blocksize``: librsync block size cap
    in bytes (:data:`DEFAULT_MAX_BLOCKSIZE`; ``None``: duplicity's sqrt(size)).
    ``volsize``: volume size in MiB.  ``num_retries``: backend retries
    (``None``: duplicity's 5, 30 s apart).  ``tempdir``: where volumes are
    staged (``None``: ``$TMPDIR``).
    """

    url: str
    archive_dir: Path
    name: str
    encryption: str = "gpg"
    encrypt_keys: tuple[str, ...] = ()
    sign_key: str | None = None
    gnupg_home: Path | None = None
    passphrase: str | None = field(default=None, repr=False)
    compression: bool = DEFAULT_COMPRESSION
    max_blocksize: int | None = DEFAULT_MAX_BLOCKSIZE
    volsize: int = DEFAULT_VOLSIZE_MB
    num_retries: int | None = None
    tempdir: Path | None = None

    def __post_init__(self) -> None:
        if self.encryption not in ENCRYPTION_MODES:
            raise ConfigError(
                f"encryption: expected one of {', '.join(ENCRYPTION_MODES)}, "
                f"got {self.encryption!r}"
            )
        if self.encryption == "gpg" and not self.encrypt_keys and not self.passphrase:
            raise ConfigError(
                f"backups to {self.display_url} are encrypted (encryption: gpg) but no "
                "encryption key or passphrase is configured (encryption.keys or "
                "encryption.passphrase_file in virt-dup.yml, or the job's "
                "encryption_keys; or encryption: none)"
            )
        if self.max_blocksize is not None and (
            self.max_blocksize < 512 or self.max_blocksize % 512
        ):
            raise ConfigError(
                f"max_blocksize: expected a multiple of 512, got {self.max_blocksize}"
            )
        if self.volsize < 1:
            raise ConfigError(f"volsize: expected at least 1 (MiB), got {self.volsize}")

    @property
    def display_url(self) -> str:
        """The URL with any password replaced by ``***`` (for messages)."""
        url, password = split_password(self.url)
        return url if password is None else self.url.replace(password, "***")


def split_password(url: str) -> tuple[str, str | None]:
    """``(url without its password, password or None)``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host)), parts.password


#: duplicity's interval units (``dup_time.intstringtoseconds``): M is 30 days, Y 365.
_INTERVAL_UNITS = {"s": 1, "m": 60, "h": 3600, "D": 86400, "W": 7 * 86400}
_INTERVAL_UNITS |= {"M": 30 * 86400, "Y": 365 * 86400}


def parse_interval(text: str) -> timedelta:
    """A duplicity interval (``30D``, ``1W``, ``1Y2M``) as duplicity counts it."""
    pairs = re.findall(r"(\d+)([smhDWMY])", text)
    if not pairs or "".join(number + unit for number, unit in pairs) != text:
        raise ValueError(f"{text!r} is not an interval such as 30D, 2W, 6M or 1Y")
    return timedelta(seconds=sum(int(number) * _INTERVAL_UNITS[unit] for number, unit in pairs))


def format_time(moment: datetime) -> str:
    """duplicity's time string (``20240131T020000Z``, UTC) for ``--time``."""
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone")
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    """An aware UTC datetime from duplicity's ``20240131T020000Z``."""
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


# --- command lines (pure) ------------------------------------------------------------


def common_arguments(target: Target) -> tuple[str, ...]:
    """Options every duplicity action of ``target`` gets (cache, name, crypto)."""
    arguments: list[str] = ["--archive-dir", os.fspath(target.archive_dir), "--name", target.name]
    if target.encryption == "none":
        arguments.append("--no-encryption")
    else:
        for key in target.encrypt_keys:
            arguments += ["--encrypt-key", key]
        if target.sign_key:
            arguments += ["--sign-key", target.sign_key]
    if not target.compression:
        # duplicity 3 also passes --compress-algo=none to gpg for this.
        arguments.append("--no-compression")
    if target.num_retries is not None:
        arguments += ["--num-retries", str(target.num_retries)]
    if target.tempdir is not None:
        arguments += ["--tempdir", os.fspath(target.tempdir)]
    return tuple(arguments)


def _log_arguments(log_fd: int | None) -> tuple[str, ...]:
    return () if log_fd is None else ("--log-fd", str(log_fd))


def _url(target: Target) -> str:
    return split_password(target.url)[0]


def include_pattern(path: str) -> str:
    """A duplicity selection pattern that matches exactly ``path``.

    duplicity's patterns are globs with no quoting; a character class of
    one character is the only way to make ``* ? [`` literal.
    """
    return re.sub(r"([*?\[])", r"[\1]", path)


def backup_arguments(
    target: Target,
    full: bool,
    source_root: str,
    include_paths: Sequence[str],
    full_if_older_than: str | None = None,
    log_fd: int | None = None,
) -> tuple[str, ...]:
    """argv (after the program) of a backup of ``include_paths`` from ``source_root``.

    ``full``: force a full backup; else ``backup``: an incremental, or a full
    one when there is no chain yet or when the last full is older than
    ``full_if_older_than`` (a duplicity interval such as ``30D``).
    Every path must be absolute and inside ``source_root`` (virt-dup uses
    ``/``: see the module docstring).  Raises ValueError otherwise.
    """
    if not include_paths:
        raise ValueError("a backup needs at least one path to include")
    root = PurePosixPath(source_root)
    if not root.is_absolute():
        raise ValueError(f"source root {source_root!r} is not absolute")
    selection: list[str] = []
    for path in include_paths:
        pure = PurePosixPath(path)
        if not pure.is_absolute() or ".." in pure.parts or not pure.is_relative_to(root):
            raise ValueError(f"{path!r} is not an absolute path under {source_root}")
        selection += ["--include", include_pattern(os.fspath(pure))]
    # "backup", not "incremental": that one fails (exit 17) when no chain exists yet.
    arguments: list[str] = ["full" if full else "backup", *common_arguments(target)]
    if not full and full_if_older_than:
        arguments += ["--full-if-older-than", full_if_older_than]
    if target.max_blocksize is not None:
        arguments += ["--max-blocksize", str(target.max_blocksize)]
    arguments += ["--volsize", str(target.volsize)]
    # "info" for the progress records (INFO 2) on the log descriptor.
    arguments += ["--verbosity", "info", *_log_arguments(log_fd)]
    arguments += [*selection, "--exclude", "**", source_root, _url(target)]
    return tuple(arguments)


def collection_status_arguments(target: Target, log_fd: int | None = None) -> tuple[str, ...]:
    """argv of ``collection-status`` (read by :func:`parse_collection_status`)."""
    return ("collection-status", *common_arguments(target), *_log_arguments(log_fd), _url(target))


def restore_arguments(
    target: Target,
    time: str | datetime | None,
    path_to_restore: str | None,
    destination: str | os.PathLike[str],
    log_fd: int | None = None,
) -> tuple[str, ...]:
    """argv of a restore of the backup at ``time`` (``None``: the latest).

    ``path_to_restore``: one file or directory as it was backed up (absolute,
    or relative to ``/``); ``destination`` is then that file's or directory's
    new path.  ``None``: everything, under ``destination``.  duplicity never
    restores over existing files.
    """
    arguments = ["restore", *common_arguments(target), *_time_arguments(time)]
    if path_to_restore is not None:
        relative = path_to_restore.lstrip("/")
        if not relative:
            raise ValueError("path_to_restore '/' is the whole backup: pass None")
        arguments += ["--path-to-restore", relative]
    arguments += [*_log_arguments(log_fd), _url(target), os.fspath(destination)]
    return tuple(arguments)


def list_files_arguments(
    target: Target, time: str | datetime | None = None, log_fd: int | None = None
) -> tuple[str, ...]:
    """argv of ``list-current-files`` at ``time`` (``None``: the latest)."""
    return (
        "list-current-files",
        *common_arguments(target),
        *_time_arguments(time),
        *_log_arguments(log_fd),
        _url(target),
    )


def remove_all_but_n_full_arguments(
    target: Target, count: int, log_fd: int | None = None
) -> tuple[str, ...]:
    """argv that deletes every chain but the ``count`` newest (``full_retention``)."""
    _check_count(count)
    return (
        "remove-all-but-n-full",
        str(count),
        "--force",
        *common_arguments(target),
        *_log_arguments(log_fd),
        _url(target),
    )


def remove_all_inc_of_but_n_full_arguments(
    target: Target, count: int, log_fd: int | None = None
) -> tuple[str, ...]:
    """argv that deletes the incrementals of all chains but the ``count`` newest
    (``incremental_retention``)."""
    _check_count(count)
    return (
        "remove-all-inc-of-but-n-full",
        str(count),
        "--force",
        *common_arguments(target),
        *_log_arguments(log_fd),
        _url(target),
    )


def remove_older_than_arguments(
    target: Target, age: str, log_fd: int | None = None
) -> tuple[str, ...]:
    """argv that deletes chains older than ``age`` (``max_age``: an interval such
    as ``6M``, or a time); duplicity never deletes the chain the latest backup
    needs."""
    return (
        "remove-older-than",
        age,
        "--force",
        *common_arguments(target),
        *_log_arguments(log_fd),
        _url(target),
    )


def cleanup_arguments(target: Target, log_fd: int | None = None) -> tuple[str, ...]:
    """argv that deletes what a failed run left on the backend (``cleanup --force``)."""
    return ("cleanup", "--force", *common_arguments(target), *_log_arguments(log_fd), _url(target))


def environment(target: Target) -> dict[str, str]:
    """The variables duplicity needs for ``target``; the only place secrets go.

    ``PASSPHRASE`` is always set when encrypting (empty when there is none):
    otherwise duplicity would prompt for it, and virt-dup runs unattended.
    ``LC_ALL=C.UTF-8``: the messages parsed here are duplicity's English ones.
    """
    variables = {"LC_ALL": "C.UTF-8"}
    if target.gnupg_home is not None:
        variables["GNUPGHOME"] = os.fspath(target.gnupg_home)
    if target.encryption == "gpg":
        variables["PASSPHRASE"] = target.passphrase or ""
        if target.sign_key:
            variables["SIGN_PASSPHRASE"] = target.passphrase or ""
    password = split_password(target.url)[1]
    if password is not None:
        variables["FTP_PASSWORD"] = password
    return variables


def secrets(target: Target) -> tuple[str, ...]:
    """Values to mask wherever duplicity's command or output is shown."""
    values = (target.passphrase, split_password(target.url)[1])
    return tuple(value for value in values if value)


def _time_arguments(time: str | datetime | None) -> tuple[str, ...]:
    if time is None:
        return ()
    return ("--time", format_time(time) if isinstance(time, datetime) else time)


def _check_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"a retention count must be at least 1, got {count}")


# --- the executable ---------------------------------------------------------------


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


def version(executable: str | None = None) -> str:
    """The installed duplicity's version, e.g. ``3.2.1``; raises VirtDupError when
    it is missing or not 3.x."""
    program = executable or find_executable()
    completed = run([program, "--version"], environment={"LC_ALL": "C.UTF-8"}, timeout=120)
    return parse_version(completed.stdout)


# --- the log descriptor ------------------------------------------------------------


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


# --- what duplicity reports -------------------------------------------------------


@dataclass(frozen=True)
class BackupProgress:
    """A backup's progress: ``bytes_read`` so far (of the files being backed
    up; the caller knows their total), after ``volume`` was written."""

    bytes_read: int
    volume: int | None

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
    changed file).  ``kind``: ``full`` or ``incremental`` (what duplicity
    did, which may differ from what was asked); ``time``: the new backup
    set's time (its id for ``--time``)."""

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


def backup_kind_and_time(records: Iterable[LogRecord]) -> tuple[str, datetime | None]:
    """What a backup wrote (``full``/``incremental``) and the new set's time,
    from the volume names in its log."""
    for record in records:
        match = _VOLUME_NAME.search(record.message)
        if match:
            kind = "full" if match.group("kind") == "full" else "incremental"
            return kind, parse_time(match.group("end") or match.group("start"))
    return "unknown", None


@dataclass(frozen=True)
class BackupSet:
    """A full or incremental backup in a chain.

    ``time``: aware UTC datetime (an incremental's end time); ``id``: the same
    as duplicity writes it, usable with ``--time``.
    """

    kind: str  # "full" or "incremental"
    time: datetime
    volumes: int
    encrypted: bool

    @property
    def id(self) -> str:
        return format_time(self.time)


@dataclass(frozen=True)
class Chain:
    """A full backup and the incrementals that build on it, oldest first.

    ``complete``: duplicity found its signatures (the primary chain an
    incremental would extend); older chains are "secondary".
    """

    sets: tuple[BackupSet, ...]
    complete: bool

    @property
    def full(self) -> BackupSet:
        return self.sets[0]

    @property
    def incrementals(self) -> tuple[BackupSet, ...]:
        return self.sets[1:]

    @property
    def start_time(self) -> datetime:
        return self.sets[0].time

    @property
    def end_time(self) -> datetime:
        return self.sets[-1].time


@dataclass(frozen=True)
class Collection:
    """Every chain of a job's collection (oldest first) and the leftovers
    duplicity found (sets without a chain, unfinished sets)."""

    chains: tuple[Chain, ...]
    orphaned_sets: int = 0
    incomplete_sets: int = 0

    @property
    def backup_sets(self) -> tuple[BackupSet, ...]:
        return tuple(backup_set for chain in self.chains for backup_set in chain.sets)

    @property
    def last_full_time(self) -> datetime | None:
        return self.chains[-1].full.time if self.chains else None

    @property
    def last_backup_time(self) -> datetime | None:
        return self.chains[-1].end_time if self.chains else None

    def with_backup(self, kind: str, time: datetime) -> Collection:
        """This collection after a new ``full`` or ``incremental`` set made at ``time``."""
        new_set = BackupSet(kind=kind, time=time, volumes=0, encrypted=False)
        if kind == "full" or not self.chains:
            chains = (*self.chains, Chain((new_set,), complete=True))
        else:
            last = self.chains[-1]
            chains = (*self.chains[:-1], Chain((*last.sets, new_set), last.complete))
        return Collection(chains, self.orphaned_sets, self.incomplete_sets)


def parse_collection_status(control: Sequence[str]) -> Collection:
    """A :class:`Collection` from the control lines of the ``INFO 3`` record.

    Raises :class:`CommandError` on a line it does not understand (a
    duplicity version that changed the format must not be misread).
    """
    chains: list[tuple[bool, list[BackupSet]]] = []
    counts = {"orphaned-sets-num": 0, "incomplete-sets-num": 0}
    for line in control:
        words = line.split()
        if not words or words[0] in ("backend", "archive-dir"):
            continue
        if words[0] in ("chain-complete", "chain-no-sig"):
            chains.append((words[0] == "chain-complete", []))
        elif words[0] in ("full", "inc") and len(words) == 4 and chains:
            try:
                backup_set = BackupSet(
                    kind="full" if words[0] == "full" else "incremental",
                    time=parse_time(words[1]),
                    volumes=int(words[2]),
                    encrypted=words[3] == "enc",
                )
            except ValueError:
                raise CommandError(f"duplicity collection status: bad line {line!r}") from None
            chains[-1][1].append(backup_set)
        elif words[0] in counts and len(words) == 2 and words[1].isdigit():
            counts[words[0]] = int(words[1])
        else:
            raise CommandError(f"duplicity collection status: unexpected line {line!r}")
    parsed = []
    for complete, sets in chains:
        if not sets or sets[0].kind != "full":
            raise CommandError("duplicity collection status: a chain without a full backup")
        parsed.append(Chain(tuple(sets), complete))
    parsed.sort(key=lambda chain: chain.start_time)
    return Collection(
        tuple(parsed),
        orphaned_sets=counts["orphaned-sets-num"],
        incomplete_sets=counts["incomplete-sets-num"],
    )


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


# --- running duplicity ---------------------------------------------------------------


@dataclass
class _Run:
    completed: Completed
    records: list[LogRecord]


def _run_duplicity(
    target: Target,
    build: Callable[[int], Sequence[str]],
    what: str,
    *,
    executable: str | None = None,
    timeout: float | None = None,
    on_record: Callable[[LogRecord], None] | None = None,
    ok_codes: Sequence[int] = (0,),
) -> _Run:
    """Run ``duplicity *build(log_fd)`` with a pipe on ``log_fd``.

    ``what`` names the action in errors ("backup to", "restore from").
    Records reach ``on_record`` as duplicity writes them.  Raises
    :class:`CommandError` with one line saying what failed and why.
    """
    program = executable or find_executable()
    if target.tempdir is not None:
        target.tempdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    read_end, write_end = os.pipe()
    records: list[LogRecord] = []
    reader = threading.Thread(
        target=_read_records, args=(read_end, records, on_record), daemon=True
    )
    reader.start()
    try:
        try:
            completed = run(
                [program, *build(write_end)],
                environment=environment(target),
                secrets=secrets(target),
                timeout=timeout,
                output_handler=_log_output,
                pass_fds=(write_end,),
                ok_codes=ok_codes,
                exit_meanings=EXIT_MEANINGS,
            )
        finally:
            os.close(write_end)
            # gpg-agent, started by duplicity's gpg, may hold the pipe: do not wait for it.
            reader.join(10.0)
    except CommandFailed as failure:
        raise CommandError(_failure_message(target, what, failure, records)) from failure
    return _Run(completed, records)


def _read_records(
    read_end: int, records: list[LogRecord], on_record: Callable[[LogRecord], None] | None
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
    if code is None or code < 0:
        return f"duplicity {what} {where} {how_it_ended(code)}"
    reason = _reason(errors[-1]) if errors else _join(meaningful_lines(failure.stderr_tail))
    reason = reason or how_it_ended(code, EXIT_MEANINGS)
    if code in _BACKEND_CODES:
        return f"duplicity could not reach {where}: {reason}"
    if code in _GPG_CODES:
        return f"duplicity {what} {where}: encryption failed: {reason}"
    if code == DuplicityExit.RESTORE_PATH_EXISTS:
        return f"duplicity {what} {where}: {reason} (restore into a new path)"
    meaning = EXIT_MEANINGS.get(code, "")
    return f"duplicity {what} {where} failed ({meaning or f'exit code {code}'}): {reason}"


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


# --- the runners ------------------------------------------------------------------------


def backup(
    target: Target,
    include_paths: Sequence[str],
    *,
    full: bool = False,
    source_root: str = "/",
    full_if_older_than: str | None = None,
    progress: Callable[[BackupProgress], None] | None = None,
    executable: str | None = None,
    timeout: float | None = None,
) -> BackupStats:
    """Back up ``include_paths`` (see :func:`backup_arguments`); return its statistics.

    ``progress`` is called after each volume with the bytes read so far.
    Raises :class:`CommandError` (one line) when duplicity fails.
    """

    def on_record(record: LogRecord) -> None:
        if progress is not None and record.level == "INFO" and record.code == 2:
            volume = re.search(r"volume (\d+)", record.message)
            bytes_read = int(record.control[0].split()[0]) if record.control else 0
            progress(BackupProgress(bytes_read, int(volume.group(1)) if volume else None))

    result = _run_duplicity(
        target,
        lambda log_fd: backup_arguments(
            target, full, source_root, include_paths, full_if_older_than, log_fd
        ),
        "backup to",
        executable=executable,
        timeout=timeout,
        on_record=on_record,
    )
    values = parse_backup_statistics(result.completed.stdout)
    kind, time = backup_kind_and_time(result.records)
    return BackupStats(kind=kind, time=time, **values)


def collection_status(
    target: Target, *, executable: str | None = None, timeout: float | None = None
) -> Collection:
    """The chains of ``target``'s collection; an empty :class:`Collection` when
    there is no backup yet.  Raises :class:`CommandError`."""
    result = _run_duplicity(
        target,
        lambda log_fd: collection_status_arguments(target, log_fd),
        "status of",
        executable=executable,
        timeout=timeout,
    )
    for record in result.records:
        if record.level == "INFO" and record.code == 3:
            return parse_collection_status(record.control)
    raise CommandError(f"duplicity collection-status of {target.display_url} reported nothing")


def last_full_time(
    target: Target, *, executable: str | None = None, timeout: float | None = None
) -> datetime | None:
    """When the newest chain's full backup was made (``None``: no backup yet)."""
    return collection_status(target, executable=executable, timeout=timeout).last_full_time


def restore(
    target: Target,
    destination: str | os.PathLike[str],
    *,
    time: str | datetime | None = None,
    path_to_restore: str | None = None,
    executable: str | None = None,
    timeout: float | None = None,
) -> None:
    """Restore the backup at ``time`` (or the latest) to ``destination`` (see
    :func:`restore_arguments`).  Raises :class:`CommandError`."""
    _run_duplicity(
        target,
        lambda log_fd: restore_arguments(target, time, path_to_restore, destination, log_fd),
        "restore from",
        executable=executable,
        timeout=timeout,
    )


def list_files(
    target: Target,
    *,
    time: str | datetime | None = None,
    executable: str | None = None,
    timeout: float | None = None,
) -> tuple[ListedFile, ...]:
    """The files in the backup at ``time`` (or the latest)."""
    result = _run_duplicity(
        target,
        lambda log_fd: list_files_arguments(target, time, log_fd),
        "file list of",
        executable=executable,
        timeout=timeout,
    )
    return tuple(
        parse_listed_file(record.control)
        for record in result.records
        if record.level == "INFO" and record.code == 10
    )


def full_is_due(
    target: Target,
    full_every: str | None,
    *,
    now: datetime | None = None,
    executable: str | None = None,
    timeout: float | None = None,
) -> bool:
    """Whether the next backup of ``target`` is a full one: there is no chain
    yet, or its full backup is at least ``full_every`` (an interval) old.

    Asks the backend (``collection-status``).  :func:`backup` with
    ``full_if_older_than`` decides the same way inside duplicity.
    """
    collection = collection_status(target, executable=executable, timeout=timeout)
    return full_is_due_in(collection, full_every, now=now)


def retention_due(collection: Collection, options: JobOptions, now: datetime) -> tuple[str, ...]:
    """The retention options that would delete something from ``collection``
    (``max_age``, ``full_retention``, ``incremental_retention``, in that order).

    Pure; it mirrors duplicity's own rules, which never delete the newest
    chain: ``remove-older-than`` deletes the other chains whose newest set
    is older than the age, ``remove-all-but-n-full N`` every chain but the N
    newest, ``remove-all-inc-of-but-n-full N`` the incrementals of every
    chain but the N newest.  Each verdict is taken before any deletion,
    which can only make a later rule have less to do, never more.
    """
    due: list[str] = []
    older = collection.chains[:-1]
    if options.max_age and any(
        chain.end_time < now - parse_interval(options.max_age) for chain in older
    ):
        due.append("max_age")
    if options.full_retention and len(collection.chains) > options.full_retention:
        due.append("full_retention")
    keep_incrementals = options.incremental_retention
    if (
        keep_incrementals
        and (options.full_retention is None or keep_incrementals < options.full_retention)
        and any(chain.incrementals for chain in collection.chains[:-keep_incrementals])
    ):
        due.append("incremental_retention")
    return tuple(due)


def apply_retention(
    target: Target,
    options: JobOptions,
    *,
    collection: Collection | None = None,
    now: datetime | None = None,
    executable: str | None = None,
    timeout: float | None = None,
) -> tuple[str, ...]:
    """Delete what the job's retention options say is no longer kept; return
    the options that were applied.

    ``max_age`` (``remove-older-than``), then ``full_retention`` chains
    (``remove-all-but-n-full``), then the incrementals of all but the
    ``incremental_retention`` newest chains.  Unset options delete nothing.
    With ``collection`` (the collection as it is now), only the options that
    would delete something run (:func:`retention_due`): each is a duplicity
    run that lists the whole backend.
    """
    if collection is None:
        due: Sequence[str] = ("max_age", "full_retention", "incremental_retention")
    else:
        due = retention_due(collection, options, now or datetime.now(UTC))
    applied = []
    if options.max_age and "max_age" in due:
        remove_older_than(target, options.max_age, executable=executable, timeout=timeout)
        applied.append("max_age")
    if options.full_retention and "full_retention" in due:
        remove_all_but_n_full(
            target, options.full_retention, executable=executable, timeout=timeout
        )
        applied.append("full_retention")
    if (
        options.incremental_retention
        and (
            options.full_retention is None or options.incremental_retention < options.full_retention
        )
        and "incremental_retention" in due
    ):
        remove_all_inc_of_but_n_full(
            target, options.incremental_retention, executable=executable, timeout=timeout
        )
        applied.append("incremental_retention")
    return tuple(applied)


def remove_all_but_n_full(
    target: Target, count: int, *, executable: str | None = None, timeout: float | None = None
) -> None:
    """Keep the ``count`` newest chains, delete the others."""
    _run_duplicity(
        target,
        lambda log_fd: remove_all_but_n_full_arguments(target, count, log_fd),
        "retention (remove-all-but-n-full) on",
        executable=executable,
        timeout=timeout,
    )


def remove_all_inc_of_but_n_full(
    target: Target, count: int, *, executable: str | None = None, timeout: float | None = None
) -> None:
    """Delete the incrementals of all chains but the ``count`` newest."""
    _run_duplicity(
        target,
        lambda log_fd: remove_all_inc_of_but_n_full_arguments(target, count, log_fd),
        "retention (remove-all-inc-of-but-n-full) on",
        executable=executable,
        timeout=timeout,
    )


def remove_older_than(
    target: Target, age: str, *, executable: str | None = None, timeout: float | None = None
) -> None:
    """Delete chains older than ``age`` (never the one the latest backup needs)."""
    _run_duplicity(
        target,
        lambda log_fd: remove_older_than_arguments(target, age, log_fd),
        "retention (remove-older-than) on",
        executable=executable,
        timeout=timeout,
    )


def cleanup(target: Target, *, executable: str | None = None, timeout: float | None = None) -> None:
    """Delete the leftovers of failed runs on the backend."""
    _run_duplicity(
        target,
        lambda log_fd: cleanup_arguments(target, log_fd),
        "cleanup of",
        executable=executable,
        timeout=timeout,
    )


def partial_files(target: Target) -> tuple[Path, ...]:
    """The ``*.part`` files in ``target``'s cache: a backup of it was interrupted.

    Once the first volume of a set is uploaded, duplicity keeps the set's
    manifest and signatures as ``duplicity-*.part`` in its cache and renames
    them when the set is complete; a ``.part`` left over means it never was.
    (Killed before that, it leaves only a temporary directory in the cache
    and nothing on the backend.)
    """
    directory = target.archive_dir / target.name
    return tuple(sorted(directory.glob("duplicity-*.part")))


def discard_interrupted_backup(
    target: Target, *, executable: str | None = None, timeout: float | None = None
) -> Collection:
    """Delete what interrupted backups of ``target`` left, in the cache and on the
    backend; return the collection as it then is.

    Left alone, duplicity *resumes* a set whose ``.part`` manifest is in the
    cache, from the last volume uploaded: right only when the source files
    have not changed since, and virt-dup's have (recovery merged the guest's
    writes into the images the interrupted run was reading), so the resumed
    set would hold two points in time.  Without the ``.part`` files the
    volumes on the backend are an incomplete set, which ``cleanup --force``
    deletes (``collection-status`` would otherwise even count a partial full
    as a chain).  A set that was complete on the backend is downloaded into
    the cache again by duplicity and kept.  The temporary directories a
    killed duplicity left in the cache (with its signature file in progress:
    0.3 % of the data read) are deleted too.

    The caller makes sure no backup of ``target`` runs meanwhile (the
    domain's lock): a ``.part`` file is then always a leftover.
    """
    for path in partial_files(target):
        logger.warning("discarding %s, left by an interrupted backup", path)
        path.unlink(missing_ok=True)
    _remove_stale_temporary_directories(target.archive_dir / target.name)
    collection = collection_status(target, executable=executable, timeout=timeout)
    if collection.incomplete_sets or collection.orphaned_sets:
        logger.warning(
            "deleting %d incomplete and %d orphaned backup set(s) from %s",
            collection.incomplete_sets,
            collection.orphaned_sets,
            target.display_url,
        )
        cleanup(target, executable=executable, timeout=timeout)
        collection = collection_status(target, executable=executable, timeout=timeout)
    return collection


def _remove_stale_temporary_directories(cache: Path) -> None:
    """Delete ``duplicity-*-tempdir`` in a job's cache unless a duplicity uses it now.

    Every duplicity holds ``lockfile`` there (a POSIX lock, through fasteners)
    while it runs; holding it here means none does, so every temporary
    directory is a leftover.
    """
    if not cache.is_dir():
        return
    with open(cache / "lockfile", "a") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a restore or listing of this job runs: its files are in use
        try:
            for leftover in cache.glob("duplicity-*-tempdir"):
                logger.info("deleting %s, left by a duplicity that was killed", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        finally:
            fcntl.lockf(lock, fcntl.LOCK_UN)


def full_is_due_in(
    collection: Collection, full_every: str | None, *, now: datetime | None = None
) -> bool:
    """Whether the next backup of ``collection`` is a full one (see :func:`full_is_due`)."""
    last_full = collection.last_full_time
    if last_full is None:
        return True
    if full_every is None:
        return False
    return (now or datetime.now(UTC)) - last_full >= parse_interval(full_every)
