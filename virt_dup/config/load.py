"""virt-dup.yml: loaded once, validated into a frozen :class:`Config`.

Every error names the file, the key path inside it and what was expected;
an unknown key is an error (a typo must not silently become a default).
Spellings of the original virt-dup (dash-case, flat) still load with the same
meaning and a one-line deprecation notice each.
"""

from __future__ import annotations

import difflib
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from virt_dup.config.options import (
    BACKEND_NAME,
    BUILTIN_DEFAULTS,
    MAX_TEXT,
    JobOptions,
    is_backend_url,
    masked_url,
    parse_count,
    parse_options,
    split_password,
)
from virt_dup.errors import ConfigError

DEFAULT_PATH = Path("/etc/virt-dup/virt-dup.yml")
#: Environment variable that overrides :data:`DEFAULT_PATH` (``--config`` wins over it).
PATH_ENVIRONMENT = "VIRT_DUP_CONFIG"

SCOPES = ("system", "user")

#: Backups reading at once on one host: two keep a disk (or a 2-core host's
#: gpg and duplicity) busy without thrashing; many timers on one schedule
#: otherwise all read at 02:00.
DEFAULT_MAX_PARALLEL_RUNS = 2

#: The key of examples/virt-dup.yml: no one has its secret half.  ``virt-dup
#: init`` replaces it; check-config and add-job refuse it.
PLACEHOLDER_KEY = "0123456789ABCDEF0123456789ABCDEF01234567"

#: A libvirt URI (``qemu:///system``, ``qemu+ssh://host/system``): never an option word.
_LIBVIRT_URI = re.compile(r"[a-z][a-z0-9+._-]*://[^\s\x00-\x1f\x7f]*")
#: libvirt's open flags are a C unsigned int.
_MAX_LIBVIRT_FLAGS = 2**32 - 1


@dataclass(frozen=True)
class LibvirtSettings:
    uri: str | None = None  # None: qemu:///system or qemu:///session, by scope
    username: str | None = None
    #: Root-only file holding the libvirt password (never the YAML).
    password_file: Path | None = None
    #: Legacy ``libvirt-password``: kept only in memory, never logged.
    password: str | None = field(default=None, repr=False)
    flags: int = 0
    #: Where libvirt keeps persistent domain XML (read by the generator).
    config_dir: Path | None = None


@dataclass(frozen=True)
class EncryptionSettings:
    keys: tuple[str, ...] = ()
    #: Keys used to sign backups (duplicity --sign-key); optional.
    sign_key: str | None = None
    gnupg_home: Path | None = None
    #: Root-only file with the passphrase of the secret key (for restores/signing).
    passphrase_file: Path | None = None


@dataclass(frozen=True)
class PolicySettings:
    """What a job in domain XML may choose.  Whoever may edit a domain's
    metadata (a libvirt ACL, not root on the host) writes jobs; the policy is
    root's.  The defaults allow what virt-dup always allowed."""

    #: False: a job may name only the backends of virt-dup.yml, no URL of its own.
    allow_job_backend_urls: bool = True
    #: True: ``encryption: none`` is refused.
    require_encryption: bool = False
    #: Not empty: the only keys a job may encrypt to.
    allowed_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class RestoreSettings:
    """How restores (and verifications) trust what they read from a backend."""

    #: True: every backup read must carry a valid signature by ``encryption.sign_key``;
    #: anyone who can write to a backend could otherwise replace a whole backup set
    #: with one encrypted to the same public key.
    require_signature: bool = False


