"""The SHA-256 of image files, remembered by file identity between runs.

The manifest records the SHA-256 of every file a backup holds (a restore
checks each file against it).  A base image under a running guest's top
does not change from one night to the next, and hashing it again is a whole
second read of it: the hash is reused while the file's identity is the same
(device, inode, size, modification and change time in nanoseconds).  Any
write to the file changes its mtime and ctime, and ctime cannot be set back
by anyone (a chmod, chown or relabel changes it too): then the file is
hashed again.  A hash is kept only when the identity did not change while
the file was read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from virt_dup.files import sha256_file, write_atomically

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

    def sha256(self, path: str) -> str:
        """The file's SHA-256: remembered when its identity is unchanged, else read."""
        before = identity(path)
        entry = self.known.get(path)
        if entry is not None and entry.get("identity") == list(before):
            digest = entry.get("sha256")
            if isinstance(digest, str) and len(digest) == 64:
                self.used[path] = entry
                return digest
        digest = self.hash_file(path)
        self.hashed.append(path)
        if identity(path) == before:
            self.used[path] = {"identity": list(before), "sha256": digest}
        return digest

    def save(self) -> None:
        """Keep the entries of this run's files (others are gone or not ours any more);
        a cache that cannot be written costs the next run a read, nothing else."""
        try:
            write_atomically(self.path, json.dumps(self.used, indent=1), mode=0o600)
        except OSError as error:
            log.warning("cannot remember checksums in %s: %s", self.path, error.strerror)
