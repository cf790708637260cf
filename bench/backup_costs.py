#!/usr/bin/env python3
"""What a backup of a running domain costs: virt-dup's two read paths, bare
duplicity, cp and virtnbdbackup side by side (issue 14, part 1; with
``--profile``, part 5).

For each scenario (an image kind and size) a running domain (real libvirtd +
QEMU/KVM: the integration harness's throw-away domain) with one qcow2 disk,
and its *twin*: a second such domain on a copy of the same image that gets
the same guest writes, backed up by virtnbdbackup alone (virtnbdbackup
refuses to run while a domain has a checkpoint not its own, and the
changed-block job keeps one between its runs).  Two virt-dup jobs of the
first domain (depth 0, gpg to a throw-away key, ``--no-compression
--max-blocksize 4096``, file:// backend on the same disk, each job its own
collection there):

* ``virt-dup (whole)``, added with ``--changed-blocks off``: every
  incremental an overlay and duplicity's rsync delta of the whole image;
* ``virt-dup (changes)``, added with ``--changed-blocks auto``: its full reads
  the whole image (and makes a checkpoint), its incrementals are push-mode
  ``backup-begin`` reads of the clusters written since the last checkpoint,
  stored as sets of the job's ``changes`` collection (docs/changed-blocks.md).
  After each run the job's status file says how it read (``read``: whole or
  changes); an incremental of this job that read whole files stops the bench
  with its ``read_reason``.

In each round, the tools in an order that rotates from round to round:

1. full backups: ``virt-dup run --full`` of each job; a bare ``duplicity
   full`` of the image with virt-dup's own duplicity options
   (``virt_dup.duplicity.arguments``, same key, volume size, block size,
   staging directory); ``cp`` of the image; ``virtnbdbackup -l full`` of the
   twin (its defaults: no compression, no encryption);
2. the guest rewrites 1 % of its disk in scattered 4 KiB writes of new
   random data through its own virtio disk (HMP ``qemu-io``; the same
   offsets and data on the twin), then each tool's incremental (``virt-dup
   run`` of each job, ``duplicity incremental``, ``virtnbdbackup -l inc``);
3. the same after another 10 %, in scattered 64 KiB writes (HMP costs
   ~1-3 ms per write here: 10 % of 8 GiB in 4 KiB writes would be 210,000);
4. with ``restore``: more incrementals of both virt-dup jobs, each after
   0.1 % more (the first domain only), up to a chain of 1 full + 7
   incrementals each, then ``virt-dup restore`` of each job's latest point
   against a bare ``duplicity restore`` of the bare full.

Each command is measured alone: ``sync`` and a read of the image first (warm
page cache, nothing dirty), then wall time; **bytes read**: the ``rchar`` of
the command's whole process tree (``/proc/self/io`` of this process before
and after: the kernel adds every reaped child's counters to its parent's,
so the delta is the command and all its descendants) and the ``rchar`` delta
of the domain's QEMU process (``/proc/<qemu pid>/io``: virtnbdbackup's reads
and a changed-block read of the image happen there; the tree then reads the
changes file QEMU wrote); **uploaded**: new bytes in the tool's collection
(``<backend>/<job uuid>``, its ``changes`` collection included) or output
directory.

Usage (root, libvirtd running, ``apt-get install virtnbdbackup``; py-spy in
the venv for ``--profile``)::

    .venv/bin/python bench/backup_costs.py \\
        --scenario random:8192:5:only-1% --scenario random:1024:5:restore \\
        --deadline 40 --results bench/RESULTS.md

``--scenario KIND:MIB:ROUNDS[:FLAG...]``: ``random`` (urandom) or ``text``
(half zeros, half text, alternating MiB), flags ``restore`` (step 4) and
``only-1%`` (no step 3).  On the smallest random-data scenario, after its
rounds: ``--profile``, one ``virt-dup run --full`` (the whole-file job) under
``py-spy``, and ``--attribute``, both jobs' and bare duplicity's full and
incremental once more under ``strace -f -y``, their bytes read split by the
file read (the image, the changes file, pipes, scratch files); neither is
timed.  ``--deadline MINUTES`` skips the rounds that would end after it; the
file ``--stop-file`` (default ``/tmp/bench-stop``) stops it at the next
command, keeping what was measured.  Scratch space (backends, copies) goes
to ``--workdir`` (default ``/var/tmp``; about 6x the largest image), the
twin's image next to the first one's (libvirt's images directory);
everything is removed at the end.  Prints a Markdown section; with
``--results`` it replaces that section of the file (between its markers) or
appends it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))
# The throw-away domain comes from the integration tests' harness.
sys.path.insert(0, os.fspath(ROOT / "tests" / "integration"))

import libvirt  # noqa: E402
from harness.domains import DomainFactory, ScratchDomain, new_session_id  # noqa: E402

from virt_dup.duplicity import arguments as duplicity_arguments  # noqa: E402
from virt_dup.duplicity.runner import Duplicity, find_executable  # noqa: E402
from virt_dup.duplicity.target import Target, environment  # noqa: E402
from virt_dup.execute import run  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
CHAIN_LENGTH = 7  # incrementals before the restore
#: Concurrent HMP ``qemu-io`` calls: libvirt's round trip, not the write, is the cost.
WRITERS = 4
#: Time to leave for the attribution (``--attribute``, 1 GiB), else it is skipped.
EXTRAS_SECONDS = 180
#: No command of the bench takes this long (seconds): it hangs.
COMMAND_TIMEOUT = 1800
SECTION_START = "<!-- bench/backup_costs.py: start -->"
SECTION_END = "<!-- bench/backup_costs.py: end -->"
FULL, SMALL, LARGE, CHAIN, RESTORE = "full", "1 %", "10 %", "0.1 %", "restore"
WHOLE_JOB, CHANGES_JOB = "virt-dup (whole)", "virt-dup (changes)"
DUPLICITY, CP, NBD = "duplicity", "cp", "virtnbdbackup"
VIRT_DUP_JOBS = (WHOLE_JOB, CHANGES_JOB)
#: Each virt-dup job's ``--changed-blocks``: explicit, whatever the default is.
CHANGED_BLOCKS = {WHOLE_JOB: "off", CHANGES_JOB: "auto"}
#: ``read`` in virt-dup's status file: how a run read the disks.
WHOLE_READ, CHANGES_READ = "whole", "changes"
FULL_TOOLS = (WHOLE_JOB, CHANGES_JOB, DUPLICITY, CP, NBD)
INCREMENTAL_TOOLS = (WHOLE_JOB, CHANGES_JOB, DUPLICITY, NBD)
RESTORE_TOOLS = (WHOLE_JOB, CHANGES_JOB, DUPLICITY)

LABELS = {
    (FULL, WHOLE_JOB): "`virt-dup run --full`, whole-file job",
    (FULL, CHANGES_JOB): "`virt-dup run --full`, changed-block job (+ checkpoint)",
    (FULL, DUPLICITY): "bare `duplicity full`, same options",
    (FULL, CP): "`cp` of the image",
    (FULL, NBD): "`virtnbdbackup -l full` (twin)",
    ("inc", WHOLE_JOB): "`virt-dup run`, whole-file job (`changed_blocks: off`)",
    ("inc", CHANGES_JOB): "`virt-dup run`, changed-block job (`changed_blocks: auto`)",
    ("inc", DUPLICITY): "bare `duplicity incremental`",
    ("inc", NBD): "`virtnbdbackup -l inc` (twin)",
    (RESTORE, WHOLE_JOB): "`virt-dup restore`, whole-file job: latest of 1 full + 7 incrementals",
    (RESTORE, CHANGES_JOB): "`virt-dup restore`, changed-block job: latest of 1 full + 7 "
    "changed-block sets",
    (RESTORE, DUPLICITY): "bare `duplicity restore` of the bare full",
}


class Stopped(Exception):
    """The stop file appeared or a signal came: keep what was measured."""


class BenchError(Exception):
    """A measured command failed."""


@dataclass(frozen=True)
class Change:
    """Guest writes between two backups: ``fraction`` of the disk in
    ``write_size`` writes at distinct random aligned offsets."""

    phase: str
    fraction: float
    write_size: int


CHANGES = {
    SMALL: Change(SMALL, 0.01, 4096),
    LARGE: Change(LARGE, 0.10, 65536),
    CHAIN: Change(CHAIN, 0.001, 4096),  # between the chain's further incrementals
}
SCENARIO_FLAGS = {"restore", "only-1%"}


@dataclass(frozen=True)
class Scenario:
    kind: str  # "random" or "text"
    size: int
    rounds: int
    restore: bool = False
    phases: tuple[str, ...] = (SMALL, LARGE)

    @classmethod
    def parse(cls, text: str) -> Scenario:
        """``KIND:MIB:ROUNDS[:FLAG...]``, flags ``restore`` and ``only-1%``."""
        kind, *numbers_and_flags = text.split(":")
        numbers, flags = numbers_and_flags[:2], set(numbers_and_flags[2:])
        if kind not in ("random", "text") or len(numbers) != 2 or flags - SCENARIO_FLAGS:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected KIND:MIB:ROUNDS[:FLAG...], KIND random or text, "
                f"FLAG {' or '.join(sorted(SCENARIO_FLAGS))}"
            )
        phases = (SMALL,) if "only-1%" in flags else (SMALL, LARGE)
        return cls(kind, int(numbers[0]) * MIB, int(numbers[1]), "restore" in flags, phases)

    @property
    def label(self) -> str:
        what = "random data" if self.kind == "random" else "half zeros, half text"
        return f"{human(self.size)} of {what}"

    @property
    def expected_file_size(self) -> int:
        return self.size if self.kind == "random" else self.size // 2


@dataclass(frozen=True)
class Sample:
    seconds: float
    tree_read: int  # rchar of the command's process tree
    qemu_read: int  # rchar delta of the domain's QEMU
    uploaded: int  # new bytes in the collection / output directory
    #: virt-dup's own ``read`` and ``read_reason`` (its status file); "" for the others
    read: str = ""
    read_reason: str = ""

    def image_read(self, tool: str) -> int:
        """Bytes read from the image: virtnbdbackup and a changed-block read go
        through QEMU, the others read the file themselves."""
        return self.qemu_read if tool == NBD or self.read == CHANGES_READ else self.tree_read


Round = dict[tuple[str, str], Sample]


@dataclass
class ScenarioResult:
    scenario: Scenario
    domain_type: str = ""
    file_size: int = 0
    rounds: list[Round] = field(default_factory=list)
    changed: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    round_seconds: list[float] = field(default_factory=list)
    restore_seconds: list[float] = field(default_factory=list)
    skipped: str = ""


def human(size: float) -> str:
    if abs(size) >= GIB:
        return f"{size / GIB:.2f} GiB".replace(".00 GiB", " GiB")
    return f"{size / MIB:.1f} MiB"


def rchar(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/io has no rchar")


def directory_size(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def drop_caches() -> None:
    """Empty the page cache, before a command's own files are read into it.

    On this machine (a VM) a page the guest has never touched costs a fault on
    the host when first written, a recycled one does not: a command whose
    output finds pages freed just before it (a bare duplicity whose previous
    backup was deleted) writes faster than one that needs fresh ones (virt-dup,
    whose collection keeps its previous sets).  Measured (2026-12-02, 2 x 1 GiB,
    bare duplicity full): 9.5 s into an emptied collection, 12.1 s into one
    holding its previous full (+2.5 s of system time); 9.0-9.4 s for both after
    this.  Dropping the cache before every command puts them on equal terms."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(paths: Iterable[Path]) -> None:
    """Read every file under ``paths`` once, so that it is in the page cache."""
    buffer = bytearray(16 * MIB)
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for name in files:
            with name.open("rb", buffering=0) as stream:
                while stream.readinto(buffer):
                    pass


