"""The SHA-256 of image files, remembered by file identity between runs.

The manifest records the SHA-256 of every file a backup holds (a restore
checks each file against it).  A base image under a running guest's top
does not change from one night to the next, and hashing it again is a whole
second read of it: the hash is reused while the file's identity is the same
(device, inode, size, modification and change time in nanoseconds).  Any
write to the file changes its mtime and ctime, and ctime cannot be set back
by anyone (a chmod, chown or relabel changes it too): then the file is
hashed again.  A hash is kept only when the identity did not change while
the file was read.  The files to hash are read side by side where their disks
allow it (:func:`~virt_dup.files.sha256_files`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from virt_dup.files import sha256_file, sha256_files, write_atomically

log = logging.getLogger(__name__)

Identity = tuple[int, int, int, int, int]


def identity(path: str) -> Identity:
    status = os.stat(path)
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


class ChecksumCache:
    """Hashes of files by path and identity, in one JSON file of the state directory."""

    def __init__(self, path: Path, hash_file: Callable[[str], str] = sha256_file) -> None:
        self.path = path
        self.hash_file = hash_file
        self.known: dict[str, dict[str, object]] = {}
        self.used: dict[str, dict[str, object]] = {}
        self.hashed: list[str] = []  # the files read this time
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            loaded = {}
        if isinstance(loaded, dict):
            self.known = {k: v for k, v in loaded.items() if isinstance(v, dict)}

    def digests(self, paths: Iterable[str]) -> dict[str, str]:
        """Each file's SHA-256 (by path): remembered when its identity is unchanged,
        else read (side by side where the disks allow it)."""
        digests: dict[str, str] = {}
        unknown: dict[str, Identity] = {}
        for path in dict.fromkeys(paths):
            before = identity(path)
            entry = self.known.get(path) or {}
            digest = entry.get("sha256")
            remembered = isinstance(digest, str) and len(digest) == 64
            if remembered and entry.get("identity") == list(before):
                self.used[path] = entry
                digests[path] = str(digest)
            else:
                unknown[path] = before
        for path, digest in sha256_files(unknown, self.hash_file).items():
            self.hashed.append(path)
            if identity(path) == unknown[path]:
                self.used[path] = {"identity": list(unknown[path]), "sha256": digest}
            digests[path] = digest
        return digests

    def save(self) -> None:
        """Keep the entries of this run's files (others are gone or not ours any more);
        a cache that cannot be written costs the next run a read, nothing else."""
        try:
            write_atomically(self.path, json.dumps(self.used, indent=1), mode=0o600)
        except OSError as error:
            log.warning("cannot remember checksums in %s: %s", self.path, error.strerror)
