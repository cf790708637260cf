"""The job options: one table that serves the domain XML, virt-dup.yml and the CLI.

A job option can be set on a ``<virt-dup:job>`` element (an XML attribute),
as a default in virt-dup.yml (``defaults:``) and with ``virt-dup add-job
--OPTION``.  Each :class:`Option` says how to read its value from any of
those (strings from XML and argv, native types from YAML), how to write it
back to XML, and documents itself (the man page and ``--help`` use the same
text).

Disks are not in this table: they are a selector with its own XML shape
(``path``/``dev_name`` attributes, ``<virt-dup:dev>``/``<virt-dup:path>``
children) and live in :mod:`virt_dup.libvirt.metadata`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from virt_dup.config.cron import parse_cron
from virt_dup.errors import ConfigError

#: duplicity's interval units (``dup_time.intstringtoseconds``): M is 30 days, Y 365.
_INTERVAL_UNITS = {"s": 1, "m": 60, "h": 3600, "D": 86400, "W": 7 * 86400}
_INTERVAL_UNITS |= {"M": 30 * 86400, "Y": 365 * 86400}
#: GPG key ids and fingerprints (8, 16 or 40 hex digits, optional 0x).
_KEY_ID = re.compile(r"^(?:0x)?(?:[0-9A-Fa-f]{8}|[0-9A-Fa-f]{16}|[0-9A-Fa-f]{40})$")
#: A backend is a name from virt-dup.yml or a duplicity URL.
BACKEND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BACKEND_URL = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")
#: Longest one-line text an option takes: it may reach a unit file, whose
#: lines systemd limits, and listings.
MAX_TEXT = 4096
#: Integers beyond 64 bits mean nothing to any option (and int() refuses long digit strings).
_MAX_INTEGER = 2**63 - 1

QUIESCE_POLICIES = ("auto", "required", "off")
ENCRYPTION_MODES = ("gpg", "none")


def is_backend_url(text: str) -> bool:
    """Whether ``text`` is a duplicity URL (``scheme://...``, no blanks): it then
    cannot be read as an option by the program it is given to."""
    return bool(_BACKEND_URL.match(text)) and not any(ord(c) == 127 for c in text)


def split_password(url: str) -> tuple[str, str | None]:
    """``(url without its password, password or None)``; the password as the
    backend gets it (percent-decoding undone: duplicity takes ``FTP_PASSWORD``
    as it is, while it would have decoded one in the URL)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    return _with_password(url, None), unquote(parts.password)


def masked_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (and nothing else)."""
    return url if urlsplit(url).password is None else _with_password(url, "***")


def _with_password(url: str, password: str | None) -> str:
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    credentials = f"{user}:{password}" if password is not None else user
    netloc = f"{credentials}@{host}" if credentials else host
    return urlunsplit(parts._replace(netloc=netloc))


def _fail(where: str, expected: str, value: object) -> ConfigError:
    return ConfigError(f"{where}: expected {expected}, got {value!r}")


def parse_integer(value: object, where: str) -> int:
    """An integer, from YAML (int) or text ("-1")."""
    if isinstance(value, bool):
        raise _fail(where, "an integer", value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,19}", value.strip()):
        value = int(value)
    if isinstance(value, int) and abs(value) <= _MAX_INTEGER:
        return value
    raise _fail(where, "an integer (at most 19 digits)", _shortened(value))


def _shortened(value: object) -> object:
    """A value as an error message quotes it: a huge one cut short."""
    text = value if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_INTEGER:
        text = f"{str(value)[:20]}... ({len(str(value))} digits)"
    if text is not None and len(text) > 80:
        return f"{text[:40]}... ({len(text)} characters)"
    return value


def parse_count(value: object, where: str) -> int:
    """A whole number >= 1 (retention counts)."""
    number = parse_integer(value, where)
    if number < 1:
        raise _fail(where, "a whole number of at least 1", value)
    return number


def parse_boolean(value: object, where: str) -> bool:
    """true/false, yes/no, 1/0 (XML attributes are text)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise _fail(where, "true or false", value)


def parse_text(value: object, where: str) -> str:
    """Any one-line text (no control characters: it may reach a unit file)."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise _fail(where, "text", value)
    text = str(value)
    if any(ord(character) < 32 or ord(character) == 127 for character in text):
        raise _fail(where, "one line of text without control characters", _shortened(text))
    if len(text) > MAX_TEXT:
        raise _fail(where, f"at most {MAX_TEXT} characters", _shortened(text))
    return text


def parse_schedule(value: object, where: str) -> str:
    """A cron string cron accepts and that fires at least once."""
    if isinstance(value, str):
        value = value.replace("\t", " ")  # cron separates fields with tabs too
    text = parse_text(value, where).strip()
    try:
        text = parse_cron(text).expression
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    return text


def interval_length(text: str) -> timedelta:
    """How long a duplicity interval (``30D``, ``1W``, ``1Y2M``: one or more
    NUMBER+UNIT pairs, units s m h D W M Y) is, as duplicity counts it.

    The one interval grammar: options are checked with it and retention and
    ``full_every`` are measured with it.  Raises ValueError.
    """
    pairs = re.findall(r"(\d{1,12})([smhDWMY])", text)
    if not pairs or "".join(number + unit for number, unit in pairs) != text:
        raise ValueError(f"{text[:40]!r} is not an interval such as 30D, 2W, 6M or 1Y")
    try:
        return timedelta(seconds=sum(int(number) * _INTERVAL_UNITS[unit] for number, unit in pairs))
    except OverflowError:  # timedelta stops at 999999999 days
        raise ValueError(f"{text[:40]!r} is longer than any interval can be") from None


def parse_interval(value: object, where: str) -> str:
    """A duplicity interval such as ``30D``, ``1W``, ``6M`` or ``1Y2M``."""
    text = parse_text(value, where).strip()
    try:
        interval_length(text)
    except ValueError:
        raise _fail(
            where, "an interval such as 30D, 2W, 6M or 1Y (units s m h D W M Y)", _shortened(value)
        ) from None
    return text


#: ``changed_blocks``: read changed blocks where they can be trusted, or never.
CHANGED_BLOCKS_MODES = ("auto", "off")


def parse_choice(choices: tuple[str, ...]) -> Callable[[object, str], str]:
    def parse(value: object, where: str) -> str:
        if value is False and "off" in choices:
            return "off"  # YAML 1.1 reads an unquoted ``off`` as false
        text = "" if isinstance(value, bool) else parse_text(value, where).strip().lower()
        if text not in choices:
            raise _fail(where, "one of " + ", ".join(choices), value)
        return text

    return parse


def _split_list(value: object, where: str) -> list[str]:
    if isinstance(value, list | tuple):
        items = [parse_text(item, where).strip() for item in value]
    else:
        items = [item.strip() for item in parse_text(value, where).split(",")]
    if not items or any(not item for item in items):
        raise _fail(where, "a non-empty comma-separated list", value)
    return items


def parse_backends(value: object, where: str) -> tuple[str, ...]:
    """Backend names from virt-dup.yml or duplicity URLs, comma-separated."""
    items = _split_list(value, where)
    for item in items:
        if not (BACKEND_NAME.match(item) or is_backend_url(item)):
            raise _fail(where, "backend names or duplicity URLs (scheme://...)", item)
    return tuple(items)


def parse_key_ids(value: object, where: str) -> tuple[str, ...]:
    """GPG key ids or fingerprints (8, 16 or 40 hex digits)."""
    items = _split_list(value, where)
    for item in items:
        if not _KEY_ID.match(item):
            raise _fail(where, "GPG key ids or fingerprints (8, 16 or 40 hex digits)", item)
    return tuple(item.removeprefix("0x").upper() for item in items)


def format_value(value: object) -> str:
    """How a typed option value is written into an XML attribute."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)


@dataclass(frozen=True)
class Option:
    """One job option: its name everywhere, its parser, its documentation."""

    name: str
    parse: Callable[[object, str], Any]
    metavar: str
    description: str
    example: str
    #: Spellings older virt-dup versions wrote; read with a notice, never written.
    legacy_names: tuple[str, ...] = ()
    #: The add-job flag, when it is not --NAME-with-dashes (lists take one value a flag).
    flag: str | None = None

    @property
    def command_line_flag(self) -> str:
        return "--" + (self.flag or self.name.replace("_", "-"))

    @property
    def repeatable(self) -> bool:
        return self.parse in (parse_backends, parse_key_ids)


OPTIONS: tuple[Option, ...] = (
    Option(
        "schedule",
        parse_schedule,
        "CRON",
        "When the job runs: a cron string with cron's exact semantics (five fields or "
        "@daily, @weekly, @reboot...). Runs are incremental unless a full is due.",
        "0 2 * * *",
        legacy_names=("incremental_schedule",),
    ),
    Option(
        "full_schedule",
        parse_schedule,
        "CRON",
        "A second schedule whose runs are always full backups.",
        "0 3 * * 0",
    ),
    Option(
        "verify_schedule",
        parse_schedule,
        "CRON",
        "When the latest backup is verified (restored to scratch and checked).",
        "0 5 1 * *",
    ),
    Option(
        "depth",
        parse_integer,
        "N",
        "Which files of each disk's backing chain are backed up: 0 = the whole chain; "
        "N > 0 = the N topmost files; -N = all but the N bottom-most files.",
        "0",
    ),
    Option(
        "backends",
        parse_backends,
        "NAME|URL",
        "Where backups go: names of backends from virt-dup.yml or duplicity URLs.",
        "local",
        flag="backend",
    ),
    Option(
        "encryption",
        parse_choice(ENCRYPTION_MODES),
        "gpg|none",
        "gpg encrypts every backup with the configured key(s); none must be said explicitly.",
        "gpg",
    ),
    Option(
        "encryption_keys",
        parse_key_ids,
        "KEYID",
        "GPG key ids or fingerprints the backups are encrypted to.",
        "0123456789ABCDEF0123456789ABCDEF01234567",
        flag="encryption-key",
    ),
    Option(
        "full_every",
        parse_interval,
        "INTERVAL",
        "Make a full backup when the last full is older than this (duplicity interval).",
        "30D",
    ),
    Option(
        "full_retention",
        parse_count,
        "N",
        "How many full backup chains to keep (older chains are removed).",
        "2",
    ),
    Option(
        "incremental_retention",
        parse_count,
        "N",
        "Of the kept chains, how many of the newest keep their incrementals.",
        "1",
    ),
    Option(
        "max_age",
        parse_interval,
        "INTERVAL",
        "Remove chains whose newest backup is older than this (never the latest chain).",
        "6M",
    ),
    Option(
        "changed_blocks",
        parse_choice(CHANGED_BLOCKS_MODES),
        "auto|off",
        "auto: an incremental of a running domain reads only the clusters written since "
        "the last backup (libvirt checkpoints), and the whole files whenever that cannot be "
        "trusted; off: always the whole files.",
        "auto",
    ),
    Option(
        "disable_if_powered_off",
        parse_boolean,
        "BOOL",
        "Skip the run (exit 0, a journal record) when the domain is shut off.",
        "false",
    ),
    Option(
        "quiesce",
        parse_choice(QUIESCE_POLICIES),
        "auto|required|off",
        "Freeze guest filesystems through the QEMU guest agent: auto = when it answers, "
        "required = fail without it, off = never (crash-consistent).",
        "auto",
    ),
    Option(
        "stall_timeout",
        parse_interval,
        "INTERVAL",
        "Stop a backup whose duplicity shows no progress for this long (a backend that "
        "stopped answering): the overlays are merged back and the run fails.",
        "30m",
    ),
    Option(
        "backend_retries",
        parse_count,
        "N",
        "How many times duplicity tries each backend operation (a connection, an upload, "
        "a listing) before the run fails (duplicity's --num-retries).",
        "5",
    ),
    Option(
        "backend_retry_delay",
        parse_interval,
        "INTERVAL",
        "How long duplicity waits between two tries of a backend operation "
        "(duplicity's --backend-retry-delay).",
        "30s",
    ),
    Option(
        "backend_timeout",
        parse_interval,
        "INTERVAL",
        "How long one network read or write to the backend may wait for an answer "
        "(duplicity's --timeout; at least 1s).",
        "30s",
    ),
    Option(
        "freshness_warn",
        parse_interval,
        "INTERVAL",
        "virt-dup status marks the job warn when its last successful backup is older "
        "than this (default: 1.5 times the longest interval between two scheduled runs).",
        "36h",
    ),
    Option(
        "freshness_crit",
        parse_interval,
        "INTERVAL",
        "virt-dup status marks the job crit when its last successful backup is older "
        "than this (default: 3 times the longest interval between two scheduled runs).",
        "3D",
    ),
    Option(
        "description",
        parse_text,
        "TEXT",
        "Free text shown in listings and in the timer's description.",
        "nightly backup of the mail server",
    ),
)

OPTIONS_BY_NAME: Mapping[str, Option] = {option.name: option for option in OPTIONS}
LEGACY_NAMES: Mapping[str, str] = {
    legacy: option.name for option in OPTIONS for legacy in option.legacy_names
}


@dataclass(frozen=True)
class JobOptions:
    """Option values; ``None`` means "not set here, inherit"."""

    schedule: str | None = None
    full_schedule: str | None = None
    verify_schedule: str | None = None
    depth: int | None = None
    backends: tuple[str, ...] | None = None
    encryption: str | None = None
    encryption_keys: tuple[str, ...] | None = None
    full_every: str | None = None
    full_retention: int | None = None
    incremental_retention: int | None = None
    max_age: str | None = None
    changed_blocks: str | None = None
    disable_if_powered_off: bool | None = None
    quiesce: str | None = None
    stall_timeout: str | None = None
    backend_retries: int | None = None
    backend_retry_delay: str | None = None
    backend_timeout: str | None = None
    freshness_warn: str | None = None
    freshness_crit: str | None = None
    description: str | None = None

    def shown_values(self) -> dict[str, Any]:
        """:meth:`set_values` as they may be shown (listings, the manifest): a
        password in a backend URL is ``***``."""
        values = self.set_values()
        if self.backends is not None:
            values["backends"] = tuple(masked_url(backend) for backend in self.backends)
        return values

    def set_values(self) -> dict[str, Any]:
        """The options that are set, by name, in table order."""
        return {
            option.name: getattr(self, option.name)
            for option in OPTIONS
            if getattr(self, option.name) is not None
        }

    def over(self, defaults: JobOptions) -> JobOptions:
        """These options, with every unset one taken from ``defaults``."""
        return dataclasses.replace(defaults, **self.set_values())


#: What a job gets when neither it nor virt-dup.yml says otherwise.
BUILTIN_DEFAULTS = JobOptions(
    changed_blocks="auto",
    depth=0,
    encryption="gpg",
    full_every="30D",
    full_retention=2,
    incremental_retention=1,
    disable_if_powered_off=False,
    quiesce="auto",
    stall_timeout="30m",
    # duplicity's own defaults, passed explicitly: a dead backend fails a run after
    # about 5 x (30 s + 30 s) per operation, well inside stall_timeout.
    backend_retries=5,
    backend_retry_delay="30s",
    backend_timeout="30s",
)

assert {f.name for f in dataclasses.fields(JobOptions)} == set(OPTIONS_BY_NAME)


@dataclass(frozen=True)
class ParsedOptions:
    """Result of reading options from one place: values plus deprecation notices."""

    options: JobOptions
    notices: tuple[str, ...] = field(default=())


def parse_options(values: Mapping[str, object], where: str) -> ParsedOptions:
    """Read job options from a mapping (YAML ``defaults:`` or XML attributes).

    ``where`` prefixes every message (e.g. ``/etc/virt-dup/virt-dup.yml: defaults``).
    Raises :class:`ConfigError` for an unknown name or a bad value.
    """
    found: dict[str, Any] = {}
    notices: list[str] = []
    for raw_name, value in values.items():
        name = raw_name
        if name in LEGACY_NAMES:
            canonical = LEGACY_NAMES[name]
            notices.append(f"{where}.{raw_name} is deprecated; it means {canonical}")
            if canonical in found or canonical in values:
                continue  # the canonical spelling wins
            name = canonical
        option = OPTIONS_BY_NAME.get(name)
        if option is None:
            raise ConfigError(
                f"{where}.{raw_name}: unknown option; expected one of "
                + ", ".join(sorted(OPTIONS_BY_NAME))
            )
        found[name] = option.parse(value, f"{where}.{raw_name}")
    return ParsedOptions(JobOptions(**found), tuple(notices))
