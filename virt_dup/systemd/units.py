"""virt-dup's systemd units and generator, filled in and placed.

The static units (``units/``) and the generator (``generator/``) are
templates: :func:`render_installation` fills in their placeholders (the
virt-dup command, the config file, the watched paths) and says where each
file goes; :func:`write_installation` writes it.

Where the templates come from (:func:`data_directory`): in a source checkout
(also an editable install) the top-level ``units/`` and ``generator/`` next
to the package; in an installed wheel ``<prefix>/share/virt-dup/units`` and
``.../generator`` (``[options.data_files]`` in setup.cfg).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from virt_dup import __version__
from virt_dup.config.load import DEFAULT_PATH, PATH_ENVIRONMENT, Config
from virt_dup.errors import UsageError, VirtDupError
from virt_dup.files import make_directories, write_atomically
from virt_dup.libvirt.metadata import is_valid_uuid
from virt_dup.systemd.generator import (
    CHECK_SERVICE,
    RECOVER_SERVICE,
    RELOAD_SERVICE,
    TARGET,
    TIMER_KINDS,
    file_backend_directory,
)

#: The directory holding the virt_dup package: the repository root in a checkout.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


#: Name of the data directory of an installed virt-dup, under ``<prefix>/share``.
SHARE_NAME = "virt-dup"


ALERT_SERVICE = "virt-dup-alert@.service"

#: Static units, installed as they are (after placeholders).
UNIT_FILES = (
    "virt-dup@.service",
    "virt-dup-full@.service",
    "virt-dup-verify@.service",
    ALERT_SERVICE,
    "virt-dup.target",
    "virt-dup-reload.path",
    RELOAD_SERVICE,
    RECOVER_SERVICE,
    CHECK_SERVICE,
    "virt-dup-check.timer",
)


#: The services a timer starts.
RUN_SERVICES = tuple(f"{kind.prefix}@.service" for kind in TIMER_KINDS)

#: Every service that runs virt-dup unattended: they share one sandbox.
SANDBOXED_SERVICES = (*RUN_SERVICES, RECOVER_SERVICE, CHECK_SERVICE)

#: Every service installed.
SERVICES = (*SANDBOXED_SERVICES, RELOAD_SERVICE, ALERT_SERVICE)


@dataclass(frozen=True)
class DropIn:
    source: str  # file in units/
    name: str  # file name inside <unit>.d/
    scopes: tuple[str, ...]
    services: tuple[str, ...]


DROP_INS = (
    DropIn(
        "virt-dup-sandbox.conf", "40-virt-dup-sandbox.conf", ("system", "user"), SANDBOXED_SERVICES
    ),
    DropIn("virt-dup-system.conf", "44-virt-dup-system.conf", ("system",), SERVICES),
    DropIn(
        "virt-dup-sandbox-system.conf",
        "45-virt-dup-sandbox-system.conf",
        ("system",),
        SANDBOXED_SERVICES,
    ),
    DropIn("virt-dup-run.conf", "50-virt-dup-run.conf", ("system", "user"), RUN_SERVICES),
    DropIn(
        "virt-dup-alert-system.conf", "46-virt-dup-alert-system.conf", ("system",), (ALERT_SERVICE,)
    ),
)

#: Drop-ins earlier versions installed, deleted by ``install-units``.
OBSOLETE_DROP_INS = ("60-virt-dup-run-system.conf",)


GENERATOR = "virt-dup-generator"


#: Units ``install-units`` starts (the target pulls in the timers and the watcher).
START_UNITS = (TARGET, "virt-dup-reload.path")


#: Glob patterns of the timers virt-dup-generator writes.
TIMER_PATTERNS = tuple(f"{kind.prefix}@*.timer" for kind in TIMER_KINDS)


_PLACEHOLDER = re.compile(r"@([A-Z][A-Z_]*)@")


# -- where things go ------------------------------------------------------------
def default_unit_directory(scope: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where an admin's units go: /etc/systemd/system, or ~/.config/systemd/user."""
    if scope == "system":
        return Path("/etc/systemd/system")
    environ = os.environ if environ is None else environ
    config_home = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user"


def default_generator_directory(scope: str) -> Path:
    """Where an admin's generators go.  User generators are system-wide (run by every
    user's manager): systemd has no per-user generator directory."""
    return Path(f"/etc/systemd/{scope}-generators")


