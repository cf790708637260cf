"""A backend's files, listed the way duplicity lists them.

``file://`` backends are read with ``os.scandir``; every other scheme
through duplicity's own backend classes, run by duplicity's interpreter (so
every backend duplicity supports, with its optional modules, lists the same
way).  The pure parts say which files are job collections, which backup set
a file belongs to and whether a collection is encrypted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence

from virt_dup.config.options import split_password
from virt_dup.duplicity.runner import find_executable
from virt_dup.duplicity.target import file_url_path as file_url_path  # its old home
from virt_dup.errors import CommandError, VirtDupError
from virt_dup.execute import run as run_command
from virt_dup.libvirt.metadata import is_valid_uuid

log = logging.getLogger(__name__)


#: How long listing a remote backend may take.
LISTING_TIMEOUT_S = 300.0


# -- backend listings (pure parts) ---------------------------------------------------
#: A file of a backup set, as duplicity names it: ``full`` and ``time`` for a full,
#: ``start`` and ``end`` for an incremental; ``kind`` (``volN.difftar``,
#: ``manifest``, ``sigtar``), ``volume``; ``part``: a partial local copy.
SET_FILE = re.compile(
    r"^duplicity-(?:(?P<full>full)(?:-signatures)?\.(?P<time>\d{8}T\d{6}Z)"
    r"|(?:inc|new-signatures)\.(?P<start>\d{8}T\d{6}Z)\.to\.(?P<end>\d{8}T\d{6}Z))"
    r"\.(?P<kind>vol(?P<volume>\d+)\.difftar|manifest|sigtar)(?:\.gz|\.gpg|\.z)?"
    r"(?P<part>\.part)?$"
)


def set_sizes(entries: Mapping[str, int | None]) -> dict[tuple[str, str], int | None]:
    """Bytes on the backend per backup set, ``{(kind, id): bytes}``.

    ``entries``: file name -> size (``None`` when the backend did not say).
    A set's bytes are its volumes, manifest and signature file; a set with
    any file of unknown size has size ``None``.
    """
    sizes: dict[tuple[str, str], int | None] = {}
    for name, size in entries.items():
        match = SET_FILE.match(name)
        if not match:
            continue
        key = ("full", match["time"]) if match["full"] else ("incremental", match["end"])
        if key in sizes and sizes[key] is None:
            continue
        sizes[key] = None if size is None else (sizes.get(key) or 0) + size
    return sizes


def encrypted_on_backend(names: Iterable[str]) -> bool | None:
    """Whether the collection's files are gpg-encrypted (``None``: no backup files)."""
    kinds = {name.endswith(".gpg") for name in names if SET_FILE.match(name)}
    if not kinds:
        return None
    return True in kinds


def unencrypted_files(names: Iterable[str]) -> list[str]:
    """The backup files (volumes, manifests, signatures) among ``names`` that are not
    gpg files, sorted.

    duplicity reads such a file as plain data, and checks signatures only
    of the volumes it decrypts: one of these in a collection would be
    restored without any check, whatever ``--sign-key`` says.
    """
    return sorted(name for name in names if SET_FILE.match(name) and ".gpg" not in name)


def job_directories(names: Iterable[str]) -> list[str]:
    """The entries of a backend root that are job collections (named by a job uuid,
    lower case, as ``run`` names them)."""
    return sorted(name for name in names if is_valid_uuid(name) and name == name.lower())


# -- backend listings (I/O) -------------------------------------------------------------
# Run by duplicity's own interpreter, so every backend duplicity supports can be
# listed the way duplicity lists it (also those needing its optional modules).
_LISTING_SCRIPT = """
import json, sys
from duplicity import backend, log
log.setup()
backend.import_backends()
store = backend.get_backend(sys.argv[1])
names = [n.decode() if isinstance(n, bytes) else n for n in store.list()]
sizes = {}
if hasattr(store.backend, "_query") or hasattr(store.backend, "_query_list"):
    info = store.query_info(names)
    sizes = {(k.decode() if isinstance(k, bytes) else k): v.get("size") for k, v in info.items()}
json.dump({name: sizes.get(name) if sizes.get(name, -1) != -1 else None for name in names},
          sys.stdout)
"""