#: What a backend's own entry may say besides its URL: the retention options
#: (each destination of a job keeps as many backups as its own entry says) and
#: where its password is (never the URL in this file).
BACKEND_RETENTION_OPTIONS = ("full_retention", "incremental_retention", "max_age")
_BACKEND_KEYS = ("url", *BACKEND_RETENTION_OPTIONS, "password_file", "password_credential")
#: A systemd credential's name (``LoadCredential=NAME:...``): no slash, no blanks.
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class BackendSettings:
    """What a named backend says besides its URL (``backends.NAME`` as a mapping)."""

    #: Retention of this destination; unset options are the job's.
    retention: JobOptions = JobOptions()
    #: Root-only file with the backend's password (duplicity's ``FTP_PASSWORD``).
    password_file: Path | None = None
    #: Or the name of a systemd credential holding it (``$CREDENTIALS_DIRECTORY/NAME``).
    password_credential: str | None = None

    def password(self, where: str) -> str | None:
        """The password from its file or credential (None: neither is set)."""
        if self.password_credential is not None:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise ConfigError(
                    f"{where}.password_credential: no systemd credentials here "
                    f"($CREDENTIALS_DIRECTORY is not set): run through a unit with "
                    f"LoadCredential={self.password_credential}:... or use password_file"
                )
            return read_secret(Path(directory) / self.password_credential, "credential")
        return read_secret(self.password_file, "password")


#: What may raise an alert (``alerts.events``; not ``on``, which YAML 1.1 reads
#: as true): a failed virt-dup unit, a job whose backups are not fresh
#: (``virt-dup status --check --alert``).
ALERT_EVENTS = ("failure", "stale")


@dataclass(frozen=True)
class AlertSettings:
    """Where alerts go (apprise URLs) and the healthchecks-style pings of runs."""

    #: apprise URLs (mailto://, json://, ntfy://...) as virt-dup.yml lists them.
    urls: tuple[str, ...] = ()
    #: A root-only file with more apprise URLs, one a line (URLs that hold passwords).
    urls_file: Path | None = None
    #: The events that send an alert (:data:`ALERT_EVENTS`).
    events: tuple[str, ...] = ALERT_EVENTS
    #: Pinged when a run starts (``/start``), succeeds (as is) and fails (``/fail``);
    #: ``{job}`` becomes the job's uuid.
    ping_url: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self.urls) or self.urls_file is not None