def data_directory(name: str, source_root: Path = SOURCE_ROOT) -> Path:
    """``units`` or ``generator``: the source checkout's, else the installed copy.

    Raises :class:`VirtDupError` naming the places looked at when none exists.
    """
    marker = {"units": UNIT_FILES[0], "generator": GENERATOR}[name]
    candidates = [
        source_root / name,  # source checkout, editable install
        Path(sys.prefix) / "share" / SHARE_NAME / name,  # pip install (venv or system)
        Path("/usr/local/share") / SHARE_NAME / name,
        Path("/usr/share") / SHARE_NAME / name,
    ]
    for candidate in candidates:
        if (candidate / marker).is_file():
            return candidate
    raise VirtDupError(
        f"cannot find virt-dup's {name}/ (looked in {', '.join(map(str, candidates))}); "
        "is virt-dup installed completely?"
    )


def virt_dup_command(argv0: str | None = None, which: str | None = None) -> tuple[str, ...]:
    """The command a unit runs to call this virt-dup, as words.

    The executable in use when it is called ``virt-dup``, else the one on
    PATH, else this Python with ``-m virt_dup``.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    if Path(argv0).name == "virt-dup" and os.access(argv0, os.X_OK):
        return (os.path.abspath(argv0),)
    found = shutil.which("virt-dup") if which is None else which
    if found:
        return (os.path.abspath(found),)
    return (sys.executable, "-m", "virt_dup")


# -- unit-file syntax -----------------------------------------------------------
def _check_line(text: str, what: str) -> str:
    if any(ord(character) < 32 or ord(character) == 127 for character in text):
        raise UsageError(f"{what} {text!r}: control characters cannot go into a unit file")
    return text


def unit_path_value(path: Path, what: str) -> str:
    """A path as the value of a path setting (``PathChanged=``): specifiers escaped."""
    return _check_line(str(path), what).replace("%", "%%")


def exec_word(word: str, what: str = "command") -> str:
    """One word of an ``ExecStart=`` line: quoted if needed, ``%`` and ``$`` escaped."""
    text = _check_line(word, what).replace("%", "%%").replace("$", "$$")
    if text and not re.search(r"[\s\"'\\;]", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def environment_line(name: str, value: str) -> str:
    """``Environment="NAME=value"`` with quoting and specifiers escaped."""
    text = _check_line(f"{name}={value}", "environment").replace("%", "%%")
    return 'Environment="' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fill_placeholders(text: str, values: Mapping[str, str], source: str) -> str:
    """Replace every ``@NAME@`` in ``text``; a line that held only a placeholder
    whose value is empty is dropped.  Raises VirtDupError for an unknown placeholder."""
    lines = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("#"):
            lines.append(line)  # comments document the placeholders
            continue
        stripped = line.strip()
        whole = _PLACEHOLDER.fullmatch(stripped)
        if whole and values.get(whole.group(1)) == "":
            continue

        def replace(match: re.Match[str]) -> str:
            try:
                return values[match.group(1)]
            except KeyError:
                raise VirtDupError(f"{source}: unknown placeholder {match.group(0)}") from None

        lines.append(_PLACEHOLDER.sub(replace, line))
    return "".join(lines)


def install_section_wanted_by(text: str) -> list[str]:
    """The ``WantedBy=`` targets of a unit's ``[Install]`` section."""
    section = ""
    wanted: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        elif section == "[Install]" and stripped.startswith("WantedBy="):
            wanted.extend(stripped.removeprefix("WantedBy=").split())
    return wanted