class Budget:
    """The stop file, and how much time is left."""

    def __init__(self, stop_file: Path, minutes: float | None) -> None:
        self.stop_file = stop_file
        self.deadline = None if minutes is None else time.monotonic() + minutes * 60

    def check(self) -> None:
        if self.stop_file.exists():
            raise Stopped(f"{self.stop_file} appeared")

    def allows(self, seconds: float | None) -> bool:
        if self.deadline is None or seconds is None:
            return True
        return time.monotonic() + seconds <= self.deadline


class Meter:
    """Runs one command at a time and measures it (see the module docstring)."""

    def __init__(self, logs: Path, budget: Budget) -> None:
        self.logs = logs
        self.budget = budget
        self.count = 0
        self.qemu_pid = 0
        #: the log of the last command measured
        self.last_log = logs
        #: put before every command (the attribution's strace)
        self.prefix: list[str] = []

    def measure(
        self,
        command: Sequence[str | os.PathLike[str]],
        *,
        environment: dict[str, str] | None = None,
        warm_paths: Iterable[Path] = (),
        output: Path | None = None,
        qemu_pid: int | None = None,
    ) -> Sample:
        """Run ``command`` and measure it; ``qemu_pid``: the QEMU whose reads count
        (default :attr:`qemu_pid`, the first domain's)."""
        self.budget.check()
        qemu_pid = qemu_pid or self.qemu_pid
        argv = [*self.prefix, *(os.fspath(part) for part in command)]
        drop_caches()
        warm(warm_paths)
        os.sync()
        self.count += 1
        log = self.logs / f"{self.count:03d}-{Path(argv[0]).name}.log"
        self.last_log = log
        before = directory_size(output) if output else 0
        with log.open("wb") as stream:
            read_before, qemu_before = rchar(), rchar(qemu_pid)
            started = time.monotonic()
            try:
                finished = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(environment or {})},
                    check=False,
                    timeout=COMMAND_TIMEOUT,
                )
            except subprocess.TimeoutExpired as error:
                raise BenchError(f"{shlex.join(argv)} took over {COMMAND_TIMEOUT} s") from error
            seconds = time.monotonic() - started
            read_after, qemu_after = rchar(), rchar(qemu_pid)
        if finished.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise BenchError(
                f"{shlex.join(argv)} failed with exit code {finished.returncode}:\n"
                + "\n".join(tail)
            )
        uploaded = directory_size(output) - before if output else 0
        return Sample(seconds, read_after - read_before, qemu_after - qemu_before, uploaded)