@dataclass(frozen=True)
class Config:
    """The whole of virt-dup.yml, validated."""

    path: Path
    scope: str = "system"
    libvirt: LibvirtSettings = LibvirtSettings()
    backends: Mapping[str, str] = field(default_factory=dict)
    #: Per named backend: its retention and password file (absent: the job's, none).
    backend_settings: Mapping[str, BackendSettings] = field(default_factory=dict)
    encryption: EncryptionSettings = EncryptionSettings()
    policy: PolicySettings = PolicySettings()
    restore: RestoreSettings = RestoreSettings()
    alerts: AlertSettings = AlertSettings()
    defaults: JobOptions = BUILTIN_DEFAULTS
    state_dir: Path | None = None
    cache_dir: Path | None = None
    #: Spread timer starts (systemd ``RandomizedDelaySec=``), e.g. "10min".
    randomized_delay: str | None = None
    #: How many backups of this host read their disks at once; more wait their turn.
    max_parallel_runs: int = DEFAULT_MAX_PARALLEL_RUNS
    #: Deprecation notices found while loading (printed once by the CLI).
    notices: tuple[str, ...] = ()
    #: Whom virt-dup runs as (injectable, like a clock): the directory defaults of
    #: a user other than root are that user's own, whatever the scope.
    euid: int = field(default_factory=os.geteuid, repr=False, compare=False)

    @property
    def per_user(self) -> bool:
        """True when state and cache default to the XDG directories of the user:
        scope ``user``, or a user other than root (who cannot write ``/var/lib``
        or ``/var/cache``, and whose ``qemu:///session`` domains are their own)."""
        return self.scope == "user" or self.euid != 0

    @property
    def session_uri(self) -> bool:
        """True when the libvirt URI is a local session daemon's (a user's own domains)."""
        return urllib.parse.urlsplit(self.libvirt_uri).path.rstrip("/") == "/session"

    @property
    def libvirt_uri(self) -> str:
        if self.libvirt.uri:
            return self.libvirt.uri
        return "qemu:///session" if self.scope == "user" else "qemu:///system"

    @property
    def libvirt_config_dir(self) -> Path:
        """Where libvirt keeps the persistent XML of the URI's domains (the generator reads it).

        Follows the libvirt URI, not the manager's scope: a user manager may
        well run the jobs of qemu:///system domains.
        """
        if self.libvirt.config_dir:
            return self.libvirt.config_dir
        if self.session_uri:
            config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
            return Path(config_home) / "libvirt" / "qemu"
        return Path("/etc/libvirt/qemu")

    @property
    def state_directory(self) -> Path:
        if self.state_dir:
            return self.state_dir
        if self.per_user:
            state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state")
            return Path(state_home) / "virt-dup"
        return Path(os.environ.get("STATE_DIRECTORY", "/var/lib/virt-dup"))

    @property
    def metrics_path(self) -> Path:
        """The metrics textfile (node_exporter's textfile collector reads
        ``metrics/`` in the state directory)."""
        return self.state_directory / "metrics" / "virt-dup.prom"

    @property
    def own_gnupg_home(self) -> Path:
        """virt-dup's own GnuPG home, where ``virt-dup init`` puts the key:
        ``gnupg`` in the state directory (writable by the sandboxed units)."""
        return self.state_directory / "gnupg"

    @property
    def gnupg_directory(self) -> Path:
        """The GnuPG home duplicity, gpg and the units' ReadWritePaths= use.

        ``encryption.gnupg_home``; else :attr:`own_gnupg_home` when it exists;
        else GnuPG's own (``$GNUPGHOME`` or ``~/.gnupg``), as before there was
        an own home: keys set up by hand there keep working.
        """
        if self.encryption.gnupg_home is not None:
            return self.encryption.gnupg_home
        if self.own_gnupg_home.is_dir():
            return self.own_gnupg_home
        return Path(os.environ.get("GNUPGHOME") or Path.home() / ".gnupg")

    @property
    def lock_directory(self) -> Path:
        """Where runs lock domains: one place per host (and per user for the
        user scope, or a non-root user's session domains, which are that user's
        own), on a tmpfs that a boot empties.

        A non-root user on ``qemu:///system`` still locks in the host's place
        (and fails there when it may not write it), never in a place of its own
        that root's runs of the same domains would not see.
        """
        if self.scope == "user" or (self.euid != 0 and self.session_uri):
            runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{self.euid}"
            return Path(runtime) / "virt-dup" / "locks"
        return Path("/run/virt-dup/locks")

    @property
    def cache_directory(self) -> Path:
        if self.cache_dir:
            return self.cache_dir
        if self.per_user:
            cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            return Path(cache_home) / "virt-dup"
        return Path(os.environ.get("CACHE_DIRECTORY", "/var/cache/virt-dup"))

    def backend_url(self, name_or_url: str) -> str:
        """The duplicity URL of a backend name, or the URL itself.

        Raises :class:`ConfigError` for a name virt-dup.yml does not define.
        """
        if "://" in name_or_url:
            return name_or_url
        try:
            return self.backends[name_or_url]
        except KeyError:
            known = ", ".join(sorted(self.backends)) or "none are defined"
            raise ConfigError(
                f"{self.path}: backends: no backend named {name_or_url!r} ({known})"
            ) from None

    def backend_settings_of(self, url: str) -> BackendSettings:
        """The settings of the named backend whose URL is ``url`` (none: defaults)."""
        for name, backend_url in self.backends.items():
            if backend_url == url:
                return self.backend_settings.get(name, BackendSettings())
        return BackendSettings()