def duplicity_interpreter(executable: str | None = None) -> list[str]:
    """The interpreter (argv) of the duplicity script, from its ``#!`` line."""
    program = executable or find_executable()
    try:
        with open(program, "rb") as stream:
            first = stream.readline(4096).decode(errors="replace")
    except OSError as error:
        raise VirtDupError(f"cannot read {program}: {error.strerror}") from None
    if not first.startswith("#!"):
        raise VirtDupError(f"{program} is not a Python script: cannot list backends with it")
    return shlex.split(first[2:].strip())


def list_backend(
    url: str, environment: Mapping[str, str] | None = None, secrets: Sequence[str] = ()
) -> dict[str, int | None]:
    """Names (and sizes, when known) of the entries in the backend directory ``url``.

    ``file://``: the directory itself (a missing directory lists as empty).
    Other schemes: duplicity's backend for that scheme, in duplicity's own
    interpreter; ``environment`` carries what it needs (``FTP_PASSWORD``...).
    Raises :class:`CommandError` when the backend cannot be listed.
    """
    directory = file_url_path(url)
    if directory is not None:
        entries: dict[str, int | None] = {}
        try:
            with os.scandir(directory) as scan:
                for entry in scan:
                    entries[entry.name] = (
                        entry.stat().st_size if entry.is_file(follow_symlinks=False) else None
                    )
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise CommandError(f"cannot list {directory}: {error.strerror}") from None
        return entries
    plain_url, password = split_password(url)
    variables = {"LC_ALL": "C.UTF-8", **(environment or {})}
    if password is not None:
        variables["FTP_PASSWORD"] = password
    completed = run_command(
        [*duplicity_interpreter(), "-c", _LISTING_SCRIPT, plain_url],
        environment=variables,
        secrets=[*secrets, *([password] if password else [])],
        timeout=LISTING_TIMEOUT_S,
    )
    try:
        listed = json.loads(completed.stdout)
    except ValueError:
        raise CommandError(f"listing {plain_url}: duplicity's backend printed no listing") from None
    return {str(name): (int(size) if size is not None else None) for name, size in listed.items()}


# Lists the backend, then writes a small file and deletes it again, with one try
# per call (duplicity's default is 5 tries, 30 s apart).
_PROBE_SCRIPT = """
import sys, tempfile
from duplicity import backend, config, log, path
log.setup()
config.num_retries = 1
backend.import_backends()
store = backend.get_backend(sys.argv[1])
store.list()
with tempfile.NamedTemporaryFile(prefix="virt-dup-probe-") as probe:
    probe.write(b"virt-dup check-config probe\\n")
    probe.flush()
    store.put(path.Path(probe.name), sys.argv[2])
store.delete([sys.argv[2]])
"""
#: How long the probe of one backend may take.
PROBE_TIMEOUT_S = 60.0


def probe_backend(
    url: str,
    environment: Mapping[str, str] | None = None,
    secrets: Sequence[str] = (),
    timeout: float = PROBE_TIMEOUT_S,
) -> None:
    """Prove that duplicity can list the backend directory ``url``, write a file
    there and delete it (the file is named ``.virt-dup-check-<pid>``; duplicity
    makes a missing directory, as a backup would).

    Raises :class:`CommandError` (one line, the URL's password masked) when it
    cannot, or takes longer than ``timeout`` seconds.
    """
    plain_url, password = split_password(url)
    variables = {"LC_ALL": "C.UTF-8", **(environment or {})}
    if password is not None:
        variables["FTP_PASSWORD"] = password
    run_command(
        [
            *duplicity_interpreter(),
            "-c",
            _PROBE_SCRIPT,
            plain_url,
            f".virt-dup-check-{os.getpid()}",
        ],
        environment=variables,
        secrets=[*secrets, *([password] if password else [])],
        timeout=timeout,
    )
