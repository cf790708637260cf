"""What backups exist: jobs on a backend, their backup sets, and what each one holds.

A job's backups are one duplicity collection at ``<backend URL>/<job-uuid>``
(:func:`virt_dup.run.job_backend_url`).  Each backup set holds the chain files
the job selected and the job's metadata folder (``manifest.json``,
``domain.xml``, ``SHA256SUMS``; see :func:`virt_dup.run.write_metadata`).

Where the facts come from:

* backup ids (times), full/incremental, chains, volume counts: duplicity's
  ``collection-status``;
* sizes: the backend's file listing (``os.scandir`` for ``file://``,
  duplicity's own backend classes for every other scheme), summed per
  backup set over its volumes, manifest and signatures;
* domain, disks, chain layout, checksums: the manifest *inside* the backup,
  restored from the backend (once: it is cached under
  ``<cache_dir>/metadata/<job-uuid>/<backup-id>/``, a backup never changes).

Nothing here needs libvirt or the state directory: a fresh host with only
virt-dup.yml and the GPG key finds every job on a backend by listing it
(:func:`backend_sources`).  :func:`local_sources` is the libvirt side (a
domain or job defined here).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from virt_dup import duplicity
from virt_dup.config import Config
from virt_dup.errors import (
    CommandError,
    ConfigError,
    LibvirtError,
    NotFoundError,
    UsageError,
    VirtDupError,
)
from virt_dup.execute import CommandFailed
from virt_dup.execute import run as run_command
from virt_dup.hypervisor import Hypervisor
from virt_dup.jobs import Job, is_valid_uuid
from virt_dup.manifest import Manifest, ManifestDisk, parse_manifest
from virt_dup.run import (
    CHECKSUMS,
    DOMAIN_XML,
    MANIFEST,
    duplicity_target,
    job_backend_url,
    read_passphrase,
)
from virt_dup.state import write_atomically

log = logging.getLogger(__name__)

#: How long listing a remote backend may take.
LISTING_TIMEOUT_S = 300.0


class BackupNotFound(NotFoundError):
    """No such job, backup or metadata on the backend."""


@dataclass(frozen=True)
class BackupMetadata:
    """The metadata folder of one backup: its manifest and the domain's saved XML."""

    manifest: Manifest
    domain_xml: str
    #: Where the folder was on the backed-up host (``<state_dir>/metadata/<job>``).
    folder: str


# -- backend listings (pure parts) ---------------------------------------------------
_SET_FILE = re.compile(
    r"^duplicity-(?:(?P<full>full)(?:-signatures)?\.(?P<time>\d{8}T\d{6}Z)"
    r"|(?:inc|new-signatures)\.\d{8}T\d{6}Z\.to\.(?P<end>\d{8}T\d{6}Z))"
    r"\.(?:vol\d+\.difftar|manifest|sigtar)(?:\.gz|\.gpg|\.z)?(?:\.part)?$"
)


def set_sizes(entries: Mapping[str, int | None]) -> dict[tuple[str, str], int | None]:
    """Bytes on the backend per backup set, ``{(kind, id): bytes}``.

    ``entries``: file name -> size (``None`` when the backend did not say).
    A set's bytes are its volumes, manifest and signature file; a set with
    any file of unknown size has size ``None``.
    """
    sizes: dict[tuple[str, str], int | None] = {}
    for name, size in entries.items():
        match = _SET_FILE.match(name)
        if not match:
            continue
        key = ("full", match["time"]) if match["full"] else ("incremental", match["end"])
        if key in sizes and sizes[key] is None:
            continue
        sizes[key] = None if size is None else (sizes.get(key) or 0) + size
    return sizes


def encrypted_on_backend(names: Iterable[str]) -> bool | None:
    """Whether the collection's files are gpg-encrypted (``None``: no backup files)."""
    kinds = {name.endswith(".gpg") for name in names if _SET_FILE.match(name)}
    if not kinds:
        return None
    return True in kinds