def make_gpg_home() -> tuple[Path, str]:
    home = Path(tempfile.mkdtemp(prefix="vdb-gnupg-"))  # short: agent socket path limit
    gpg = ["gpg", "--homedir", os.fspath(home), "--batch"]
    user = "bench <bench@example.invalid>"
    run([*gpg, "--passphrase", "", "--quick-gen-key", user, "default", "default", "never"])
    colons = run([*gpg, "--with-colons", "--list-secret-keys", user]).stdout
    fingerprint = next(line.split(":")[9] for line in colons.splitlines() if line[:4] == "fpr:")
    return home, fingerprint


def text_blocks(count: int = 16, seed: int = 7) -> list[bytes]:
    """``count`` MiB of lines of made-up words (compressible, like logs or source)."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(4096)
    ]
    blocks = []
    for _ in range(count):
        text = bytearray()
        while len(text) < MIB:
            text += (" ".join(rng.choices(words, k=12)) + "\n").encode()
        blocks.append(bytes(text[:MIB]))
    return blocks


def make_image(kind: str, size: int, image: Path, work: Path) -> None:
    """Write ``image`` (qcow2, ``size`` bytes virtual): urandom, or alternating MiB
    of text and zeros (holes in the raw file: unallocated clusters in the qcow2)."""
    raw = work / "image.raw"
    with raw.open("wb") as stream:
        if kind == "random":
            for _ in range(size // (64 * MIB)):
                stream.write(os.urandom(64 * MIB))
        else:
            blocks = text_blocks()
            for number in range(0, size // MIB, 2):
                header = f"chunk {number:012d}\n".encode()
                block = blocks[number // 2 % len(blocks)]
                stream.seek(number * MIB)
                stream.write(header + block[len(header) :])
            stream.truncate(size)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(raw), os.fspath(image)])
    raw.unlink()


def read_back(image: Path, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of the live ``image`` (``qemu-io -r -U``)."""
    command = ["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -v {offset} {length}"]
    dump = run([*command, os.fspath(image)]).stdout
    data = bytearray()
    for line in dump.splitlines():
        match = re.match(r"^[0-9a-f]{8,}:\s+((?:[0-9a-f]{2} ){1,16})", line)
        if match:
            data += bytes.fromhex(match.group(1))
    return bytes(data)


def guest_writes(
    vms: Sequence[ScratchDomain], change: Change, size: int, seed: int
) -> tuple[int, float]:
    """``change`` through each guest's own virtio disk (HMP ``qemu-io``, as a guest's
    writes arrive), the same offsets and data in every domain of ``vms``; returns
    (bytes changed per domain, seconds for all of them).

    Every write is new random data (``write -s FILE``, a file of its own for each):
    constant ``-P`` patterns would repeat earlier writes, and duplicity's rsync
    deltas would then copy them from the old image instead of uploading them.
    The writes are quiet (``-q``: QEMU prints to the domain log, which virtlogd
    rotates at 2 MiB); the first, a middle and the last one are read back from
    each image afterwards.
    """
    rng = random.Random(seed)
    slots = size // change.write_size
    offsets = sorted(rng.sample(range(slots), int(slots * change.fraction)))
    # QEMU (libvirt-qemu) reads these: a 0755 directory of each domain's own.
    directories = [vm.directory / "writes" for vm in vms]
    directories[0].mkdir(mode=0o755)
    for number in range(len(offsets)):
        (directories[0] / f"{number:07d}").write_bytes(os.urandom(change.write_size))
    for directory in directories[1:]:
        shutil.copytree(directories[0], directory)
        directory.chmod(0o755)
    devices = [f"/machine/peripheral/{vm.disk_alias('vda')}/virtio-backend" for vm in vms]

    def write(item: tuple[int, int, int]) -> None:
        domain, number, slot = item
        source = directories[domain] / f"{number:07d}"
        command = f"write -q -s {source} {slot * change.write_size} {change.write_size}"
        reply = vms[domain].hmp(f'qemu-io -d {devices[domain]} "{command}"')
        if reply.strip():
            raise BenchError(f"{vms[domain].name}: qemu-io {command!r}: {reply.strip()}")

    writes = [
        (domain, number, slot) for number, slot in enumerate(offsets) for domain in range(len(vms))
    ]
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(WRITERS * len(vms)) as pool:
            list(pool.map(write, writes))
        for vm, device in zip(vms, devices, strict=True):
            vm.hmp(f'qemu-io -d {device} "flush"')
        seconds = time.monotonic() - started
        for vm, directory in zip(vms, directories, strict=True):
            for number in {0, len(offsets) // 2, len(offsets) - 1}:
                offset = offsets[number] * change.write_size
                expected = (directory / f"{number:07d}").read_bytes()
                if read_back(vm.images["vda"][-1], offset, change.write_size) != expected:
                    raise BenchError(f"{vm.name}: write {number} at {offset} is not in the image")
    finally:
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)
    return len(offsets) * change.write_size, seconds