# -- install-units --------------------------------------------------------------
@dataclass(frozen=True)
class InstallSettings:
    """What the placeholders become and where the files go."""

    scope: str
    unit_directory: Path
    generator_directory: Path
    command: tuple[str, ...]  # how units call virt-dup
    python: str  # the generator's interpreter: the one that imports this virt_dup
    config_path: Path
    #: Not the default path: services get VIRT_DUP_CONFIG, the generator has it baked in.
    config_explicit: bool
    libvirt_config_directory: Path
    #: State, cache and file:// backend directories virt-dup.yml names: systemd
    #: creates only its own (StateDirectory=...), and a sandboxed run cannot.
    own_directories: tuple[Path, ...] = ()

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        scope: str | None = None,
        unit_directory: Path | None = None,
        generator_directory: Path | None = None,
        command: tuple[str, ...] | None = None,
        python: str | None = None,
        root: Path | None = None,
    ) -> InstallSettings:
        """Settings for ``config``; every path is one on the host the units run on.

        ``root``: the files go into this scratch tree (a package build, an
        image), not the host it is being run on.  The virt-dup command, the
        interpreter and the config file are then taken as seen from inside it:
        ``ROOT/opt/virt-dup/bin/virt-dup`` is ``/opt/virt-dup/bin/virt-dup``.
        """
        scope = scope or config.scope
        command = command or virt_dup_command()
        python = python or sys.executable
        config_path = config.path.absolute()
        if root is not None:
            command = tuple(str(inside_root(Path(word), root)) for word in command)
            python = str(inside_root(Path(python), root))
            config_path = inside_root(config_path, root)
        return cls(
            scope=scope,
            unit_directory=unit_directory or default_unit_directory(scope),
            generator_directory=generator_directory or default_generator_directory(scope),
            command=command,
            python=python,
            config_path=config_path,
            config_explicit=config_path != DEFAULT_PATH,
            libvirt_config_directory=config.libvirt_config_dir,
            own_directories=own_directories(config),
        )

    def placeholder_values(self) -> dict[str, str]:
        environment = ""
        if self.config_explicit:
            environment = environment_line(PATH_ENVIRONMENT, str(self.config_path))
        return {
            "VIRT_DUP": " ".join(exec_word(word) for word in self.command),
            "CONFIG_ENVIRONMENT": environment,
            "CONFIG": unit_path_value(self.config_path, "config file"),
            "LIBVIRT_CONFIG_DIR": unit_path_value(
                self.libvirt_config_directory, "libvirt config dir"
            ),
        }


def inside_root(path: Path, root: Path) -> Path:
    """``path`` as a program sees it once the tree ``root`` is the host's ``/``.

    A relative word (``-m``) or a path outside ``root`` is returned unchanged.
    """
    if not path.is_absolute():
        return path
    try:
        return Path("/") / path.relative_to(root.absolute())
    except ValueError:
        return path


def under_root(path: Path, root: Path) -> Path:
    """Where the host path ``path`` lies in the scratch tree ``root``."""
    return root.absolute() / path.relative_to(path.anchor)


def own_directories(config: Config) -> tuple[Path, ...]:
    """What install-units creates: the state and cache directories and the
    ``file://`` backends virt-dup.yml names (see :attr:`InstallSettings.own_directories`)."""
    backends = [file_backend_directory(url) for url in config.backends.values()]
    return (
        *(path for path in (config.state_dir, config.cache_dir) if path is not None),
        *(Path(path) for path in backends if path and os.path.isabs(path)),
    )


def create_own_directories(config: Config) -> list[Path]:
    """Create (mode 0700) the :func:`own_directories` that are missing; returns them.

    ``init`` does it as ``install-units`` does: virt-dup.yml edited after the
    install names directories a sandboxed run could not create.
    Raises OSError."""
    missing = [directory for directory in own_directories(config) if not directory.exists()]
    for directory in missing:
        make_directories(directory, 0o700)
    return missing


@dataclass
class Installation:
    """Files (absolute path -> text, mode) and symlinks (path -> target) to write."""

    files: dict[Path, tuple[str, int]] = field(default_factory=dict)
    symlinks: dict[Path, Path] = field(default_factory=dict)
    #: Files an earlier version installed that would now be wrong.
    removed: list[Path] = field(default_factory=list)
    #: Directories to create when missing (path -> mode).
    directories: dict[Path, int] = field(default_factory=dict)

    def under(self, root: Path) -> Installation:
        """The same installation written into the scratch tree ``root``
        (``DESTDIR``): every path moves under it, symlink targets stay the
        host's paths, so the links resolve once the tree is the host's ``/``."""
        return Installation(
            files={under_root(path, root): value for path, value in self.files.items()},
            symlinks={under_root(link, root): target for link, target in self.symlinks.items()},
            removed=[under_root(path, root) for path in self.removed],
            directories={under_root(path, root): mode for path, mode in self.directories.items()},
        )


