"""What backups exist: jobs on a backend, their backup sets, and what each one holds.

A job's backups are one duplicity collection at ``<backend URL>/<job-uuid>``
(:func:`virt_dup.duplicity.target.job_backend_url`).  Each backup set holds the chain files
the job selected and the job's metadata folder (``manifest.json``,
``domain.xml``, ``SHA256SUMS``; see :mod:`virt_dup.backup.manifest`).

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

import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from virt_dup.backup.manifest import (
    CHECKSUMS,
    DOMAIN_XML,
    MANIFEST,
    Manifest,
    ManifestDisk,
    parse_manifest,
)
from virt_dup.config.load import Config
from virt_dup.duplicity.collection import BackupSet, Collection
from virt_dup.duplicity.copy import backup_sets
from virt_dup.duplicity.listing import (
    encrypted_on_backend,
    job_directories,
    list_backend,
    set_sizes,
    unencrypted_files,
)
from virt_dup.duplicity.protocol import ListedFile
from virt_dup.duplicity.runner import Duplicity, restore_path_missing, signature_refused
from virt_dup.duplicity.target import (
    CHANGES_DIRECTORY,
    Target,
    changes_target,
    environment,
    job_backend_url,
    job_target,
)
from virt_dup.duplicity.target import secrets as target_secrets
from virt_dup.duplicity.times import parse_time
from virt_dup.errors import (
    EXIT_NO_BACKUPS,
    CommandError,
    ConfigError,
    LibvirtError,
    NotFoundError,
    UsageError,
    VirtDupError,
)
from virt_dup.files import write_atomically
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.libvirt.metadata import Job, is_valid_uuid

log = logging.getLogger(__name__)


class BackupNotFound(NotFoundError):
    """No such job, backup or metadata on the backend."""


class NoBackups(BackupNotFound):
    """What was asked for has no backup at all (yet): exit code 3, not 2."""

    exit_code = EXIT_NO_BACKUPS


class SignatureNotVerified(VirtDupError):
    """A backup read from a backend is not signed by ``encryption.sign_key``
    (or cannot be: unencrypted), and ``restore.require_signature`` or
    duplicity refused it."""


@dataclass(frozen=True)
class BackupMetadata:
    """The metadata folder of one backup: its manifest and the domain's saved XML."""

    manifest: Manifest
    domain_xml: str
    #: Where the folder was on the backed-up host (``<state_dir>/metadata/<job>``).
    folder: str