class Subject:
    """One running domain, its twin, and the five tools that back them up."""

    def __init__(
        self,
        work: Path,
        vm: ScratchDomain,
        twin: ScratchDomain,
        gnupg_home: Path,
        key: str,
        meter: Meter,
    ) -> None:
        self.work = work
        self.vm = vm
        self.image = vm.images["vda"][-1]
        self.twin = twin
        self.twin_image = twin.images["vda"][-1]
        self.twin_qemu_pid = int(Path(f"/run/libvirt/qemu/{twin.name}.pid").read_text())
        self.meter = meter
        self.gnupg_home = gnupg_home
        self.config = work / "virt-dup.yml"
        self.backend = work / "virt-dup-backend"
        self.state = work / "virt-dup-state"
        self.cache = work / "virt-dup-cache"
        self.config.write_text(
            "libvirt:\n  uri: qemu:///system\n"
            f"backends:\n  local: file://{self.backend}\n"
            f"encryption:\n  keys: [{key}]\n  gnupg_home: {gnupg_home}\n"
            f"state_dir: {self.state}\ncache_dir: {self.cache}\n"
            "defaults:\n  backends: [local]\n"
        )
        (work / "tmp").mkdir(exist_ok=True)
        #: tool -> the uuid of its job; two jobs of the same domain
        self.jobs: dict[str, str] = {}
        for tool in VIRT_DUP_JOBS:
            arguments = ["--depth", "0", "--changed-blocks", CHANGED_BLOCKS[tool]]
            added = self._virt_dup("add-job", vm.name, *arguments)
            self.jobs[tool] = added.stdout.strip().splitlines()[0]
        bare_cache = work / "bare-cache"
        self.bare = Target(
            url=(work / "bare-backend").as_uri(),
            archive_dir=bare_cache,
            name="bench",
            encrypt_keys=(key,),
            gnupg_home=gnupg_home,
            tempdir=bare_cache / "bench",
        )
        self.bare_staging = bare_cache / "bench"
        self.nbd_output = work / "virtnbdbackup"
        self.copy = work / "copy"

    def virt_dup_command(self, *arguments: str) -> list[str]:
        return [sys.executable, "-m", "virt_dup", "--config", os.fspath(self.config), *arguments]

    def _virt_dup(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        finished = subprocess.run(
            self.virt_dup_command(*arguments),
            capture_output=True,
            text=True,
            check=False,
            env=self.virt_dup_environment(),
        )
        if finished.returncode != 0:
            raise BenchError(f"virt-dup {' '.join(arguments)} failed:\n{finished.stderr}")
        return finished

    def virt_dup_environment(self) -> dict[str, str]:
        return {"TMPDIR": os.fspath(self.work / "tmp")}

    def collection(self, tool: str) -> Path:
        """Where ``tool``'s job keeps its backups: its main collection, with its
        changes collection inside (``changes/``)."""
        return self.backend / self.jobs[tool]

    def _last_run(self, job: str) -> dict[str, object]:
        status = json.loads((self.state / "status" / f"{job}.json").read_text())
        last_run: dict[str, object] = status["last_run"]
        return last_run

    def reset(self) -> None:
        """Remove every backup and output, and both domains' checkpoints (the
        changed-block job's and virtnbdbackup's)."""
        for path in (
            self.backend,
            self.state,
            self.cache,
            self.work / "bare-backend",
            self.work / "bare-cache",
            self.nbd_output,
            self.copy,
            self.work / "restored",
        ):
            shutil.rmtree(path, ignore_errors=True)
        for domain in (self.vm.domain, self.twin.domain):
            roots = domain.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS)
            for checkpoint in roots:
                checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN)

    def backup(self, tool: str, full: bool) -> Sample:
        if tool in VIRT_DUP_JOBS:
            return self._virt_dup_backup(tool, full)
        measure: Callable[[bool], Sample] = {
            DUPLICITY: self._bare_backup,
            CP: self._copy,
            NBD: self._nbd_backup,
        }[tool]
        return measure(full)

    def _virt_dup_backup(self, tool: str, full: bool) -> Sample:
        job = self.jobs[tool]
        command = self.virt_dup_command("run", *(["--full"] if full else []), job)
        sample = self.meter.measure(
            command,
            environment=self.virt_dup_environment(),
            warm_paths=[self.image],
            output=self.collection(tool),
        )
        last_run = self._last_run(job)
        if last_run.get("full") is not full or last_run.get("result") != "success":
            raise BenchError(f"{tool} run: expected a {'full' if full else 'inc'}: {last_run}")
        read, reason = str(last_run.get("read") or ""), str(last_run.get("read_reason") or "")
        expected = CHANGES_READ if tool == CHANGES_JOB and not full else WHOLE_READ
        if read != expected:
            raise BenchError(
                f"{tool} {'full' if full else 'incremental'} read {read!r}, not {expected!r}"
                f" (read_reason: {reason or 'none given'}); its output: {self.meter.last_log}"
            )
        return dataclasses.replace(sample, read=read, read_reason=reason)

    def bare_command(self, full: bool) -> list[str]:
        self.bare_staging.mkdir(parents=True, exist_ok=True)
        arguments = duplicity_arguments.backup_arguments(
            self.bare, full, "/", [os.fspath(self.image)]
        )
        return [find_executable(), *arguments]

    def _bare_backup(self, full: bool) -> Sample:
        return self.meter.measure(
            self.bare_command(full),
            environment=environment(self.bare),
            warm_paths=[self.image],
            output=self.work / "bare-backend",
        )

    def _copy(self, full: bool) -> Sample:
        assert full, "cp makes full copies only"
        self.copy.mkdir(exist_ok=True)
        sample = self.meter.measure(
            ["cp", self.image, self.copy / self.image.name],
            warm_paths=[self.image],
            output=self.copy,
        )
        shutil.rmtree(self.copy)
        return sample

    def _nbd_backup(self, full: bool) -> Sample:
        command = ["virtnbdbackup", "-d", self.twin.name, "-l", "full" if full else "inc"]
        return self.meter.measure(
            [*command, "-o", self.nbd_output],
            warm_paths=[self.twin_image],
            output=self.nbd_output,
            qemu_pid=self.twin_qemu_pid,
        )

    def restore(self, tool: str) -> Sample:
        target = self.work / "restored" / re.sub(r"[^a-z]+", "-", tool).strip("-")
        if tool in VIRT_DUP_JOBS:
            command = self.virt_dup_command("restore", self.jobs[tool], "--target-dir", str(target))
            sample = self.meter.measure(
                command,
                environment=self.virt_dup_environment(),
                warm_paths=[self.collection(tool)],
                output=target,
            )
        else:
            target.mkdir(parents=True)
            full_time = self._bare_full_time()
            arguments = duplicity_arguments.restore_arguments(
                self.bare, full_time, os.fspath(self.image), target / self.image.name
            )
            sample = self.meter.measure(
                [find_executable(), *arguments],
                environment=environment(self.bare),
                warm_paths=[self.work / "bare-backend"],
                output=target,
            )
        shutil.rmtree(target)
        return sample

    def _bare_full_time(self) -> str:
        names = [entry.name for entry in (self.work / "bare-backend").iterdir()]
        times = {
            match.group(1)
            for name in names
            if (match := re.match(r"duplicity-full\.(\d{8}T\d{6}Z)\.manifest", name))
        }
        if len(times) != 1:
            raise BenchError(f"expected one bare full on the backend, found {sorted(times)}")
        return times.pop()


def rotated(items: Sequence[str], number: int) -> list[str]:
    shift = number % len(items)
    return [*items[shift:], *items[:shift]]