def job_directories(names: Iterable[str]) -> list[str]:
    """The entries of a backend root that are job collections (named by a job uuid,
    lower case, as ``run`` names them)."""
    return sorted(name for name in names if is_valid_uuid(name) and name == name.lower())


def format_size(size: int | None) -> str:
    """``12.3 MiB``; ``-`` when unknown."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


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


def file_url_path(url: str) -> Path | None:
    """The directory of a ``file://`` URL (as duplicity reads it), else None."""
    if not url.startswith("file://"):
        return None
    return Path(url[len("file://") :])


def duplicity_interpreter(executable: str | None = None) -> list[str]:
    """The interpreter (argv) of the duplicity script, from its ``#!`` line."""
    program = executable or duplicity.find_executable()
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
    plain_url, password = duplicity.split_password(url)
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


# -- where a job's backups are ---------------------------------------------------------
@dataclass(frozen=True)
class BackupSource:
    """One job's collection on one backend, and how to read it."""

    job_uuid: str
    backend_url: str  # the backend root; the collection is <backend_url>/<job_uuid>
    target: duplicity.Target
    #: The job as defined here (None: found on a backend only).
    job: Job | None = None

    @property
    def url(self) -> str:
        return job_backend_url(self.backend_url, self.job_uuid)

    @property
    def display_url(self) -> str:
        return self.target.display_url


def backend_target(
    config: Config, backend_url: str, job_uuid: str, encrypted: bool | None
) -> duplicity.Target:
    """A Target for a job known only from the backend (no job definition here).

    Encryption follows the files on the backend; keys, GnuPG home and
    passphrase come from virt-dup.yml (decryption needs the secret key in
    the GnuPG home, nothing else).
    """
    defaults = config.defaults
    if encrypted is None:
        encrypted = (defaults.encryption or "gpg") == "gpg"
    return duplicity.Target(
        url=job_backend_url(backend_url, job_uuid),
        archive_dir=config.cache_directory,
        name=job_uuid,
        encryption="gpg" if encrypted else "none",
        encrypt_keys=(defaults.encryption_keys or config.encryption.keys) if encrypted else (),
        sign_key=config.encryption.sign_key if encrypted else None,
        gnupg_home=config.encryption.gnupg_home,
        passphrase=read_passphrase(config),
    )


def source_for_job(config: Config, job: Job) -> BackupSource:
    """The collection of a job defined here (its first backend, as ``run`` writes it)."""
    options = job.options.over(config.defaults)
    if not options.backends:
        raise ConfigError(
            f"job {job.uuid}: no backend: set backends on the job or defaults.backends in "
            f"{config.path}"
        )
    backend_url = config.backend_url(options.backends[0])
    target = duplicity_target(config, job, options, backend_url)
    return BackupSource(job.uuid, backend_url, target, job)


def backend_sources(config: Config, backend_url: str) -> list[BackupSource]:
    """Every job collection on the backend ``backend_url`` (no libvirt, no local state)."""
    names = job_directories(list_backend(backend_url))
    sources = []
    for job_uuid in names:
        entries = list_backend(job_backend_url(backend_url, job_uuid))
        target = backend_target(config, backend_url, job_uuid, encrypted_on_backend(entries))
        sources.append(BackupSource(job_uuid, backend_url, target))
    return sources


def configured_backend_urls(config: Config) -> list[str]:
    """The backends virt-dup.yml names (default backends first), without repeats."""
    urls: list[str] = []
    for name in (*(config.defaults.backends or ()), *config.backends):
        url = config.backend_url(name)
        if url not in urls:
            urls.append(url)
    return urls


def local_sources(config: Config, hypervisor: Hypervisor, domain_or_job: str) -> list[BackupSource]:
    """The collections of a job (by uuid) or of every job of a domain defined here.

    Raises :class:`NotFoundError` when neither exists here.
    """
    if is_valid_uuid(domain_or_job.lower()):
        try:
            _domain, job = hypervisor.find_job(domain_or_job)
            return [source_for_job(config, job)]
        except NotFoundError:
            pass
    domain = hypervisor.domain(domain_or_job)
    jobs = hypervisor.jobs(domain)
    if not jobs:
        raise NotFoundError(f"domain {domain.name()} has no virt-dup jobs")
    return [source_for_job(config, job) for job in jobs]


