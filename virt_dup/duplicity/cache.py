"""A job's duplicity cache: what an interrupted backup leaves there and on the backend."""

from __future__ import annotations

import fcntl
import logging
import shutil
from pathlib import Path

from virt_dup.duplicity.collection import Collection
from virt_dup.duplicity.runner import Duplicity
from virt_dup.duplicity.target import Target

logger = logging.getLogger(__name__)


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


def discard_interrupted_backup(duplicity: Duplicity, target: Target) -> Collection:
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
    collection = duplicity.collection_status(target)
    if collection.incomplete_sets or collection.orphaned_sets:
        logger.warning(
            "deleting %d incomplete and %d orphaned backup set(s) from %s",
            collection.incomplete_sets,
            collection.orphaned_sets,
            target.display_url,
        )
        duplicity.cleanup(target)
        collection = duplicity.collection_status(target)
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
