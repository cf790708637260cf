"""One job's duplicity collection: where it lives, its cache, its keys; the environment.

Secrets (the GPG passphrase, a password in the backend URL) go to duplicity
in ``PASSPHRASE``/``SIGN_PASSPHRASE``/``FTP_PASSWORD`` only, never in argv,
and are masked in every log line and error.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from virt_dup.config.load import Config, read_passphrase
from virt_dup.config.options import (
    ENCRYPTION_MODES,
    JobOptions,
    interval_length,
    masked_url,
    split_password,
)
from virt_dup.errors import ConfigError

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
    ``volsize``: volume size in MiB.  ``num_retries``: how many times each
    backend operation is tried (``None``: duplicity's 5); ``retry_delay``:
    seconds between two tries (``None``: duplicity's 30); ``network_timeout``:
    seconds one network read or write may wait (``None``: duplicity's 30 for
    the backends that read it, and none at all for plain sockets: duplicity
    sets the socket default only when ``--timeout`` is given).  ``tempdir``:
    where volumes are staged (``None``: ``$TMPDIR``).
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
    retry_delay: int | None = None
    network_timeout: int | None = None
    tempdir: Path | None = None
    #: The backend's password from its password file (else one in ``url``).
    password: str | None = field(default=None, repr=False)

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
        if self.num_retries is not None and self.num_retries < 1:
            raise ConfigError(f"backend_retries: expected at least 1, got {self.num_retries}")
        if self.retry_delay is not None and self.retry_delay < 0:
            raise ConfigError(f"backend_retry_delay: expected 0s or more, got {self.retry_delay}")
        if self.network_timeout is not None and self.network_timeout < 1:
            # 0 would make every socket non-blocking
            raise ConfigError(f"backend_timeout: expected at least 1s, got {self.network_timeout}s")
        if self.volsize < 1:
            raise ConfigError(f"volsize: expected at least 1 (MiB), got {self.volsize}")

    @property
    def display_url(self) -> str:
        """The URL with any password replaced by ``***`` (for messages)."""
        return masked_url(self.url)


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
    password = backend_password(target)
    if password is not None:
        variables["FTP_PASSWORD"] = password
    return variables


def backend_password(target: Target) -> str | None:
    """The backend's password: its password file's, else the one in its URL."""
    return target.password if target.password is not None else split_password(target.url)[1]


def secrets(target: Target) -> tuple[str, ...]:
    """Values to mask wherever duplicity's command or output is shown."""
    values = (target.passphrase, backend_password(target))
    return tuple(value for value in values if value)


def job_backend_url(backend_url: str, job_uuid: str) -> str:
    """Each job is its own duplicity collection: a directory named by the job uuid.

    Jobs sharing a backend never mix their volumes, and ``virt-dup backups
    --backend URL`` finds every job on a backend by listing it.
    """
    return backend_url.rstrip("/") + "/" + job_uuid


def cache_name(job_uuid: str, options: JobOptions, config: Config, backend_url: str) -> str:
    """duplicity's ``--name`` (the cache directory) of a job's collection on ``backend_url``.

    duplicity makes its cache match the backend it is given, deleting what
    that backend lacks: a job's collections on several backends (its
    destinations, a migration's target, a ``--backend`` read) each need a
    cache of their own.  The first backend of the job keeps the plain job
    uuid, as before there were several.
    """
    backends = options.backends or ()
    if backends and config.backend_url(backends[0]) == backend_url:
        return job_uuid
    digest = hashlib.sha256(split_password(backend_url)[0].encode()).hexdigest()[:12]
    return f"{job_uuid}.{digest}"


def job_target(
    config: Config,
    job_uuid: str,
    options: JobOptions,
    backend_url: str,
    *,
    writing: bool = True,
) -> Target:
    """The duplicity side of a job: its collection on ``backend_url``, its cache
    and keys, from the job's effective ``options`` and virt-dup.yml.

    The one place a job's :class:`Target` is made.  ``writing``: the target
    backs up (encrypting needs a recipient key: :class:`ConfigError` when none
    is configured); reading alone needs only the secret key and its
    passphrase.
    """
    encryption = options.encryption or "gpg"
    keys: tuple[str, ...] = ()
    if encryption == "gpg":
        keys = options.encryption_keys or config.encryption.keys
        if not keys and writing:
            raise ConfigError(
                f"job {job_uuid}: backups are encrypted (encryption: gpg) but no key is "
                f"configured: set encryption.keys in {config.path} or encryption=none on the job"
            )
    name = cache_name(job_uuid, options, config, backend_url)
    return Target(
        url=job_backend_url(backend_url, job_uuid),
        # duplicity keeps its cache in <archive_dir>/<name>
        archive_dir=config.cache_directory,
        name=name,
        # Volumes are staged in the job's own cache, not /tmp: what a killed
        # duplicity leaves there is found and removed by the next run.
        tempdir=config.cache_directory / name,
        encryption=encryption,
        encrypt_keys=keys,
        sign_key=config.encryption.sign_key if encryption == "gpg" else None,
        gnupg_home=config.gnupg_directory,
        passphrase=read_passphrase(config),
        password=config.backend_settings_of(backend_url).password(f"{config.path}: backends"),
        num_retries=options.backend_retries,
        retry_delay=_seconds(options.backend_retry_delay),
        network_timeout=_seconds(options.backend_timeout),
    )


def _seconds(interval: str | None) -> int | None:
    return None if interval is None else int(interval_length(interval).total_seconds())


def isolated(target: Target, cache: Path) -> Target:
    """``target`` with a cache (and staging directory) of its own under ``cache``:
    read from the backend alone, untouched by a backup of the job meanwhile."""
    return replace(target, archive_dir=cache, tempdir=cache / target.name)


def file_url_path(url: str) -> Path | None:
    """The directory of a ``file://`` URL (as duplicity reads it), else None."""
    if not url.startswith("file://"):
        return None
    return Path(url[len("file://") :])


def local_directory_problem(url: str) -> str | None:
    """Why the directory of a ``file://`` URL cannot hold a collection, else None.

    duplicity makes a missing directory, but a path through a regular file
    (``file:///srv/backup.img/JOB``) fails every operation with ENOTDIR, and
    duplicity retries each one (5 times, 30 s apart): minutes for a mistake
    seen at once.  Only the nearest existing part of the path is looked at.
    """
    directory = file_url_path(url)
    if directory is None:
        return None
    for path in (directory, *directory.parents):
        if os.path.lexists(path):
            if not path.is_dir():
                return f"{path} is not a directory"
            return None
    return None


#: The changed-block sets of a job live in a collection of their own below its
#: own (docs/changed-blocks.md).
CHANGES_DIRECTORY = "changes"


def changes_target(target: Target) -> Target:
    """The collection of ``target``'s changed-block sets: ``<collection>/changes``
    with a cache of its own (``<name>.changes``)."""
    name = f"{target.name}.{CHANGES_DIRECTORY}"
    return replace(
        target,
        url=target.url.rstrip("/") + "/" + CHANGES_DIRECTORY,
        name=name,
        tempdir=target.archive_dir / name,
    )