def sources_on_backends(
    config: Config,
    backend_urls: Sequence[str],
    domain_or_job: str | None,
    report: Callable[[str], None] | None = None,
) -> list[tuple[BackupSource, BackupMetadata | None]]:
    """Jobs on the backends whose latest manifest names ``domain_or_job`` (a domain
    name or uuid, or the job uuid), with that manifest; every job when ``None``.

    A job whose metadata cannot be read is kept (metadata ``None``) only when
    no filter is given.
    """
    found: list[tuple[BackupSource, BackupMetadata | None]] = []
    wanted = domain_or_job.lower() if domain_or_job else None
    for backend_url in backend_urls:
        for source in backend_sources(config, backend_url):
            if wanted is not None and source.job_uuid == wanted:
                found.append((source, latest_metadata(config, source, report)))
                continue
            try:
                metadata = latest_metadata(config, source, report)
            except VirtDupError as error:
                if wanted is None:
                    log.warning("job %s on %s: %s", source.job_uuid, backend_url, error)
                    found.append((source, None))
                continue
            manifest = metadata.manifest
            if wanted is None or wanted in (manifest.domain_name.lower(), manifest.domain_uuid):
                found.append((source, metadata))
    return found


# -- backup sets -------------------------------------------------------------------------
@dataclass(frozen=True)
class BackupEntry:
    """One restorable point of a job."""

    id: str
    time: datetime
    kind: str  # full, incremental
    chain: str  # id of the chain's full backup
    volumes: int
    encrypted: bool
    size: int | None
    disks: tuple[ManifestDisk, ...] | None  # None: metadata not read

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time.isoformat(),
            "type": self.kind,
            "chain": self.chain,
            "volumes": self.volumes,
            "encrypted": self.encrypted,
            "size": self.size,
            "disks": None
            if self.disks is None
            else [
                {"target": disk.target, "files": [entry.path for entry in disk.selected]}
                for disk in self.disks
            ],
        }


def collection(source: BackupSource) -> duplicity.Collection:
    return duplicity.collection_status(source.target)


def backup_entries(
    status: duplicity.Collection,
    sizes: Mapping[tuple[str, str], int | None],
    disks_of: Callable[[str], tuple[ManifestDisk, ...] | None],
) -> list[BackupEntry]:
    """The backup sets of ``status``, oldest first, as :class:`BackupEntry`."""
    entries = []
    for chain in status.chains:
        for backup_set in chain.sets:
            entries.append(
                BackupEntry(
                    id=backup_set.id,
                    time=backup_set.time,
                    kind=backup_set.kind,
                    chain=chain.full.id,
                    volumes=backup_set.volumes,
                    encrypted=backup_set.encrypted,
                    size=sizes.get((backup_set.kind, backup_set.id)),
                    disks=disks_of(backup_set.id),
                )
            )
    return entries


def list_backups(
    config: Config,
    source: BackupSource,
    report: Callable[[str], None] | None = None,
) -> list[BackupEntry]:
    """Every restorable point of the job, oldest first, with sizes and disks."""
    status = collection(source)
    try:
        listing = list_backend(
            source.url, duplicity.environment(source.target), duplicity.secrets(source.target)
        )
    except CommandError as error:
        log.warning("cannot list %s for sizes: %s", source.display_url, error)
        listing = {}
    sizes = set_sizes(listing)
    folder_hint: list[str | None] = [None]

    def disks_of(backup_id: str) -> tuple[ManifestDisk, ...] | None:
        try:
            metadata = fetch_metadata(config, source, backup_id, folder_hint[0], report=report)
        except VirtDupError as error:
            log.warning("backup %s of job %s: %s", backup_id, source.job_uuid, error)
            return None
        folder_hint[0] = metadata.folder
        return metadata.manifest.disks

    return backup_entries(status, sizes, disks_of)