def check_policy(config: Config, own: JobOptions, where: str) -> None:
    """Raises :class:`ConfigError` (one line naming ``where``, e.g. the job) when a
    job's own options (``own``, as its XML sets them) break virt-dup.yml's policy."""
    policy = config.policy
    effective = own.over(config.defaults)
    urls = [backend for backend in own.backends or () if "://" in backend]
    if urls and not policy.allow_job_backend_urls:
        raise ConfigError(
            f"{where}: names the backend URL {masked_url(urls[0])}, and the policy of "
            f"{config.path} lets jobs name only its backends ({', '.join(config.backends)})"
        )
    if policy.require_encryption and effective.encryption == "none":
        raise ConfigError(f"{where}: encryption none, and the policy of {config.path} requires it")
    if config.restore.require_signature and effective.encryption == "none":
        # Unencrypted volumes carry no signature: every restore would refuse them.
        raise ConfigError(
            f"{where}: encryption none, but {config.path} sets restore.require_signature: "
            "its backups could never be restored"
        )
    keys = own.encryption_keys or ()
    if policy.allowed_keys:
        allowed = {key.upper().removeprefix("0X") for key in policy.allowed_keys}
        for key in keys:
            if key.upper().removeprefix("0X") not in allowed:
                raise ConfigError(
                    f"{where}: encrypts to key {key}, which the policy of {config.path} does "
                    "not allow (policy.allowed_keys)"
                )


def read_passphrase(config: Config) -> str | None:
    """The GPG passphrase from its root-only file, or None when none is configured."""
    return read_secret(config.encryption.passphrase_file, "passphrase")


def read_secret(path: Path | None, what: str) -> str | None:
    """The first line of a secret file that only its owner may read (None: no file)."""
    if path is None:
        return None
    try:
        status = path.stat()
        if status.st_mode & 0o077:
            raise ConfigError(
                f"{path}: the {what} file is readable by others (mode "
                f"{status.st_mode & 0o777:o}); chmod 600 it"
            )
        return path.read_text().rstrip("\n")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the {what} file: {error.strerror}") from None


