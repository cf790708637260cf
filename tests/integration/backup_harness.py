"""Helpers for tests of ``virt-dup run`` against real libvirtd, QEMU, duplicity and gpg.

``BackupEnvironment`` is a virt-dup.yml with a file:// backend, a throw-away
GnuPG home and private state/cache directories, plus the ways a test drives
virt-dup (as a separate process, the way systemd does) and checks a backup
with *plain* duplicity (not virt-dup's adapter, so the check is independent).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


@dataclass
class BackupEnvironment:
    root: Path
    config: Path
    backend: Path
    state: Path
    cache: Path
    gnupg_home: Path
    fingerprint: str

    @classmethod
    def create(
        cls, root: Path, gnupg_home: Path, fingerprint: str, extra: str = ""
    ) -> BackupEnvironment:
        backend = root / "backend"
        state = root / "state"
        cache = root / "cache"
        config = root / "virt-dup.yml"
        config.write_text(
            "libvirt:\n  uri: qemu:///system\n"
            f"backends:\n  local: file://{backend}\n"
            f"encryption:\n  keys: [{fingerprint}]\n  gnupg_home: {gnupg_home}\n"
            f"state_dir: {state}\ncache_dir: {cache}\n"
            "defaults:\n  backends: [local]\n" + extra
        )
        return cls(root, config, backend, state, cache, gnupg_home, fingerprint)

    def virt_dup(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        finished = subprocess.run(
            [sys.executable, "-m", "virt_dup", "--config", str(self.config), *arguments],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and finished.returncode != 0:
            raise AssertionError(
                f"virt-dup {' '.join(arguments)} exited {finished.returncode}:\n{finished.stderr}"
            )
        return finished

    def start_run(self, *arguments: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "virt_dup", "--config", str(self.config), "run", *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    def job_url(self, job_uuid: str) -> str:
        return f"file://{self.backend}/{job_uuid}"

    def duplicity(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """Plain duplicity with the test key (no virt-dup code involved)."""
        environment = {**os.environ, "GNUPGHOME": str(self.gnupg_home), "PASSPHRASE": ""}
        finished = subprocess.run(
            [
                str(VENV_BIN / "duplicity"),
                *arguments,
                "--archive-dir",
                str(self.root / "plain-cache"),
            ],
            capture_output=True,
            text=True,
            check=False,
            env=environment,
        )
        if finished.returncode != 0:
            raise AssertionError(
                f"duplicity {arguments} failed:\n{finished.stdout}\n{finished.stderr}"
            )
        return finished

    def restore_all(self, job_uuid: str, destination: Path, time_: str | None = None) -> Path:
        """Restore the job's whole backup (latest or at ``time_``) with plain duplicity."""
        arguments = ["restore", self.job_url(job_uuid), str(destination)]
        if time_:
            arguments += ["--time", time_]
        self.duplicity(*arguments)
        return destination


def restored_path(destination: Path, original: Path) -> Path:
    """Where a file backed up from ``/`` lands in a restore of the whole backup."""
    return destination / os.fspath(original).lstrip("/")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def snapshot_files(files: list[Path], into: Path) -> dict[Path, Path]:
    """Copy files aside (the chain 'as it was when the run started')."""
    into.mkdir(parents=True, exist_ok=True)
    copies = {}
    for index, path in enumerate(files):
        copy = into / f"{index}-{path.name}"
        shutil.copyfile(path, copy)
        copies[path] = copy
    return copies


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