def choose_backup(status: duplicity.Collection, backup_id: str | None) -> duplicity.BackupSet:
    """The backup set ``backup_id`` (duplicity's time string), or the latest.

    Raises :class:`BackupNotFound` listing what exists.
    """
    sets = status.backup_sets
    if not sets:
        raise BackupNotFound("no backups yet")
    if backup_id is None or backup_id == "latest":
        return max(sets, key=lambda backup_set: backup_set.time)
    for backup_set in sets:
        if backup_set.id == backup_id:
            return backup_set
    known = ", ".join(backup_set.id for backup_set in sets[-5:])
    raise BackupNotFound(f"no backup {backup_id} (the latest: {known}; see 'virt-dup backups')")


# -- the metadata folder of a backup ------------------------------------------------------
def metadata_cache(config: Config, job_uuid: str, backup_id: str) -> Path:
    """Where the metadata of one backup is kept once read (backups never change)."""
    return config.cache_directory / "metadata" / job_uuid / backup_id


def _read_metadata_folder(folder: Path, where: str, original: str) -> BackupMetadata:
    try:
        manifest_text = (folder / MANIFEST).read_text(encoding="utf-8")
        domain_xml = (folder / DOMAIN_XML).read_text(encoding="utf-8")
    except OSError as error:
        raise VirtDupError(
            f"{where}: incomplete metadata: {error.strerror}: {error.filename}"
        ) from None
    return BackupMetadata(parse_manifest(manifest_text, where), domain_xml, original)


def metadata_folder_in(files: Iterable[duplicity.ListedFile], job_uuid: str) -> str | None:
    """The metadata folder (absolute path) among a backup's files, or None."""
    for listed in files:
        path = PurePosixPath("/", listed.path)
        if (
            path.name == MANIFEST
            and path.parent.name == job_uuid
            and path.parent.parent.name == "metadata"
        ):
            return str(path.parent)
    return None


def fetch_metadata(
    config: Config,
    source: BackupSource,
    backup_id: str,
    folder_hint: str | None = None,
    *,
    use_cache: bool = True,
    report: Callable[[str], None] | None = None,
) -> BackupMetadata:
    """The metadata folder of backup ``backup_id``, restored from the backend.

    The folder is wherever the backed-up host's state dir was; ``folder_hint``
    (a folder found in another backup of the job, or this host's) is tried
    first, then the backup's file list says.  The result is cached; with
    ``use_cache=False`` (verify) it is always read from the backend.
    Raises :class:`BackupNotFound` or :class:`CommandError`.
    """
    cache = metadata_cache(config, source.job_uuid, backup_id)
    if use_cache and (cache / MANIFEST).is_file() and (cache / "folder").is_file():
        try:
            return _read_metadata_folder(cache, f"{cache}", (cache / "folder").read_text().strip())
        except VirtDupError as error:
            log.debug("ignoring the cached metadata: %s", error)
    local_folder = str(config.state_directory / "metadata" / source.job_uuid)
    candidates = [folder for folder in (folder_hint, local_folder) if folder]
    if report is not None:
        report(f"reading the metadata of backup {backup_id} of job {source.job_uuid}")
    with tempfile.TemporaryDirectory(prefix="virt-dup-metadata-") as scratch:
        destination = Path(scratch) / "metadata"
        folder = None
        for candidate in dict.fromkeys(candidates):
            if _restore_folder(source, backup_id, candidate, destination):
                folder = candidate
                break
        if folder is None:
            listed = duplicity.list_files(source.target, time=backup_id)
            folder = metadata_folder_in(listed, source.job_uuid)
            if folder is None or not _restore_folder(source, backup_id, folder, destination):
                raise BackupNotFound(
                    f"backup {backup_id} on {source.display_url} holds no virt-dup metadata "
                    f"(no */metadata/{source.job_uuid}/{MANIFEST}): not a virt-dup backup?"
                )
        metadata = _read_metadata_folder(
            destination, f"backup {backup_id} on {source.display_url}", folder
        )
        _cache_metadata(cache, destination, folder)
    if metadata.manifest.job_uuid != source.job_uuid:
        raise VirtDupError(
            f"backup {backup_id} on {source.display_url}: its manifest is of job "
            f"{metadata.manifest.job_uuid}, not {source.job_uuid}"
        )
    return metadata