# -- where a job's backups are ---------------------------------------------------------
@dataclass(frozen=True)
class BackupSource:
    """One job's collection on one backend, and how to read it."""

    job_uuid: str
    backend_url: str  # the backend root; the collection is <backend_url>/<job_uuid>
    target: Target
    #: The job as defined here (None: found on a backend only).
    job: Job | None = None
    #: Every read must be signed by the target's sign key (``restore.require_signature``).
    require_signature: bool = False
    #: How duplicity is run to read it.
    runner: Duplicity = field(default_factory=Duplicity, compare=False)
    #: A collection below the job's (``changes``: its changed-block sets), or "".
    part: str = ""

    @property
    def url(self) -> str:
        collection = job_backend_url(self.backend_url, self.job_uuid)
        return f"{collection}/{self.part}" if self.part else collection

    @property
    def display_url(self) -> str:
        return self.target.display_url

    def restore(
        self, destination: str | os.PathLike[str], *, time: str, path_to_restore: str
    ) -> None:
        """Restore ``path_to_restore`` of the backup at ``time`` to ``destination``:
        every read of a backup's contents goes through here.

        With :attr:`require_signature`, the collection is first checked to hold
        only encrypted files (:meth:`check_signable`), and duplicity gets the
        sign key, so it refuses a volume not signed by it.  A refused
        signature raises :class:`SignatureNotVerified` (one line naming the
        job and the backend); duplicity may have written part of the file to
        ``destination`` by then (it checks a volume's signature when it has
        read it): the caller removes it.  Raises :class:`CommandError` too.
        """
        if self.require_signature:
            self.check_signable()
        try:
            self.runner.restore(
                self.target, destination, time=time, path_to_restore=path_to_restore
            )
        except CommandError as error:
            if signature_refused(error):
                said = str(error)
                detail = said.partition("the signature did not verify: ")[2] or said
                raise SignatureNotVerified(
                    f"job {self.job_uuid}: backup {time} on {self.display_url}: the signature "
                    f"did not verify: {detail}; refused, it is not known to be genuine"
                ) from error
            raise

    def check_signable(self) -> None:
        """Raises :class:`SignatureNotVerified` unless every read of this collection
        can be signature-checked: the target decrypts with a sign key, and the
        backend holds no unencrypted backup file (duplicity reads those as plain
        data, unchecked, whatever ``--sign-key`` says).

        The backend is listed just before each read, so the window in which a
        file could be swapped for a plain one is that of one duplicity start.
        """
        where = f"job {self.job_uuid} on {self.display_url}"
        if self.target.encryption != "gpg" or not self.target.sign_key:
            raise SignatureNotVerified(
                f"{where}: the backups are not encrypted (encryption: none, or no "
                "encrypted file on the backend), so no signature can verify; "
                "restore.require_signature refuses them"
            )
        plain = unencrypted_files(
            list_backend(self.url, environment(self.target), target_secrets(self.target))
        )
        if plain:
            files = (
                f"{plain[0]} and {len(plain) - 1} more are" if len(plain) > 1 else f"{plain[0]} is"
            )
            raise SignatureNotVerified(
                f"{where}: {files} not encrypted, so no signature can verify; "
                "restore.require_signature refuses the collection"
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
    target = job_target(config, job.uuid, options, backend_url, writing=False)
    return BackupSource(
        job.uuid, backend_url, target, job, require_signature=config.restore.require_signature
    )


def backend_sources(config: Config, backend_url: str) -> list[BackupSource]:
    """Every job collection on the backend ``backend_url`` (no libvirt, no local state)."""
    password = config.backend_settings_of(backend_url).password(f"{config.path}: backends")
    variables = {} if password is None else {"FTP_PASSWORD": password}
    hidden = () if password is None else (password,)
    names = job_directories(list_backend(backend_url, variables, hidden))
    sources = []
    for job_uuid in names:
        entries = list_backend(job_backend_url(backend_url, job_uuid), variables, hidden)
        encrypted = encrypted_on_backend(entries)
        if encrypted is None:
            encrypted = (config.defaults.encryption or "gpg") == "gpg"
        options = replace(config.defaults, encryption="gpg" if encrypted else "none")
        target = job_target(config, job_uuid, options, backend_url, writing=False)
        sources.append(
            BackupSource(
                job_uuid,
                backend_url,
                target,
                require_signature=config.restore.require_signature,
            )
        )
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
                if wanted is None or isinstance(error, SignatureNotVerified):
                    # A refused signature is worth saying even when it hides the job sought.
                    log.warning("job %s on %s: %s", source.job_uuid, backend_url, error)
                if wanted is None:
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


def collection(source: BackupSource) -> Collection:
    return source.runner.collection_status(source.target)


def backup_entries(
    status: Collection,
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
            source.url, environment(source.target), target_secrets(source.target)
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

    entries = backup_entries(status, sizes, disks_of)
    changes = changes_sets(source)
    if changes:
        part = changes_source(source)
        try:
            part_sizes = set_sizes(
                list_backend(part.url, environment(part.target), target_secrets(part.target))
            )
        except CommandError:
            part_sizes = {}

        def changed_disks(backup_id: str) -> tuple[ManifestDisk, ...] | None:
            try:
                return fetch_metadata(
                    config, part, backup_id, folder_hint[0], report=report
                ).manifest.disks
            except VirtDupError as error:
                log.warning("backup %s of job %s: %s", backup_id, source.job_uuid, error)
                return None

        chains = [(chain.start_time, chain.full.id) for chain in status.chains]
        for backup_set in changes:
            chain = max((c for c in chains if c[0] <= backup_set.time), default=(None, "?"))[1]
            entries.append(
                BackupEntry(
                    id=backup_set.id,
                    time=backup_set.time,
                    kind="changes",
                    chain=chain,
                    volumes=backup_set.volumes,
                    encrypted=backup_set.encrypted,
                    size=part_sizes.get(("full", backup_set.id)),
                    disks=changed_disks(backup_set.id),
                )
            )
        entries.sort(key=lambda entry: entry.time)
    return entries


def changes_source(source: BackupSource) -> BackupSource:
    """The collection of ``source``'s changed-block sets (docs/changed-blocks.md)."""
    return replace(source, target=changes_target(source.target), part=CHANGES_DIRECTORY)


def changes_sets(source: BackupSource) -> list[BackupSet]:
    """The job's changed-block sets (whole ones: with their manifest), oldest
    first, from a listing of their collection; none when it has none."""
    part = changes_source(source)
    try:
        # Asked of the job's own directory first: a job that never read changed
        # blocks has no such collection (and listing one would make it).
        if CHANGES_DIRECTORY not in list_backend(
            source.url, environment(source.target), target_secrets(source.target)
        ):
            return []
        names = list_backend(part.url, environment(part.target), target_secrets(part.target))
    except CommandError as error:
        log.warning("cannot list the changed-block sets on %s: %s", part.display_url, error)
        return []
    found = [entry for entry in backup_sets(list(names)).values() if entry.manifest]
    return [
        BackupSet(
            "changes",
            parse_time(entry.end),
            len(entry.volumes),
            bool(entry.manifest and entry.manifest.endswith(".gpg")),
        )
        for entry in sorted(found, key=lambda entry: entry.end)
    ]


@dataclass(frozen=True)
class Point:
    """A restorable point: the set whose files a restore reads (``read_id``, of
    the job's main collection), and the changed-block sets applied onto them,
    oldest first (none for a point that is a set of the main collection)."""

    id: str
    read_id: str
    metadata: BackupMetadata
    deltas: tuple[tuple[str, BackupMetadata], ...] = ()


#: No chain of changed-block sets is longer (a loop in their links is refused).
MAX_DELTAS = 100_000


def choose_point(
    config: Config,
    source: BackupSource,
    backup_id: str | None,
    folder_hint: str | None = None,
    *,
    use_cache: bool = True,
    report: Callable[[str], None] | None = None,
) -> Point:
    """The point ``backup_id`` (or the latest) of the job, in its main collection or
    among its changed-block sets, with what restoring it reads.

    Raises :class:`BackupNotFound` when it, or a set it builds on, is gone.
    """
    main = collection(source)
    changes = changes_sets(source)
    chosen = choose_backup(Collection(main.chains), backup_id, extra=changes)
    return point_of(
        config, source, chosen, main, changes, folder_hint, use_cache=use_cache, report=report
    )


def point_of(
    config: Config,
    source: BackupSource,
    chosen: BackupSet,
    main: Collection,
    changes: Sequence[BackupSet],
    folder_hint: str | None = None,
    *,
    use_cache: bool = True,
    report: Callable[[str], None] | None = None,
) -> Point:
    """The point of the set ``chosen``: its metadata and, for a changed-block set,
    the base and the sets between (see :func:`choose_point`)."""
    if chosen.kind != "changes":
        return Point(
            chosen.id,
            chosen.id,
            fetch_metadata(
                config, source, chosen.id, folder_hint, use_cache=use_cache, report=report
            ),
        )
    part = changes_source(source)
    known = {backup_set.id for backup_set in changes}
    deltas: list[tuple[str, BackupMetadata]] = []
    current = chosen.id
    while len(deltas) < MAX_DELTAS:
        metadata = fetch_metadata(
            config, part, current, folder_hint, use_cache=use_cache, report=report
        )
        changes_info = metadata.manifest.changes
        if changes_info is None:
            raise BackupNotFound(
                f"backup {current} on {part.display_url} is not a changed-block set"
            )
        if deltas and changes_info.base_set != deltas[-1][1].manifest.changes.base_set:  # type: ignore[union-attr]
            raise BackupNotFound(f"backup {current}: it applies to another base than {chosen.id}")
        deltas.append((current, metadata))
        if changes_info.previous_set == changes_info.base_set:
            break
        if changes_info.previous_set not in known:
            raise BackupNotFound(
                f"backup {chosen.id}: the changed-block set {changes_info.previous_set} it "
                "builds on is gone"
            )
        current = changes_info.previous_set
    else:
        raise BackupNotFound(f"backup {chosen.id}: its changed-block sets do not end in a base")
    base_id = deltas[-1][1].manifest.changes.base_set  # type: ignore[union-attr]
    if base_id not in {backup_set.id for backup_set in main.backup_sets}:
        raise BackupNotFound(f"backup {chosen.id}: the backup {base_id} it builds on is gone")
    base = fetch_metadata(config, source, base_id, folder_hint, use_cache=use_cache, report=report)
    latest = deltas[0][1]
    # The plan is the base's (its files); the domain as it was at the point.
    shown = replace(base, domain_xml=latest.domain_xml)
    return Point(chosen.id, base_id, shown, tuple(reversed(deltas)))


def choose_backup(
    status: Collection, backup_id: str | None, extra: Sequence[BackupSet] = ()
) -> BackupSet:
    """The backup set ``backup_id`` (duplicity's time string), or the latest.

    Raises :class:`BackupNotFound` listing what exists.
    """
    sets = (*status.backup_sets, *extra)
    if not sets:
        raise NoBackups("no backups yet")
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


#: The metadata files of a backup are small; a larger one is not virt-dup's.
_MAX_METADATA_BYTES = 64 * 2**20


def keep_own_metadata(config: Config, job_uuid: str, backup_id: str, folder: Path) -> None:
    """After a run's set ``backup_id`` is on the backend: the metadata folder the
    run wrote and backed up into it (``folder``, byte for byte what the set
    holds) goes into the metadata cache, so a restore on this host reads no
    metadata from the backend (a changed-block point needs its base's and
    every set's since: two duplicity starts per set otherwise).

    Recorded as read unchecked: with ``restore.require_signature`` a restore
    still reads the backend's, checking the signature; ``verify`` never reads
    the cache.  A failure is logged, never raised (a cache is a convenience).
    """
    _cache_metadata(
        metadata_cache(config, job_uuid, backup_id), folder, os.path.realpath(folder), None
    )


def _read_metadata_file(path: Path, where: str) -> str:
    """One file of a metadata folder restored from a backend: a regular file (a
    symbolic link could name any file of this host, a FIFO would block),
    bounded, UTF-8.  Raises :class:`VirtDupError`."""
    try:
        with open(path, "rb", opener=_no_follow) as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise VirtDupError(f"{where}: {path.name} in the backup is not a regular file")
            if status.st_size > _MAX_METADATA_BYTES:
                raise VirtDupError(
                    f"{where}: {path.name} in the backup is {status.st_size} bytes; refused"
                )
            return file.read(_MAX_METADATA_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError:
        raise VirtDupError(f"{where}: {path.name} in the backup is not UTF-8 text") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise VirtDupError(
                f"{where}: {path.name} in the backup is a symbolic link; refused"
            ) from None
        raise VirtDupError(
            f"{where}: incomplete metadata: {error.strerror}: {error.filename}"
        ) from None


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)


def _read_metadata_folder(folder: Path, where: str, original: str) -> BackupMetadata:
    manifest_text = _read_metadata_file(folder / MANIFEST, where)
    domain_xml = _read_metadata_file(folder / DOMAIN_XML, where)
    return BackupMetadata(parse_manifest(manifest_text, where), domain_xml, original)


def metadata_folder_in(files: Iterable[ListedFile], job_uuid: str) -> str | None:
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
    if use_cache and (cache / MANIFEST).is_file() and _cache_trusted(cache, source):
        try:
            return _read_metadata_folder(cache, f"{cache}", (cache / "folder").read_text().strip())
        except VirtDupError as error:
            log.debug("ignoring the cached metadata: %s", error)
    local_folder = os.path.realpath(config.state_directory / "metadata" / source.job_uuid)
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
            listed = source.runner.list_files(source.target, time=backup_id)
            folder = metadata_folder_in(listed, source.job_uuid)
            if folder is None or not _restore_folder(source, backup_id, folder, destination):
                raise BackupNotFound(
                    f"backup {backup_id} on {source.display_url} holds no virt-dup metadata "
                    f"(no */metadata/{source.job_uuid}/{MANIFEST}): not a virt-dup backup?"
                )
        metadata = _read_metadata_folder(
            destination, f"backup {backup_id} on {source.display_url}", folder
        )
        signed_by = source.target.sign_key if source.require_signature else None
        _cache_metadata(cache, destination, folder, signed_by)
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
        source.restore(destination, time=backup_id, path_to_restore=folder)
    except CommandError as error:
        if restore_path_missing(error):
            shutil.rmtree(destination, ignore_errors=True)
            return False
        raise
    return (destination / MANIFEST).is_file()


#: In a metadata cache: the sign key duplicity checked the metadata's volumes against.
_SIGNED_BY = "signed-by"


def _cache_trusted(cache: Path, source: BackupSource) -> bool:
    """Whether the cached metadata may stand in for a read of the backend: it is
    complete and, when every read must be signed, was read checking the same key
    (a cache filled before ``restore.require_signature`` was set proves nothing)."""
    if not (cache / "folder").is_file():
        return False
    if not source.require_signature:
        return True
    try:
        return (cache / _SIGNED_BY).read_text().strip() == source.target.sign_key
    except OSError:
        return False


def _cache_metadata(cache: Path, restored: Path, folder: str, signed_by: str | None) -> None:
    """Keep what was restored; ``signed_by``: the key duplicity checked its volumes
    against (None: unchecked)."""
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in (MANIFEST, DOMAIN_XML, CHECKSUMS):
            if os.path.lexists(restored / name):
                write_atomically(cache / name, _read_metadata_file(restored / name, str(cache)))
        if signed_by is not None:
            write_atomically(cache / _SIGNED_BY, signed_by + "\n")
        else:
            (cache / _SIGNED_BY).unlink(missing_ok=True)
        write_atomically(cache / "folder", folder + "\n")
    except (OSError, VirtDupError) as error:  # a cache is a convenience
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
    if backend_url is not None:
        backend_url = config.backend_url(backend_url)  # a name of virt-dup.yml, or the URL
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
        raise NoBackups(f"no backups of {what}{domain_or_job or 'any job'} on {where}")
    return found


def one_source(
    found: Sequence[tuple[BackupSource, BackupMetadata | None]], what: str
) -> tuple[BackupSource, BackupMetadata | None]:
    """The only job of ``found``; a usage error listing them when there are several."""
    if len(found) == 1:
        return found[0]
    jobs = ", ".join(source.job_uuid for source, _metadata in found)
    raise UsageError(f"{what} has several jobs ({jobs}): choose one with --job JOB_UUID")