def run_round(
    subject: Subject, result: ScenarioResult, number: int, budget: Budget
) -> tuple[Round, float]:
    """One round (module docstring, steps 1-4); returns it and its restore part's time."""
    samples: Round = {}
    for tool in rotated(FULL_TOOLS, number):
        print(f"  full, {tool}", file=sys.stderr)
        samples[FULL, tool] = subject.backup(tool, full=True)
    for index, phase in enumerate(result.scenario.phases):
        budget.check()
        changed = guest_writes(
            [subject.vm, subject.twin],
            CHANGES[phase],
            result.scenario.size,
            seed=number * 100 + index,
        )
        result.changed.setdefault(phase, []).append(changed)
        print(
            f"  {phase}: {human(changed[0])} written to each domain in {changed[1]:.1f} s",
            file=sys.stderr,
        )
        for tool in rotated(INCREMENTAL_TOOLS, number):
            print(f"  {phase} incremental, {tool}", file=sys.stderr)
            samples[phase, tool] = subject.backup(tool, full=False)
    restore_started = time.monotonic()
    if result.scenario.restore:
        done = len(result.scenario.phases)
        for extra in range(done, CHAIN_LENGTH):
            budget.check()
            # virtnbdbackup takes no part from here on: its twin needs no writes.
            guest_writes([subject.vm], CHANGES[CHAIN], result.scenario.size, number * 100 + extra)
            for tool in rotated(VIRT_DUP_JOBS, number):
                print(
                    f"  chain: {tool}, incremental {extra + 1} of {CHAIN_LENGTH}", file=sys.stderr
                )
                subject.backup(tool, full=False)
        for tool in rotated(RESTORE_TOOLS, number):
            print(f"  restore, {tool}", file=sys.stderr)
            samples[RESTORE, tool] = subject.restore(tool)
    restore_seconds = time.monotonic() - restore_started
    subject.reset()
    return samples, restore_seconds


def estimate(results: list[ScenarioResult], scenario: Scenario) -> float | None:
    """Seconds one round of ``scenario`` should take, from the rounds so far
    (scaled by file size, the restore part apart); None when nothing is known."""
    same = next((r for r in results if r.scenario == scenario and r.round_seconds), None)
    if same is not None:
        return max(same.round_seconds)
    done = [r for r in results if r.round_seconds]
    if not done:
        return None
    size = sum(r.file_size * len(r.round_seconds) for r in done)
    core = sum(sum(r.round_seconds) - sum(r.restore_seconds) for r in done) / size
    seconds = core * scenario.expected_file_size
    with_restore = [r for r in done if r.scenario.restore]
    if scenario.restore and with_restore:
        restore_size = sum(r.file_size * len(r.restore_seconds) for r in with_restore)
        restore = sum(sum(r.restore_seconds) for r in with_restore) / restore_size
        seconds += restore * scenario.expected_file_size
    return seconds


@dataclass
class Extras:
    """What the first scenario also does, once, after its rounds: the attribution
    of the bytes read (``--attribute``) and the profile (``--profile``)."""

    attribute: bool = False
    profile: bool = False
    sources: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    image_size: int = 0
    profiles: list[Profile] = field(default_factory=list)

    def __call__(self, subject: Subject, scenario: Scenario) -> None:
        if self.profile:
            profile_full(subject, self.profiles)
        if self.attribute and subject.meter.budget.allows(EXTRAS_SECONDS):
            self.image_size = subject.image.stat().st_size
            attribute(subject, scenario.size, self.sources)


def run_scenario(
    connection: libvirt.virConnect,
    session: str,
    work: Path,
    gpg: tuple[Path, str],
    meter: Meter,
    result: ScenarioResult,
    results: list[ScenarioResult],
    extras: Extras | None,
) -> None:
    scenario = result.scenario
    images = Path("/var/lib/libvirt/images") / f"vdt-{session}"
    with DomainFactory(connection, session, images, label="bench/backup_costs.py") as factory:
        vm = factory(chain=["disk"], size=scenario.size, running=False)
        twin = factory(chain=["disk"], size=scenario.size, running=False)
        result.domain_type = factory.domain_type
        (image,), (twin_image,) = vm.images["vda"], twin.images["vda"]
        print(f"{scenario.label}: making the image and its twin's copy", file=sys.stderr)
        make_image(scenario.kind, scenario.size, image, work)
        shutil.copyfile(image, twin_image)  # the harness's file, its owner and mode kept
        result.file_size = image.stat().st_size
        vm.domain.create()
        twin.domain.create()
        meter.qemu_pid = int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text())
        subject = Subject(work, vm, twin, *gpg, meter)
        try:
            for number in range(scenario.rounds):
                if not meter.budget.allows(estimate(results, scenario)):
                    result.skipped = f"rounds {number + 1}-{scenario.rounds} not run: out of time"
                    break
                print(f"{scenario.label}: round {number + 1}", file=sys.stderr)
                started = time.monotonic()
                samples, restore_seconds = run_round(subject, result, number, meter.budget)
                result.rounds.append(samples)
                result.round_seconds.append(time.monotonic() - started)
                result.restore_seconds.append(restore_seconds)
            if extras is not None:
                extras(subject, scenario)
        finally:
            subject.reset()
            Path(f"/run/virt-dup/locks/{vm.uuid}.lock").unlink(missing_ok=True)


# --- where the bytes read come from, and the profile (part 5) -----------------------

#: The system calls that read data (what rchar counts), traced for the attribution.
READ_CALLS = "read,pread64,readv,preadv,preadv2,copy_file_range,sendfile,splice"
TRACE_LINE = re.compile(r"^\d+\s+\w+\(\d+<(?P<path>[^>]*)>.*\) = (?P<count>\d+)$")
SOURCES = ("the image", "changes file", "pipes", "scratch", "other")


def read_trace(trace: Path, image: Path, work: Path) -> Counter[str]:
    """Bytes read per source, from ``strace -f -y`` output of READ_CALLS (the
    changes file: the qcow2 of changed clusters QEMU wrote next to the image)."""
    sources: Counter[str] = Counter()
    with trace.open(errors="replace") as stream:
        for line in stream:
            match = TRACE_LINE.match(line.strip())
            if not match:
                continue
            path = match["path"]
            if path == os.fspath(image):
                source = "the image"
            elif path.startswith(os.fspath(image.parent)) and path.endswith(".changes.qcow2"):
                source = "changes file"
            elif path.startswith("pipe:"):
                source = "pipes"
            elif path.startswith(os.fspath(work)):
                source = "scratch"
            else:
                source = "other"
            sources[source] += int(match["count"])
    return sources


def attribute(subject: Subject, size: int, store: dict[tuple[str, str], Counter[str]]) -> None:
    """Once, untimed: both virt-dup jobs' and bare duplicity's full and 1 % incremental
    under ``strace -f -y``, their bytes read split by the file they came from (a
    changed-block read's image reads are QEMU's, not traced)."""
    subject.reset()
    trace = subject.work / "trace.txt"
    strace = ["strace", "-f", "-qq", "-y", "-s", "0", "--seccomp-bpf", "-e"]
    strace += [f"trace={READ_CALLS}", "-e", "status=successful", "-o", os.fspath(trace), "--"]
    for phase in (FULL, SMALL):
        if phase == SMALL:
            guest_writes([subject.vm], CHANGES[SMALL], size, seed=999)
        for tool in (*VIRT_DUP_JOBS, DUPLICITY):
            print(f"attribution: {phase}, {tool} under strace", file=sys.stderr)
            subject.meter.prefix = strace
            try:
                subject.backup(tool, full=phase == FULL)
            finally:
                subject.meter.prefix = []
            store[phase, tool] = read_trace(trace, subject.image, subject.work)
            trace.unlink()
    subject.reset()