def config_path(explicit: str | os.PathLike[str] | None = None) -> tuple[Path, bool]:
    """Which file to read and whether the user named it (then it must exist)."""
    if explicit:
        return Path(explicit), True
    if os.environ.get(PATH_ENVIRONMENT):
        return Path(os.environ[PATH_ENVIRONMENT]), True
    return DEFAULT_PATH, False


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate virt-dup.yml.

    A missing file at the default path means "all defaults"; a file the user
    named (``--config`` or ``$VIRT_DUP_CONFIG``) must exist.
    Raises :class:`ConfigError` naming the file and the key path.
    """
    path, named = config_path(explicit)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if named:
            raise ConfigError(f"{path}: no such configuration file") from None
        return Config(path=path)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    """Validate the YAML text of a virt-dup.yml (see :func:`load_config`)."""
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except ValueError:  # PyYAML's int(): more digits than Python converts
        raise ConfigError(f"{path}: a number with more digits than any setting takes") from None
    if document is None:
        return Config(path=path)
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return _Loader(path).load(document)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: the
    second would silently win, as a typo would silently become a default."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *defaults``: explicit keys beside it win, as YAML says
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"the key {key!r} is given twice",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# New keys are snake_case.  Old flat dash-case keys map onto them.
_LEGACY_TOP_LEVEL = {
    "libvirt-uri": ("libvirt", "uri"),
    "libvirt-username": ("libvirt", "username"),
    "libvirt-password": ("libvirt", "password"),
    "libvirt-flags": ("libvirt", "flags"),
    "duplicity-backends": ("backends", None),
    "default-schedule": ("defaults", "schedule"),
    "default_schedule": ("defaults", "schedule"),
    "depth": ("defaults", "depth"),
}
_IGNORED_LEGACY = ("staging-area", "staging-path", "staging_area", "staging_path")
_TOP_LEVEL = (
    "scope",
    "libvirt",
    "backends",
    "encryption",
    "defaults",
    "state_dir",
    "cache_dir",
    "randomized_delay",
    "max_parallel_runs",
    "policy",
    "restore",
    "alerts",
)
_ALERT_KEYS = ("urls", "urls_file", "events", "ping_url")
#: An apprise URL: a scheme, then anything but blanks and control characters.
_ALERT_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\x00-\x1f\x7f]+")
_PING_URL = re.compile(r"https?://[^\s\x00-\x1f\x7f{}]+(?:\{job\}[^\s\x00-\x1f\x7f{}]*)*")
_RESTORE_KEYS = ("require_signature",)
_POLICY_KEYS = ("allow_job_backend_urls", "require_encryption", "allowed_keys")
_LIBVIRT_KEYS = ("uri", "username", "password_file", "flags", "config_dir")
_ENCRYPTION_KEYS = ("keys", "sign_key", "gnupg_home", "passphrase_file")


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.notices: list[str] = []

    def error(self, where: str, expected: str, value: object = None) -> ConfigError:
        got = "" if value is None else f", got {value!r}"
        return ConfigError(f"{self.path}: {where}: expected {expected}{got}")

    def unknown(self, where: str, key: object, known: tuple[str, ...]) -> ConfigError:
        near = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        return ConfigError(
            f"{self.path}: {where}{key}: unknown key{hint}; expected one of {', '.join(known)}"
        )

    def mapping(self, value: object, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise self.error(where, "a mapping", value)
        return value

    def text(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(where, "a non-empty string", value)
        if any(ord(character) < 32 or ord(character) == 127 for character in value):
            raise self.error(where, "one line of text", value)
        if len(value) > MAX_TEXT:
            raise self.error(where, f"at most {MAX_TEXT} characters", f"{value[:40]}...")
        return value.strip()

    def absolute_path(self, value: object, where: str) -> Path:
        path = Path(self.text(value, where))
        if not path.is_absolute():
            raise self.error(where, "an absolute path", str(path))
        return path

    def load(self, document: dict[str, Any]) -> Config:
        sections, legacy = self.top_level(document)
        scope = sections.get("scope", "system")
        if scope not in SCOPES:
            raise self.error("scope", "system or user", scope)

        libvirt = self.libvirt(sections.get("libvirt"), legacy)
        backends, backend_settings = self.backends(
            sections.get("backends"), legacy.get(("backends", None))
        )
        encryption = self.encryption(sections.get("encryption"))
        policy = self.policy(sections.get("policy"))
        restore = self.restore(sections.get("restore"))
        alerts = self.alerts(sections.get("alerts"))
        if restore.require_signature and encryption.sign_key is None:
            raise ConfigError(
                f"{self.path}: restore.require_signature is true but encryption.sign_key is "
                "not set: there is no key a restore could check signatures against"
            )
        defaults = self.defaults(sections.get("defaults"), legacy)
        for name in defaults.backends or ():
            if "://" not in name and name not in backends:
                raise self.error("defaults.backends", "a backend defined under backends:", name)

        max_parallel_runs = parse_count(
            sections.get("max_parallel_runs", DEFAULT_MAX_PARALLEL_RUNS),
            f"{self.path}: max_parallel_runs",
        )
        randomized_delay = sections.get("randomized_delay")
        if randomized_delay is not None:
            randomized_delay = self.timespan(randomized_delay, "randomized_delay")
        for key, secret in (
            ("libvirt.password_file", libvirt.password_file),
            ("encryption.passphrase_file", encryption.passphrase_file),
            ("alerts.urls_file", alerts.urls_file),
            *(
                (f"backends.{name}.password_file", settings.password_file)
                for name, settings in backend_settings.items()
            ),
        ):
            self.check_private(key, secret)
        return Config(
            path=self.path,
            scope=scope,
            libvirt=libvirt,
            backends=backends,
            backend_settings=backend_settings,
            encryption=encryption,
            policy=policy,
            restore=restore,
            alerts=alerts,
            defaults=defaults,
            state_dir=self.optional_path(sections, "state_dir"),
            cache_dir=self.optional_path(sections, "cache_dir"),
            randomized_delay=randomized_delay,
            max_parallel_runs=max_parallel_runs,
            notices=tuple(self.notices),
        )

    def check_private(self, key: str, path: Path | None) -> None:
        """A notice when a secret file the configuration names can be read by
        anyone but its owner (virt-dup refuses to read such a passphrase)."""
        if path is None:
            return
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            return  # a missing file is an error where it is read
        if mode & 0o077:
            self.notices.append(
                f"{self.path}: {key} {path} is readable by others (mode {mode:o}): chmod 600 it"
            )

    def top_level(
        self, document: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[tuple[str, str | None], Any]]:
        """The sections of the file, and the original virt-dup's top-level keys
        (``(section, key)`` they now belong to -> value), with a notice for each
        deprecated spelling."""
        sections: dict[str, Any] = {}
        legacy: dict[tuple[str, str | None], Any] = {}
        for key, value in document.items():
            if not isinstance(key, str):
                raise self.unknown("", key, _TOP_LEVEL)
            if key in _IGNORED_LEGACY:
                self.notices.append(
                    f"{self.path}: {key} is no longer needed (backups stream from the "
                    "disk images); it is ignored"
                )
            elif key == "libvirt-socket":
                # The original's "use the local unix socket": the local URI of the scope.
                self.notices.append(
                    f"{self.path}: libvirt-socket is deprecated; leave libvirt.uri unset for "
                    "the local socket"
                )
                if not isinstance(value, bool):
                    raise self.error("libvirt-socket", "true or false", value)
            elif key in _LEGACY_TOP_LEVEL:
                self.legacy_key(key, value, legacy)
            elif key in _TOP_LEVEL:
                sections[key] = value
            else:
                raise self.unknown("", key, _TOP_LEVEL)
        return sections, legacy

    def legacy_key(
        self, key: str, value: object, legacy: dict[tuple[str, str | None], Any]
    ) -> None:
        target = _LEGACY_TOP_LEVEL[key]
        if target in legacy:
            raise self.error(key, f"one spelling of {target[0]}.{target[1]}, not two")
        if key != "libvirt-password":  # has its own notice, in libvirt()
            self.notices.append(
                f"{self.path}: {key} is deprecated; write it as "
                + (f"{target[0]}: {{{target[1]}: ...}}" if target[1] else f"{target[0]}:")
            )
        legacy[target] = value

    def optional_path(self, section: dict[str, Any], key: str, where: str = "") -> Path | None:
        if section.get(key) is None:
            return None
        return self.absolute_path(section[key], where + key)

    def timespan(self, value: object, where: str) -> str:
        """A systemd time span; it goes into a unit file as it is, so blanks are
        spaces only (a newline would start a directive of its own) and it is short."""
        text = str(value).strip(" ") if isinstance(value, str | int) else ""
        unit = r"(?:us|ms|s|sec|seconds?|min|minutes?|m|h|hr|hours?|d|days?|w|weeks?)"
        pattern = rf"(?:[0-9]{{1,12}} *{unit}? *)+"
        if len(text) > 64 or not re.fullmatch(pattern, text) or text[-1] == " ":
            shown = value if len(str(value)) <= 40 else f"{str(value)[:40]}..."
            raise self.error(where, "a systemd time span such as 30s, 10min or 1h", shown)
        return text

    def libvirt(self, value: object, legacy: dict[tuple[str, str | None], Any]) -> LibvirtSettings:
        section = self.mapping(value, "libvirt")
        for key in section:
            if key not in _LIBVIRT_KEYS:
                raise self.unknown("libvirt.", key, _LIBVIRT_KEYS)
        uri = section.get("uri", legacy.get(("libvirt", "uri")))
        flags = section.get("flags", legacy.get(("libvirt", "flags"), 0))
        if (
            isinstance(flags, bool)
            or not isinstance(flags, int)
            or not 0 <= flags <= _MAX_LIBVIRT_FLAGS
        ):
            raise self.error("libvirt.flags", "a non-negative integer below 2**32", flags)
        username = section.get("username", legacy.get(("libvirt", "username")))
        password = legacy.get(("libvirt", "password"))
        if password is not None:
            # Say nothing of the value: it is a secret.
            self.notices.append(
                f"{self.path}: libvirt-password puts a secret in the configuration; "
                "move it to a root-only file named by libvirt.password_file"
            )
        if uri is not None and not _LIBVIRT_URI.fullmatch(self.text(uri, "libvirt.uri")):
            raise self.error("libvirt.uri", "a libvirt URI such as qemu:///system", uri)
        return LibvirtSettings(
            uri=self.text(uri, "libvirt.uri") if uri is not None else None,
            username=self.text(username, "libvirt.username") if username is not None else None,
            password_file=self.optional_path(section, "password_file", "libvirt."),
            password=str(password) if password is not None else None,
            flags=flags,
            config_dir=self.optional_path(section, "config_dir", "libvirt."),
        )

    def backends(
        self, value: object, legacy: object
    ) -> tuple[dict[str, str], dict[str, BackendSettings]]:
        """``backends:``: name -> URL, or name -> a mapping with ``url`` and the
        backend's own retention and password file."""
        if value is None and legacy is None:
            return {}, {}
        if value is not None and legacy is not None:
            raise self.error("backends", "either backends or duplicity-backends, not both")
        where = "backends" if value is not None else "duplicity-backends"
        source = value if value is not None else legacy
        if isinstance(source, list):
            # The original listed bare URLs; each URL is also its own name.
            source = {self.text(url, where): url for url in source}
        section = self.mapping(source, where)
        backends: dict[str, str] = {}
        settings: dict[str, BackendSettings] = {}
        for name, entry in section.items():
            if "://" not in name and not BACKEND_NAME.match(name):
                raise self.error(
                    f"{where}.{name}", "a name of ASCII letters, digits, '.', '-' and '_'"
                )
            url = entry
            if isinstance(entry, dict):
                settings[name] = self.backend_settings(entry, f"{where}.{name}")
                url = entry.get("url")
            url_text = self.text(url, f"{where}.{name}")
            if not is_backend_url(url_text):
                raise self.error(f"{where}.{name}", "a duplicity URL such as file:///srv/b", url)
            has_secret = name in settings and (
                settings[name].password_file or settings[name].password_credential
            )
            if has_secret and split_password(url_text)[1] is not None:
                raise self.error(
                    f"{where}.{name}.url",
                    "no password in the URL when password_file or password_credential is set",
                )
            backends[name] = url_text
        if len(set(backends.values())) < len(backends):
            raise self.error(where, "a different URL for each backend")
        return backends, settings

    def backend_settings(self, entry: dict[str, Any], where: str) -> BackendSettings:
        for key in entry:
            if key not in _BACKEND_KEYS:
                raise self.unknown(f"{where}.", key, _BACKEND_KEYS)
        if "url" not in entry:
            raise self.error(f"{where}.url", "the backend's duplicity URL")
        retention = {key: entry[key] for key in BACKEND_RETENTION_OPTIONS if key in entry}
        options = parse_options(retention, f"{self.path}: {where}").options
        credential = entry.get("password_credential")
        if credential is not None:
            if not isinstance(credential, str) or not _CREDENTIAL_NAME.fullmatch(credential):
                raise self.error(
                    f"{where}.password_credential", "a systemd credential name", credential
                )
            if "password_file" in entry:
                raise self.error(where, "password_file or password_credential, not both")
        return BackendSettings(
            retention=options,
            password_file=self.optional_path(entry, "password_file", where + "."),
            password_credential=credential,
        )

    def encryption(self, value: object) -> EncryptionSettings:
        section = self.mapping(value, "encryption")
        for key in section:
            if key not in _ENCRYPTION_KEYS:
                raise self.unknown("encryption.", key, _ENCRYPTION_KEYS)
        from virt_dup.config.options import parse_key_ids

        keys: tuple[str, ...] = ()
        if section.get("keys") is not None:
            try:
                keys = parse_key_ids(section["keys"], "encryption.keys")
            except ConfigError as error:
                raise ConfigError(f"{self.path}: {error}") from None
        sign_key = None
        if section.get("sign_key") is not None:
            try:
                sign_keys = parse_key_ids(section["sign_key"], "encryption.sign_key")
            except ConfigError as error:
                raise ConfigError(f"{self.path}: {error}") from None
            if len(sign_keys) != 1:
                raise self.error("encryption.sign_key", "one key id", section["sign_key"])
            sign_key = sign_keys[0]
        return EncryptionSettings(
            keys=keys,
            sign_key=sign_key,
            gnupg_home=self.optional_path(section, "gnupg_home", "encryption."),
            passphrase_file=self.optional_path(section, "passphrase_file", "encryption."),
        )

    def policy(self, value: object) -> PolicySettings:
        section = self.mapping(value, "policy")
        for key in section:
            if key not in _POLICY_KEYS:
                raise self.unknown("policy.", key, _POLICY_KEYS)
        from virt_dup.config.options import parse_boolean, parse_key_ids

        try:
            return PolicySettings(
                allow_job_backend_urls=parse_boolean(
                    section.get("allow_job_backend_urls", True), "policy.allow_job_backend_urls"
                ),
                require_encryption=parse_boolean(
                    section.get("require_encryption", False), "policy.require_encryption"
                ),
                allowed_keys=parse_key_ids(section["allowed_keys"], "policy.allowed_keys")
                if section.get("allowed_keys") is not None
                else (),
            )
        except ConfigError as error:
            raise ConfigError(f"{self.path}: {error}") from None

    def restore(self, value: object) -> RestoreSettings:
        section = self.mapping(value, "restore")
        for key in section:
            if key not in _RESTORE_KEYS:
                raise self.unknown("restore.", key, _RESTORE_KEYS)
        from virt_dup.config.options import parse_boolean

        try:
            return RestoreSettings(
                require_signature=parse_boolean(
                    section.get("require_signature", False), "restore.require_signature"
                )
            )
        except ConfigError as error:
            raise ConfigError(f"{self.path}: {error}") from None

    def alert_urls(self, urls: object) -> list[str]:
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list):
            raise self.error("alerts.urls", "a list of apprise URLs", urls)
        checked: list[str] = []
        for index, url in enumerate(urls):
            where = f"alerts.urls[{index}]"
            text = self.text(url, where)
            if not _ALERT_URL.fullmatch(text):
                # The value may hold a password: show only its masked form.
                shown = masked_url(text) if "://" in text else text[:40]
                raise self.error(where, "an apprise URL such as mailto:// or json://", shown)
            if urllib.parse.urlsplit(text).password is not None:
                self.notices.append(
                    f"{self.path}: {where} {masked_url(text)} puts a password in the "
                    "configuration; move the URL to a root-only file named by alerts.urls_file"
                )
            checked.append(text)
        return checked

    def alerts(self, value: object) -> AlertSettings:
        if isinstance(value, dict) and True in value:
            # YAML 1.1 reads an unquoted key "on" as true.
            raise ConfigError(f"{self.path}: alerts.on: unknown key; write it as events:")
        section = self.mapping(value, "alerts")
        for key in section:
            if key not in _ALERT_KEYS:
                raise self.unknown("alerts.", key, _ALERT_KEYS)
        checked = self.alert_urls(section.get("urls") or [])
        events = section.get("events", list(ALERT_EVENTS))
        if isinstance(events, str):
            events = [events]
        if not isinstance(events, list) or not all(event in ALERT_EVENTS for event in events):
            raise self.error("alerts.events", f"a list of {', '.join(ALERT_EVENTS)}", events)
        ping_url = None
        if section.get("ping_url") is not None:
            ping_url = self.text(section["ping_url"], "alerts.ping_url")
            if not _PING_URL.fullmatch(ping_url):
                raise self.error(
                    "alerts.ping_url",
                    "an http(s) URL such as https://hc-ping.com/KEY/{job}",
                    masked_url(ping_url),
                )
        return AlertSettings(
            urls=tuple(checked),
            urls_file=self.optional_path(section, "urls_file", "alerts."),
            events=tuple(dict.fromkeys(events)),
            ping_url=ping_url,
        )

    def defaults(self, value: object, legacy: dict[tuple[str, str | None], Any]) -> JobOptions:
        section = dict(self.mapping(value, "defaults"))
        for (name, key), legacy_value in legacy.items():
            if name == "defaults" and key is not None:
                section.setdefault(key, legacy_value)
        try:
            parsed = parse_options(section, "defaults")
        except ConfigError as error:
            raise ConfigError(f"{self.path}: {error}") from None
        self.notices.extend(f"{self.path}: {notice}" for notice in parsed.notices)
        return parsed.options.over(BUILTIN_DEFAULTS)