def render_generator(source: str, python: str, config_path: Path | None) -> str:
    """The generator script with its shebang set to ``python`` and, when
    ``config_path`` is given, VIRT_DUP_CONFIG set (systemd runs generators
    with its own environment, not ours)."""
    if re.search(r"\s", python) or not os.path.isabs(python):
        raise UsageError(
            f"{python!r}: the generator's interpreter must be an absolute path without spaces"
        )
    lines = source.splitlines(keepends=True)
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    header = 0
    while header < len(lines) and lines[header].startswith("#"):
        header += 1
    setup = []
    if config_path is not None:
        setup = [
            "# Added by virt-dup install-units: the config file it was installed for.\n",
            "import os  # noqa: E402\n",
            "\n",
            f"os.environ.setdefault({PATH_ENVIRONMENT!r}, {str(config_path)!r})\n",
        ]
    return "".join([f"#!{python}\n", *lines[:header], *setup, *lines[header:]])


def installed_header(source: str) -> str:
    return (
        f"# Installed by `virt-dup install-units` (virt-dup {__version__}) from units/{source};\n"
        "# the next install overwrites it: change settings in a drop-in of your own.\n"
    )


def render_installation(
    settings: InstallSettings, unit_sources: Mapping[str, str], generator_source: str
) -> Installation:
    """Every file and symlink ``install-units`` writes.  Pure.

    ``unit_sources``: the texts of ``units/`` by file name.
    """
    values = settings.placeholder_values()
    installation = Installation()
    unit_directory = settings.unit_directory
    for name in UNIT_FILES:
        text = installed_header(name) + fill_placeholders(unit_sources[name], values, name)
        installation.files[unit_directory / name] = (text, 0o644)
        for target in install_section_wanted_by(text):
            installation.symlinks[unit_directory / f"{target}.wants" / name] = unit_directory / name
    for drop_in in DROP_INS:
        if settings.scope not in drop_in.scopes:
            continue
        text = installed_header(drop_in.source) + fill_placeholders(
            unit_sources[drop_in.source], values, drop_in.source
        )
        for service in drop_in.services:
            installation.files[unit_directory / f"{service}.d" / drop_in.name] = (text, 0o644)
    for service in RUN_SERVICES:
        for name in OBSOLETE_DROP_INS:
            installation.removed.append(unit_directory / f"{service}.d" / name)
    for directory in settings.own_directories:
        installation.directories[directory] = 0o700
    baked_config = settings.config_path if settings.config_explicit else None
    generator = render_generator(generator_source, settings.python, baked_config)
    installation.files[settings.generator_directory / GENERATOR] = (generator, 0o755)
    return installation


def read_sources(units_directory: Path, generator_directory: Path) -> tuple[dict[str, str], str]:
    """(unit texts by name, generator text) from the template directories."""
    names = [*UNIT_FILES, *(drop_in.source for drop_in in DROP_INS)]
    try:
        units = {name: (units_directory / name).read_text(encoding="utf-8") for name in names}
        generator = (generator_directory / GENERATOR).read_text(encoding="utf-8")
    except OSError as error:
        raise VirtDupError(f"cannot read {error.filename}: {error.strerror}") from None
    return units, generator


def write_installation(installation: Installation) -> None:
    """Write files atomically (a daemon-reload never sees half a unit) and symlinks.

    Raises :class:`VirtDupError` naming the path that could not be written.
    """
    try:
        for directory, mode in installation.directories.items():
            make_directories(directory, mode)
        for path, (text, mode) in installation.files.items():
            write_atomically(path, text, mode, directory_mode=0o755)
        for link, target in installation.symlinks.items():
            make_directories(link.parent, 0o755)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        for path in installation.removed:
            path.unlink(missing_ok=True)
    except OSError as error:
        raise VirtDupError(f"cannot write {error.filename}: {error.strerror}") from None


# -- sync-timers ----------------------------------------------------------------
def is_job_timer(name: str) -> bool:
    """True for ``virt-dup@<uuid>.timer`` / ``virt-dup-full@<uuid>.timer``."""
    for kind in TIMER_KINDS:
        prefix = f"{kind.prefix}@"
        if name.startswith(prefix) and name.endswith(".timer"):
            return is_valid_uuid(name[len(prefix) : -len(".timer")])
    return False


def check_scope(config: Config, scope: str) -> str | None:
    """A notice when units go to a manager other than the one virt-dup.yml names."""
    if scope == config.scope:
        return None
    return (
        f"installing for the {scope} manager, but {config.path} says scope: {config.scope}; "
        f"sync-timers and add-job will talk to the {config.scope} manager (set scope: {scope})"
    )