@dataclass
class Profile:
    seconds: float = 0.0
    rate: int = 100
    #: per process (its label): samples of its main thread, of its other threads
    main: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)
    #: per process, main thread only: innermost frames, and frames anywhere in a stack
    leaves: dict[str, Counter[str]] = field(default_factory=dict)
    inclusive: dict[str, Counter[str]] = field(default_factory=dict)


def parse_py_spy(text: str) -> Profile:
    """py-spy's ``--format raw`` with ``--subprocesses``: collapsed stacks, each
    starting with one ``process PID:"CMD"`` frame per process level (py-spy's
    own child, virt-dup, first), then ``function (file:line)`` frames, then a
    count."""
    profile = Profile()
    for line in re.split(r"\n(?=process \d+:)", text.strip()):
        stack, _, count_text = line.rpartition(" ")
        parts = stack.split(";")
        processes = [part for part in parts if re.match(r'process \d+:"', part)]
        frames = [re.sub(r":\d+\)$", ")", part) for part in parts if part not in processes]
        if not processes or not count_text.isdigit():
            continue
        command_line = processes[-1].split(":", 1)[1]
        label = "virt-dup" if len(processes) == 1 else "duplicity"
        if len(processes) > 1 and "duplicity" not in command_line:
            label = command_line[:40]
        count = int(count_text)
        if any("_bootstrap (threading.py)" in frame for frame in frames):
            profile.threads[label] += count
            continue
        profile.main[label] += count
        leaves = profile.leaves.setdefault(label, Counter())
        leaves[frames[-1] if frames else "(no Python frame)"] += count
        inclusive = profile.inclusive.setdefault(label, Counter())
        for frame in set(frames):
            inclusive[frame] += count
    return profile