def latest_metadata(
    config: Config, source: BackupSource, report: Callable[[str], None] | None = None
) -> BackupMetadata:
    """The metadata of the job's latest backup."""
    latest = choose_backup(collection(source), None)
    return fetch_metadata(config, source, latest.id, report=report)


def _restore_folder(source: BackupSource, backup_id: str, folder: str, destination: Path) -> bool:
    """Restore ``folder`` of the backup into ``destination``; False when it is not there."""
    try:
        duplicity.restore(source.target, destination, time=backup_id, path_to_restore=folder)
    except CommandError as error:
        cause = error.__cause__
        if (
            isinstance(cause, CommandFailed)
            and cause.returncode == duplicity.DuplicityExit.RESTORE_PATH_NOT_FOUND
        ):
            shutil.rmtree(destination, ignore_errors=True)
            return False
        raise
    return (destination / MANIFEST).is_file()


def _cache_metadata(cache: Path, restored: Path, folder: str) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in (MANIFEST, DOMAIN_XML, CHECKSUMS):
            if (restored / name).is_file():
                write_atomically(cache / name, (restored / name).read_text(encoding="utf-8"))
        write_atomically(cache / "folder", folder + "\n")
    except OSError as error:  # a cache is a convenience
        log.debug("cannot cache metadata in %s: %s", cache, error)


# -- which collections a command means ------------------------------------------------
def find_sources(
    config: Config,
    hypervisor: Callable[[], Hypervisor],
    domain_or_job: str | None,
    *,
    backend_url: str | None = None,
    job_uuid: str | None = None,
    report: Callable[[str], None] | None = None,
) -> list[tuple[BackupSource, BackupMetadata | None]]:
    """The job collections ``domain_or_job`` (a domain name or uuid, or a job uuid) means.

    With ``backend_url``: the jobs on that backend whose latest manifest
    names it (every job when it is ``None``), without libvirt or local state.
    Without: the jobs of the domain (or the job) defined here; when it is not
    defined here (or libvirt does not answer), the jobs found on every
    backend of virt-dup.yml.
    ``job_uuid`` keeps only that job.  Raises :class:`NotFoundError`.
    """
    wanted_job = job_uuid.lower() if job_uuid else None
    if backend_url is not None or domain_or_job is None:
        urls = [backend_url] if backend_url is not None else configured_backend_urls(config)
        if not urls:
            raise ConfigError(f"{config.path} defines no backend: give --backend URL")
        found = sources_on_backends(config, urls, domain_or_job, report)
        where = ", ".join(urls)
    else:
        try:
            found = [
                (source, None) for source in local_sources(config, hypervisor(), domain_or_job)
            ]
            where = "this host"
        except (NotFoundError, LibvirtError) as error:
            # Not defined here, or no libvirt to ask (a fresh host): the backends know.
            urls = configured_backend_urls(config)
            if not urls:
                raise
            if report is not None:
                report(f"{error}; looking for it on {', '.join(urls)}")
            found = sources_on_backends(config, urls, domain_or_job, report)
            where = ", ".join(urls)
    if wanted_job is not None:
        found = [(source, metadata) for source, metadata in found if source.job_uuid == wanted_job]
    if not found:
        what = f"job {job_uuid} of " if job_uuid else ""
        raise BackupNotFound(f"no backups of {what}{domain_or_job or 'any job'} on {where}")
    return found


def one_source(
    found: Sequence[tuple[BackupSource, BackupMetadata | None]], what: str
) -> tuple[BackupSource, BackupMetadata | None]:
    """The only job of ``found``; a usage error listing them when there are several."""
    if len(found) == 1:
        return found[0]
    jobs = ", ".join(source.job_uuid for source, _metadata in found)
    raise UsageError(f"{what} has several jobs ({jobs}): choose one with --job JOB_UUID")
