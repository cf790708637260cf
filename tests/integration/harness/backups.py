"""Helpers for tests of ``virt-dup run`` against real libvirtd, QEMU, duplicity and gpg.

``BackupEnvironment`` is a virt-dup.yml with a file:// backend, a throw-away
GnuPG home and private state/cache directories, plus the ways a test drives
virt-dup (as a separate process, the way systemd does) and checks a backup
with *plain* duplicity (not virt-dup's adapter, so the check is independent).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virt_dup.duplicity.collection import Collection
from virt_dup.duplicity.runner import Duplicity
from virt_dup.duplicity.target import Target

VENV_BIN = Path(sys.executable).parent

# add-job options for a test whose backend fails on purpose: duplicity gives up
# in seconds, not after the default five tries half a minute apart.
QUICK_FAILURE = ("--backend-retries", "2", "--backend-retry-delay", "1s", "--backend-timeout", "5s")


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
            # The whole-file path unless a test asks for changed blocks: what these
            # tests check of overlays and incrementals is that path's.
            "defaults:\n  backends: [local]\n  changed_blocks: off\n" + extra
        )
        return cls(root, config, backend, state, cache, gnupg_home, fingerprint)

    @property
    def process_environment(self) -> dict[str, str]:
        """virt-dup's environment with a temporary directory of its own: what a
        killed duplicity leaves there goes away with the test's directory."""
        temporary = self.root / "tmp"
        temporary.mkdir(exist_ok=True)
        return {**os.environ, "TMPDIR": str(temporary)}

    def virt_dup(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        finished = subprocess.run(
            [sys.executable, "-m", "virt_dup", "--config", str(self.config), *arguments],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            env=self.process_environment,
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
            env=self.process_environment,
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

    def backed_up_files(self, job_uuid: str) -> set[Path]:
        """The regular files in the job's latest backup (plain ``list-current-files``)."""
        listing = self.duplicity("list-current-files", self.job_url(job_uuid)).stdout
        paths = {
            Path("/", match.group(1))
            for match in re.finditer(r"^\w{3} \w{3} [ \d]\d [\d:]{8} \d{4} (.+)$", listing, re.M)
        }
        # Directories are listed too (var, var/lib...): keep only the leaves.
        return {path for path in paths if not any(path in other.parents for other in paths)}

    def collection(self, job_uuid: str) -> Collection:
        """The job's collection as duplicity's ``collection-status`` reports it, read
        with a cache of its own (not virt-dup's)."""
        target = Target(
            url=self.job_url(job_uuid),
            archive_dir=self.root / "plain-cache",
            name=f"plain-{job_uuid}",
            encrypt_keys=(self.fingerprint,),
            gnupg_home=self.gnupg_home,
        )
        return Duplicity().collection_status(target)

    def status(self, job_uuid: str) -> dict[str, Any]:
        """The job's status file (last run, last success, last error)."""
        loaded: dict[str, Any] = json.loads(
            (self.state / "status" / f"{job_uuid}.json").read_text()
        )
        return loaded

    def lock_path(self, domain_uuid: str) -> Path:
        """The domain's lock: the host's (virt-dup.yml's scope is system)."""
        return Path("/run/virt-dup/locks") / f"{domain_uuid}.lock"

    def run_record(self, domain_uuid: str) -> Path:
        """Where an unfinished run of the domain is recorded."""
        return self.state / "runs" / f"{domain_uuid}.json"

    def run_phase(self, domain_uuid: str) -> str | None:
        """The phase of the domain's run in flight (None: no run recorded)."""
        try:
            phase: str = json.loads(self.run_record(domain_uuid).read_text())["phase"]
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return phase


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


def children(pid: int) -> list[int]:
    """The pids of the processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def process_ended(pid: int) -> bool:
    """Gone, or a zombie (whoever adopted it has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def command_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


def backing_strings(images: Iterable[Path]) -> dict[Path, str | None]:
    """The backing file string each image's header records (None for a base)."""
    strings = {}
    for image in images:
        info = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(image)],
            capture_output=True,
            text=True,
            check=True,
        )
        strings[image] = json.loads(info.stdout).get("backing-filename")
    return strings


def file_digests(directory: Path) -> dict[Path, str]:
    """sha256 of every file under ``directory``."""
    return {path: sha256(path) for path in sorted(directory.rglob("*")) if path.is_file()}


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def fill(image: Path, pattern: int, offset: int, length: int) -> None:
    """Write ``length`` bytes of ``pattern`` at ``offset`` into an image no QEMU has open."""
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", str(image)],
        check=True,
        capture_output=True,
    )


def holds_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (a lock file, an image)."""
    try:
        return any(
            os.readlink(descriptor) == os.fspath(path)
            for descriptor in Path(f"/proc/{pid}/fd").iterdir()
        )
    except OSError:
        return False


def guest_view(top: Path, into: Path) -> Path:
    """What the guest sees of the chain under ``top`` now, as one flat qcow2."""
    into.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["qemu-img", "convert", "-U", "-O", "qcow2", str(top), str(into)],
        check=True,
        capture_output=True,
    )
    return into


def same_guest_view(first: Path, second: Path) -> bool:
    """``qemu-img compare``: identical contents as a guest reads them (chains followed)."""
    finished = subprocess.run(
        ["qemu-img", "compare", "-U", str(first), str(second)], capture_output=True, text=True
    )
    assert finished.returncode in (0, 1), finished.stderr
    return finished.returncode == 0


def use_backend(environment: BackupEnvironment, url: str, extra: str = "") -> None:
    """Point the environment's one named backend (``local``) at ``url``."""
    text = environment.config.read_text().replace(f"file://{environment.backend}", url)
    environment.config.write_text(text + extra)


def random_domain(make_domain: Any, tmp_path: Path, size: int) -> Any:
    """A running domain whose base holds ``size`` bytes of random data (uploads
    that take a few seconds; gpg cannot compress them)."""
    vm = make_domain(running=False, size=size + 16 * 2**20)
    base = vm.images["vda"][0]
    data = tmp_path / "random"
    data.write_bytes(os.urandom(size))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {data} 0 {size}", str(base)],
        check=True,
        capture_output=True,
    )
    data.unlink()
    vm.domain.create()
    return vm


def error_lines(stderr: str) -> list[str]:
    """virt-dup's error lines among what it printed."""
    return [line for line in stderr.splitlines() if line.startswith("virt-dup: error: ")]