def profile_full(subject: Subject, store: list[Profile]) -> None:
    """One ``virt-dup run --full`` of the whole-file job under py-spy (idle samples
    too, and duplicity's process), not counted in the tables."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        print("no py-spy in the venv: no profile", file=sys.stderr)
        return
    subject.reset()
    output = subject.work / "profile.txt"
    rate = 100
    command = [os.fspath(py_spy), "record", "--rate", str(rate), "--subprocesses", "--idle"]
    command += ["--format", "raw", "--output", os.fspath(output), "--"]
    command += subject.virt_dup_command("run", "--full", subject.jobs[WHOLE_JOB])
    print("profile: virt-dup run --full under py-spy", file=sys.stderr)
    sample = subject.meter.measure(
        command, environment=subject.virt_dup_environment(), warm_paths=[subject.image]
    )
    profile = parse_py_spy(output.read_text(errors="replace"))
    profile.seconds, profile.rate = sample.seconds, rate
    store.append(profile)
    subject.reset()


# --- the report --------------------------------------------------------------------


def spread(values: Sequence[float], unit: str = "", digits: int = 1) -> str:
    middle = f"{statistics.median(values):.{digits}f}{unit}"
    if len(values) < 2:
        return middle
    return f"{middle} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def ratio(rounds: list[Round], top: tuple[str, str], bottom: tuple[str, str]) -> list[float]:
    """Per round, side by side: ``top``'s time over ``bottom``'s."""
    return [r[top].seconds / r[bottom].seconds for r in rounds if top in r and bottom in r]


def median_of(rounds: list[Round], key: tuple[str, str], value: Callable[[Sample], float]) -> float:
    return statistics.median(value(r[key]) for r in rounds)


def render_full(result: ScenarioResult) -> list[str]:
    rounds = result.rounds
    lines = [
        "Full backup:",
        "",
        "| what | time | x bare duplicity | x virtnbdbackup | tree rchar | QEMU rchar | uploaded |",
        "|---|---|---|---|---|---|---|",
    ]
    for tool in FULL_TOOLS:
        key = (FULL, tool)
        lines.append(
            f"| {LABELS[key]} | {spread([r[key].seconds for r in rounds], ' s')} | "
            f"{spread(ratio(rounds, key, (FULL, DUPLICITY)), digits=2)} | "
            f"{spread(ratio(rounds, key, (FULL, NBD)), digits=2)} | "
            f"{human(median_of(rounds, key, lambda s: s.tree_read))} | "
            f"{human(median_of(rounds, key, lambda s: s.qemu_read))} | "
            f"{human(median_of(rounds, key, lambda s: s.uploaded))} |"
        )
    return lines


def read_paths(rounds: list[Round], key: tuple[str, str]) -> str:
    """How virt-dup read, over the rounds (its status file's ``read``); "" for the
    other tools."""
    return "/".join(sorted({r[key].read for r in rounds if r[key].read}))


def render_incremental(result: ScenarioResult, phase: str) -> list[str]:
    rounds = result.rounds
    change = CHANGES[phase]
    changed = statistics.median(size for size, _seconds in result.changed[phase])
    write_seconds = statistics.median(seconds for _size, seconds in result.changed[phase])
    lines = [
        f"Incremental after {phase}: {human(changed)} in {int(changed // change.write_size)} "
        f"scattered {change.write_size // 1024} KiB guest writes, the same in the twin "
        f"({write_seconds:.0f} s of HMP `qemu-io` for both)"
        f"{' after the 1 % incremental' if phase == LARGE else ''}; *read path*: virt-dup's "
        "status file; *image read*: tree rchar, but QEMU's rchar for virtnbdbackup and "
        "for a changed-block read (QEMU reads the image; the tree reads the changes file "
        "QEMU wrote):",
        "",
        "| what | read path | time | x its full | x whole-file job | x virtnbdbackup | "
        "image read | x changed | tree rchar | uploaded | x changed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tool in INCREMENTAL_TOOLS:
        key = (phase, tool)
        read = statistics.median(r[key].image_read(tool) for r in rounds)
        uploaded = median_of(rounds, key, lambda s: s.uploaded)
        lines.append(
            f"| {LABELS['inc', tool]} | {read_paths(rounds, key)} | "
            f"{spread([r[key].seconds for r in rounds], ' s')} | "
            f"{spread(ratio(rounds, key, (FULL, tool)), digits=2)} | "
            f"{spread(ratio(rounds, key, (phase, WHOLE_JOB)), digits=2)} | "
            f"{spread(ratio(rounds, key, (phase, NBD)), digits=2)} | "
            f"{human(read)} | {read / changed:.1f} | "
            f"{human(median_of(rounds, key, lambda s: s.tree_read))} | "
            f"{human(uploaded)} | {uploaded / changed:.2f} |"
        )
    return lines


def render_restore(result: ScenarioResult) -> list[str]:
    rounds = [r for r in result.rounds if (RESTORE, DUPLICITY) in r]
    if not rounds:
        return []
    lines = [
        "Restore (warm page cache: the collection's files read once first):",
        "",
        "| what | time | x bare restore of the full | x whole-file job | tree rchar | written |",
        "|---|---|---|---|---|---|",
    ]
    for tool in RESTORE_TOOLS:
        key = (RESTORE, tool)
        lines.append(
            f"| {LABELS[key]} | {spread([r[key].seconds for r in rounds], ' s')} | "
            f"{spread(ratio(rounds, key, (RESTORE, DUPLICITY)), digits=2)} | "
            f"{spread(ratio(rounds, key, (RESTORE, WHOLE_JOB)), digits=2)} | "
            f"{human(median_of(rounds, key, lambda s: s.tree_read))} | "
            f"{human(median_of(rounds, key, lambda s: s.uploaded))} |"
        )
    return lines


def render_scenario(result: ScenarioResult) -> list[str]:
    count = len(result.rounds)
    lines = [
        f"### {result.scenario.label} (qcow2 file {human(result.file_size)}), "
        f"{count} round{'s' if count != 1 else ''}, `{result.domain_type}`",
        "",
    ]
    if result.skipped:
        lines += [f"**{result.skipped}.**", ""]
    if not count:
        return lines
    lines += [*render_full(result), ""]
    for phase in result.scenario.phases:
        lines += [*render_incremental(result, phase), ""]
    restore = render_restore(result)
    return lines + ([*restore, ""] if restore else [])


def verdict(value: float, limit: float) -> str:
    return "within" if value <= limit else "**over**"


def target_values(result: ScenarioResult, tool: str) -> list[float]:
    """``tool``'s value for each of TARGETS but the restore, medians over the rounds."""
    rounds = result.rounds
    changed = statistics.median(size for size, _seconds in result.changed[SMALL])
    key = (SMALL, tool)
    return [
        statistics.median(ratio(rounds, (FULL, tool), (FULL, DUPLICITY))),
        statistics.median(ratio(rounds, (FULL, tool), (FULL, NBD))),
        statistics.median(r[key].image_read(tool) for r in rounds) / changed,
        statistics.median(ratio(rounds, key, (FULL, tool))),
        statistics.median(ratio(rounds, key, (SMALL, NBD))),
        median_of(rounds, key, lambda s: s.uploaded) / changed,
    ]


#: The issue's targets (text, limit), in the order of :func:`target_values`.
TARGETS = (
    ("full <= 1.05x bare duplicity, same options", 1.05),
    ("full <= unencrypted `virtnbdbackup -l full`", 1.0),
    ("incremental after 1 %: bytes read from the image <= 1.5x changed", 1.5),
    ("incremental after 1 %: time <= 0.1x the full", 0.1),
    ("incremental after 1 %: time <= `virtnbdbackup -l inc`", 1.0),
    ("incremental after 1 %: upload <= 1.5x change", 1.5),
)
RESTORE_LIMIT = 1.2


def render_targets(results: list[ScenarioResult]) -> list[str]:
    """The issue's targets, against the largest random-data scenario measured, for
    each virt-dup job."""
    random_results = [r for r in results if r.scenario.kind == "random" and r.rounds]
    if not random_results:
        return []
    big = max(random_results, key=lambda r: r.scenario.size)
    rows: list[tuple[str, list[float], float]] = [
        (text, [target_values(big, tool)[index] for tool in (CHANGES_JOB, WHOLE_JOB)], limit)
        for index, (text, limit) in enumerate(TARGETS)
    ]
    restored = [r for r in random_results if any((RESTORE, DUPLICITY) in x for x in r.rounds)]
    if restored:
        with_restore = [x for x in restored[-1].rounds if (RESTORE, DUPLICITY) in x]
        values = [
            statistics.median(ratio(with_restore, (RESTORE, tool), (RESTORE, DUPLICITY)))
            for tool in (CHANGES_JOB, WHOLE_JOB)
        ]
        text = (
            f"restore of 1 full + 7 incrementals <= 1.2x a bare restore of the full "
            f"({restored[-1].scenario.label})"
        )
        rows.append((text, values, RESTORE_LIMIT))
    lines = [
        f"### Against the issue's targets ({big.scenario.label}, medians of "
        f"{len(big.rounds)} per-round ratios)",
        "",
        "| target | changed-block job | | whole-file job | |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {text} | {changes:.2f}x | {verdict(changes, limit)} "
        f"| {whole:.2f}x | {verdict(whole, limit)} |"
        for text, (changes, whole), limit in rows
    ]
    return lines


def render_profile(profile: Profile) -> list[str]:
    lines = [
        f"### Profile of one `virt-dup run --full` (`py-spy record --rate {profile.rate} "
        f"--subprocesses --idle`; {profile.seconds:.1f} s under py-spy)",
        "",
        "Share of each process's main-thread samples, idle ones included (a wait is where "
        "the time goes, too); *self* = the innermost frame, *incl.* = anywhere in the stack "
        "(frames in every sample left out).",
        "",
    ]
    for label, total in profile.main.most_common(2):
        package = "virt_dup/" if label == "virt-dup" else f"{label}/"
        lines += [
            f"{label}, main thread: {total / profile.rate:.1f} s ({total} samples):",
            "",
            "| top frames, self | s | % | top frames of its own code, incl. | s | % |",
            "|---|---|---|---|---|---|",
        ]
        leaves = profile.leaves[label].most_common(10)
        inclusive = [
            item
            for item in profile.inclusive[label].most_common(80)
            if item[1] < 0.9 * total and package in item[0]
        ][:10]
        for (leaf, leaf_count), (frame, frame_count) in zip(leaves, inclusive, strict=False):
            lines.append(
                f"| `{leaf}` | {leaf_count / profile.rate:.1f} | {100 * leaf_count / total:.0f} "
                f"| `{frame}` | {frame_count / profile.rate:.1f} | "
                f"{100 * frame_count / total:.0f} |"
            )
        lines.append("")
    return lines


def render_attribution(sources: dict[tuple[str, str], Counter[str]], image_size: int) -> list[str]:
    if not sources:
        return []
    lines = [
        "### Where the bytes read come from (once, untimed, under `strace -f -y`, "
        f"{human(image_size)} image)",
        "",
        "Every successful read-family call of the process tree, by the file it read: "
        "*changes file* = the qcow2 of changed clusters QEMU wrote for a changed-block "
        "read (QEMU's own reads of the image are not in the tree); *scratch* = "
        "duplicity's staging files, caches and backends; *other* = Python, libraries, "
        "`/proc`, configuration.",
        "",
        "| what | the image | x image | changes file | pipes | scratch | other | total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (phase, tool), counts in sources.items():
        label = LABELS[FULL if phase == FULL else "inc", tool]
        label += "" if phase == FULL else f" after {phase}"
        lines.append(
            f"| {label} | {human(counts['the image'])} | "
            f"{counts['the image'] / image_size:.2f} | {human(counts['changes file'])} | "
            f"{human(counts['pipes'])} | "
            f"{human(counts['scratch'])} | {human(counts['other'])} | "
            f"{human(sum(counts.values()))} |"
        )
    return [*lines, ""]


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    qemu = run(["qemu-system-x86_64", "--version"]).stdout.splitlines()[0]
    libvirt_version = run(["virsh", "--version"]).stdout.strip()
    nbd = run(["virtnbdbackup", "--version"]).stdout.strip()
    gpg = run(["gpg", "--version"]).stdout.splitlines()[0]
    return (
        f"{os.cpu_count()} x {cpu}, {memory_kib / 1024 / 1024:.0f} GiB RAM, "
        f"Linux {platform.release()}; libvirt {libvirt_version}, {qemu}; "
        f"duplicity {Duplicity().version()}, {gpg}, virtnbdbackup {nbd}"
    )


def render(
    when: str,
    host: str,
    command: str,
    results: list[ScenarioResult],
    extras: Extras,
    stopped: str,
) -> str:
    status = f"**Partial: stopped ({stopped}).**  " if stopped else ""
    lines = [
        SECTION_START,
        "## What a backup costs: virt-dup's whole-file and changed-block paths against "
        "duplicity, cp, virtnbdbackup (`bench/backup_costs.py`)",
        "",
        f"{status}Run {when} on {host}.",
        "",
        f"Command: `{command}`",
        "",
        "A running domain (the integration harness's: 64 MiB, no guest OS, one virtio qcow2 "
        "disk) per scenario, with two virt-dup jobs (depth 0, gpg to a throw-away key, "
        "`--no-compression --max-blocksize 4096`, volumes of 200 MiB): the *whole-file job* "
        "(`--changed-blocks off`: overlay, rsync delta of the whole image) and the "
        "*changed-block job* (`--changed-blocks auto`: its full reads the whole image and "
        "makes a checkpoint; its incrementals are push-mode `backup-begin` reads of the "
        "clusters written since, a set of the job's `changes` collection; every one of "
        "them was checked to have read `changes` in the job's status file).  "
        "virtnbdbackup backs up a *twin*: a second domain on a copy of the image that gets "
        "the same guest writes (virtnbdbackup refuses a domain with a checkpoint not its "
        "own, and the changed-block job keeps one).  file:// backends and outputs on the "
        "same ext4 disk as the image.  In each round every tool runs once per step, side by "
        "side, in an order that rotates from round to round; ratios are per round, then "
        "the median (min-max) over the rounds.  Before each command: `sync`, the page "
        "cache dropped (`drop_caches`: pages a command's output finds freed or fresh "
        "cost differently in this VM), the image read once (warm page cache), `sync`.",
        "",
        "*tree rchar*: bytes the command's process tree read through read(2)-family "
        "calls (`/proc/self/io` of the bench before and after: a reaped child's counters "
        "are added to its parent's); it includes, besides the image, gpg reading the tar "
        "volumes from duplicity's pipe (~1x the upload of an encrypted run), virt-dup's "
        "sha256 of every file, signatures and Python's own files; for a changed-block "
        "read, the changes file QEMU wrote, not the image.  *QEMU rchar*: the delta of the "
        "domain's QEMU process (virtnbdbackup's reads through NBD, in the twin's; a "
        "changed-block read's reads of the image).  *uploaded*: new bytes in the job's "
        "collection (its `changes` collection included) / the output directory (volumes, "
        "signatures, manifests; virtnbdbackup's data, checkpoint and config files).",
        "",
    ]
    for result in results:
        lines += render_scenario(result)
    lines += [*render_targets(results), ""]
    lines += render_attribution(extras.sources, extras.image_size)
    for profile in extras.profiles:
        lines += render_profile(profile)
    lines += [SECTION_END, ""]
    return "\n".join(lines)


def write_section(results_file: Path, section: str) -> None:
    text = results_file.read_text() if results_file.exists() else "# Benchmark results\n\n"
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(SECTION_END) :].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results_file.write_text(text)


def stop_on_signal(number: int, _frame: FrameType | None) -> None:
    raise Stopped(f"signal {signal.Signals(number).name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        type=Scenario.parse,
        action="append",
        help="KIND:MIB:ROUNDS[:restore] (repeatable; default random:1024:5:restore)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy one full backup")
    parser.add_argument(
        "--attribute", action="store_true", help="strace: which files the bytes read come from"
    )
    parser.add_argument("--deadline", type=float, help="minutes: skip rounds ending later")
    parser.add_argument("--stop-file", type=Path, default=Path("/tmp/bench-stop"))
    parser.add_argument("--results", type=Path, help="Markdown file to put the section in")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="scratch space")
    arguments = parser.parse_args()
    scenarios = arguments.scenario or [Scenario.parse("random:1024:5:restore")]
    python = Path(sys.executable)
    if python.is_relative_to(ROOT):
        python = python.relative_to(ROOT)
    command = shlex.join([os.fspath(python), "bench/backup_costs.py", *sys.argv[1:]])

    signal.signal(signal.SIGTERM, stop_on_signal)
    started = time.monotonic()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    host = machine()
    work = Path(tempfile.mkdtemp(prefix="vdb-costs-", dir=arguments.workdir))
    gnupg_home, key = make_gpg_home()
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    connection = libvirt.open("qemu:///system")
    session = new_session_id()
    budget = Budget(arguments.stop_file, arguments.deadline)
    (work / "logs").mkdir()
    meter = Meter(work / "logs", budget)
    results: list[ScenarioResult] = []
    extras = Extras(attribute=arguments.attribute, profile=arguments.profile)
    # The profile and the attribution: on the smallest random-data scenario.
    extras_on = min(
        range(len(scenarios)), key=lambda n: (scenarios[n].kind != "random", scenarios[n].size)
    )
    stopped = ""
    try:
        for number, scenario in enumerate(scenarios):
            result = ScenarioResult(scenario)
            if not budget.allows(estimate(results, scenario)):
                result.skipped = "not run: out of time"
                results.append(result)
                continue
            results.append(result)
            run_scenario(
                connection,
                session,
                work,
                (gnupg_home, key),
                meter,
                result,
                results,
                extras if number == extras_on else None,
            )
    except (Stopped, KeyboardInterrupt) as error:
        stopped = str(error) or "interrupted"
        print(f"stopped: {stopped}", file=sys.stderr)
    except BenchError as error:
        stopped = f"failed: {error}"
        print(stopped, file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        connection.close()
        run(["gpgconf", "--homedir", os.fspath(gnupg_home), "--kill", "all"], ok_codes=range(256))
        shutil.rmtree(gnupg_home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    section = render(when, host, command, results, extras, stopped)
    section = section.replace(
        SECTION_END, f"(bench took {time.monotonic() - started:.0f} s)\n\n{SECTION_END}"
    )
    print(section)
    if arguments.results:
        write_section(arguments.results, section)


if __name__ == "__main__":
    main()
