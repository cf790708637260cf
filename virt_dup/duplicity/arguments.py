"""duplicity's command lines, built as tuples (pure; tested by equality).

**Source directory.**  duplicity refuses an incremental whose source directory
differs from the chain's (exit 42, "source mismatch"), and the files a job
backs up (chain files, the metadata folder) live in different directories
and change between runs.  So the source is always ``/`` and the files are
selected with ``--include PATH ... --exclude '**'``: the source is the same
on every run and restores see the absolute paths (``var/lib/...``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import PurePosixPath

from virt_dup.config.options import split_password
from virt_dup.duplicity.target import Target
from virt_dup.duplicity.times import format_time


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
        if needs_no_passphrase(target):
            arguments.append("--use-agent")
    if not target.compression:
        # duplicity 3 also passes --compress-algo=none to gpg for this.
        arguments.append("--no-compression")
    if target.num_retries is not None:
        arguments += ["--num-retries", str(target.num_retries)]
    if target.retry_delay is not None:
        arguments += ["--backend-retry-delay", str(target.retry_delay)]
    if target.network_timeout is not None:
        arguments += ["--timeout", str(target.network_timeout)]
    if target.tempdir is not None:
        arguments += ["--tempdir", os.fspath(target.tempdir)]
    return tuple(arguments)


def needs_no_passphrase(target: Target) -> bool:
    """Whether gpg can do all ``target`` asks without a passphrase: encrypted to
    keys, nothing to sign, and no passphrase configured for their secret key
    (so a restore decrypts with an unprotected key, or not at all).

    Then duplicity gets ``--use-agent``: it hands gpg no (empty) passphrase and
    skips its start-up probe, a ``gpg --symmetric`` with loopback pinentry that
    every duplicity process runs otherwise (0.4 s here, measured; a run starts
    two or three).  With a passphrase to hand over, the loopback way stays.
    """
    return bool(target.encrypt_keys) and not target.sign_key and not target.passphrase


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
    log_fd: int | None = None,
) -> tuple[str, ...]:
    """argv (after the program) of a backup of ``include_paths`` from ``source_root``.

    ``full``: a full backup (a new chain); else an incremental one onto the
    newest chain, which must exist (duplicity fails with exit 17 otherwise).
    virt-dup decides which (:func:`~.collection.full_is_due`) and tells
    duplicity: it never decides again on its own.
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
    arguments: list[str] = ["full" if full else "incremental", *common_arguments(target)]
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
    return _deleting("remove-all-but-n-full", str(count), target, log_fd)


def remove_all_inc_of_but_n_full_arguments(
    target: Target, count: int, log_fd: int | None = None
) -> tuple[str, ...]:
    """argv that deletes the incrementals of all chains but the ``count`` newest
    (``incremental_retention``)."""
    _check_count(count)
    return _deleting("remove-all-inc-of-but-n-full", str(count), target, log_fd)


def remove_older_than_arguments(
    target: Target, age: str, log_fd: int | None = None
) -> tuple[str, ...]:
    """argv that deletes chains older than ``age`` (``max_age``: an interval such
    as ``6M``, or a time); duplicity never deletes the chain the latest backup
    needs."""
    return _deleting("remove-older-than", age, target, log_fd)


def _deleting(action: str, argument: str, target: Target, log_fd: int | None) -> tuple[str, ...]:
    """argv of a retention action: ``ACTION ARGUMENT --force`` (without
    ``--force`` duplicity only lists what it would delete)."""
    return (
        action,
        argument,
        "--force",
        *common_arguments(target),
        *_log_arguments(log_fd),
        _url(target),
    )


def cleanup_arguments(target: Target, log_fd: int | None = None) -> tuple[str, ...]:
    """argv that deletes what a failed run left on the backend (``cleanup --force``)."""
    return ("cleanup", "--force", *common_arguments(target), *_log_arguments(log_fd), _url(target))


def _time_arguments(time: str | datetime | None) -> tuple[str, ...]:
    if time is None:
        return ()
    return ("--time", format_time(time) if isinstance(time, datetime) else time)


def _check_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"a retention count must be at least 1, got {count}")
