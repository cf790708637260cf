#!/usr/bin/env python3
"""What a ``virt-dup run`` incremental costs after 1 % of a live disk changed.

A running domain (real libvirtd + QEMU/KVM) with one 1 GiB qcow2 of random
data and a virt-dup job (depth 0, gpg-encrypted to a throw-away key, file://
backend on the same disk):

1. ``virt-dup run`` (a full backup), as systemd would start it;
2. the guest rewrites 1 % of its disk in scattered 4 KiB writes, through its
   own virtio disk (HMP ``qemu-io``, as a guest's writes would arrive);
3. ``virt-dup run`` again (an incremental).

Each run's bytes uploaded (new files on the backend: volumes, signatures,
manifest) against the bytes changed, and its time.  In the same run, for
comparison: bare ``duplicity`` full and incremental of the same image
before/after the same change, with virt-dup's settings (``--no-compression
--max-blocksize 4096``), unencrypted and with the gpg key, and a ``cp`` of
the image.

Usage (root, libvirtd running): ``.venv/bin/python bench/incremental.py
[--results bench/RESULTS.md]``; about 2 minutes; needs ~5 GiB.  Prints a
Markdown section; with ``--results`` it replaces that section of the file
(between its markers) or appends it, leaving other sections alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))
# The throw-away domain comes from the integration tests' harness.
sys.path.insert(0, os.fspath(ROOT / "tests" / "integration"))

import libvirt  # noqa: E402
import libvirt_qemu  # noqa: E402
from harness.domains import DomainFactory, new_session_id  # noqa: E402

from virt_dup.duplicity.runner import Duplicity, find_executable  # noqa: E402
from virt_dup.execute import run  # noqa: E402
from virt_dup.files import sha256_file  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
IMAGE_SIZE = 1 * GIB
WRITE_SIZE = 4096
CHANGED_FRACTION = 0.01
TARGET_RATIO = 1.5
SECTION_START = "<!-- bench/incremental.py: start -->"
SECTION_END = "<!-- bench/incremental.py: end -->"


@dataclass(frozen=True)
class Measured:
    label: str
    seconds: float
    uploaded: int  # new files on the backend
    reported: int | None = None  # duplicity's TotalDestinationSizeChange


def timed(command: list[str], environment: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    run(command, environment=environment, timeout=1800)
    return time.monotonic() - started


def directory_size(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def make_gpg_home() -> tuple[Path, str]:
    home = Path(tempfile.mkdtemp(prefix="vdb-gnupg-"))  # short: agent socket path limit
    gpg = ["gpg", "--homedir", os.fspath(home), "--batch"]
    user = "bench <bench@example.invalid>"
    run([*gpg, "--passphrase", "", "--quick-gen-key", user, "default", "default", "never"])
    colons = run([*gpg, "--with-colons", "--list-secret-keys", user]).stdout
    fingerprint = next(line.split(":")[9] for line in colons.splitlines() if line[:4] == "fpr:")
    return home, fingerprint


def random_qcow2(path: Path, work: Path) -> None:
    raw = work / "random.raw"
    with raw.open("wb") as stream:
        for _ in range(IMAGE_SIZE // (64 * MIB)):
            stream.write(os.urandom(64 * MIB))
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(raw), os.fspath(path)])
    raw.unlink()


def guest_writes(domain: libvirt.virDomain, log: Path, seed: int = 1) -> tuple[int, float]:
    """1 % of the disk in 4 KiB writes at distinct random aligned offsets, through
    the guest's virtio disk; returns (bytes changed, seconds)."""
    rng = random.Random(seed)
    blocks = IMAGE_SIZE // WRITE_SIZE
    offsets = sorted(rng.sample(range(blocks), int(blocks * CHANGED_FRACTION)))
    device = "/machine/peripheral/virtio-disk0/virtio-backend"
    log_start = log.stat().st_size
    started = time.monotonic()
    for number, block in enumerate(offsets):
        command = f"write -P {number % 255 + 1} {block * WRITE_SIZE} {WRITE_SIZE}"
        libvirt_qemu.qemuMonitorCommand(
            domain,
            f'qemu-io -d {device} "{command}"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
        )
    libvirt_qemu.qemuMonitorCommand(
        domain, f'qemu-io -d {device} "flush"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )
    seconds = time.monotonic() - started
    # QEMU reports each write in the domain log, not on the monitor.
    with log.open("rb") as stream:
        stream.seek(log_start)
        confirmed = stream.read().decode(errors="replace").count(f"wrote {WRITE_SIZE}/")
    if confirmed != len(offsets):
        raise SystemExit(f"QEMU confirmed {confirmed} of {len(offsets)} writes; see {log}")
    return len(offsets) * WRITE_SIZE, seconds


class VirtDup:
    """``virt-dup`` as a separate process with its own virt-dup.yml."""

    def __init__(self, work: Path, gnupg_home: Path, key: str) -> None:
        self.work = work
        self.backend = work / "virt-dup-backend"
        self.state = work / "state"
        self.config = work / "virt-dup.yml"
        (work / "tmp").mkdir()
        self.config.write_text(
            "libvirt:\n  uri: qemu:///system\n"
            f"backends:\n  local: file://{self.backend}\n"
            f"encryption:\n  keys: [{key}]\n  gnupg_home: {gnupg_home}\n"
            f"state_dir: {self.state}\ncache_dir: {work / 'cache'}\n"
            "defaults:\n  backends: [local]\n"
        )

    def __call__(self, *arguments: str) -> str:
        finished = subprocess.run(
            [sys.executable, "-m", "virt_dup", "--config", os.fspath(self.config), *arguments],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "TMPDIR": os.fspath(self.work / "tmp")},
        )
        if finished.returncode != 0:
            raise SystemExit(f"virt-dup {' '.join(arguments)} failed:\n{finished.stderr}")
        return finished.stdout

    def backup(self, job: str, label: str) -> Measured:
        before = directory_size(self.backend) if self.backend.exists() else 0
        started = time.monotonic()
        self("run", job)
        seconds = time.monotonic() - started
        status = json.loads((self.state / "status" / f"{job}.json").read_text())["last_run"]
        return Measured(
            label, seconds, directory_size(self.backend) - before, status["bytes_uploaded"]
        )


def bare_duplicity(
    work: Path, image: Path, name: str, crypto: list[str], gnupg_home: Path
) -> tuple[float, Path]:
    """A bare duplicity full of ``image`` into a backend of its own; (seconds, backend)."""
    backend = work / f"{name}-backend"
    seconds = timed(bare_command("full", work, image, name, crypto), _environment(gnupg_home))
    return seconds, backend


def bare_command(action: str, work: Path, image: Path, name: str, crypto: list[str]) -> list[str]:
    return [
        find_executable(),
        action,
        "--archive-dir",
        os.fspath(work / "bare-cache"),
        "--name",
        name,
        *crypto,
        "--no-compression",
        "--max-blocksize",
        "4096",
        "--include",
        os.fspath(image),
        "--exclude",
        "**",
        "/",
        (work / f"{name}-backend").as_uri(),
    ]


def _environment(gnupg_home: Path) -> dict[str, str]:
    return {"GNUPGHOME": os.fspath(gnupg_home), "PASSPHRASE": ""}


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
    gpg = run(["gpg", "--version"]).stdout.splitlines()[0]
    return (
        f"{os.cpu_count()} x {cpu}, {memory_kib / 1024 / 1024:.0f} GiB RAM, "
        f"Linux {platform.release()}; libvirt {libvirt_version}, {qemu}; "
        f"duplicity {Duplicity().version()}, {gpg}"
    )


def render(
    when: str,
    host: str,
    domain_type: str,
    copy_seconds: float,
    checksum_seconds: float,
    changed: int,
    write_seconds: float,
    rows: list[Measured],
) -> str:
    virt_dup_incremental = next(row for row in rows if row.label.startswith("`virt-dup run`, inc"))
    ratio = virt_dup_incremental.uploaded / changed
    verdict = "within" if ratio <= TARGET_RATIO else "**over**"
    lines = [
        SECTION_START,
        "## Incremental of a running domain (`bench/incremental.py`)",
        "",
        f"Run {when} on {host}.",
        f"A running domain (`{domain_type}`) with one 1 GiB qcow2 of random data; a virt-dup "
        "job with its defaults (depth 0, gpg to a throw-away key, `--no-compression "
        "--max-blocksize 4096`), file:// backend on the same disk, warm page cache.  "
        f"Between the full and the incremental the guest rewrote {changed / MIB:.1f} MiB "
        f"(1 %) in {changed // WRITE_SIZE} scattered 4 KiB writes through its virtio disk "
        f"(HMP `qemu-io`, {write_seconds:.1f} s).  Bare duplicity backed up the same image "
        "before and after the same change, with the same settings.",
        "",
        "*uploaded* = new files on the backend (volumes + signature + manifest); "
        "*reported* = duplicity's TotalDestinationSizeChange (volumes only).",
        "",
        "| what | time | x cp | uploaded | x change | reported |",
        "|---|---|---|---|---|---|",
        f"| `cp` of the image | {copy_seconds:.1f} s | 1.0 | | | |",
    ]
    for row in rows:
        incremental = "incremental" in row.label
        lines.append(
            f"| {row.label} | {row.seconds:.1f} s | {row.seconds / copy_seconds:.1f} | "
            f"{row.uploaded / MIB:.1f} MiB | "
            f"{f'{row.uploaded / changed:.2f}' if incremental else ''} | "
            f"{'' if row.reported is None else f'{row.reported / MIB:.1f} MiB'} |"
        )
    bare = next(row for row in rows if row.label == "bare duplicity incremental, gpg")
    lines += [
        "",
        f"Target: the incremental uploads at most {TARGET_RATIO}x the changed bytes: "
        f"{ratio:.2f}x, {verdict}.  virt-dup's incremental took "
        f"{virt_dup_incremental.seconds - bare.seconds:+.1f} s against bare duplicity "
        "with gpg: the sha256 of every file backed up, for the metadata folder (a second "
        f"full read of the image: {checksum_seconds:.1f} s here, alone), `collection-status` "
        "first, the overlay and its merge, starting Python and libvirt.",
        "",
        SECTION_END,
        "",
    ]
    return "\n".join(lines)


def write_section(results_file: Path, section: str) -> None:
    text = results_file.read_text() if results_file.exists() else "# Benchmark results\n\n"
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(SECTION_END) :].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results_file.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="Markdown file to put the section in")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch space (~4 GiB)")
    arguments = parser.parse_args()

    started = time.monotonic()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    host = machine()
    work = Path(tempfile.mkdtemp(prefix="vd-bench-", dir=arguments.workdir))
    gnupg_home, key = make_gpg_home()
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    connection = libvirt.open("qemu:///system")
    session = new_session_id()
    images = Path("/var/lib/libvirt/images") / f"vdb-{session}"
    rows: list[Measured] = []
    try:
        with DomainFactory(connection, session, images, label="bench/incremental.py") as factory:
            vm = factory(name_prefix="vdb", chain=["disk"], size=IMAGE_SIZE, running=False)
            (image,) = vm.images["vda"]
            print("making the image", file=sys.stderr)
            random_qcow2(image, work)
            vm.domain.create()
            copy_seconds = timed(["cp", os.fspath(image), os.fspath(work / "copy.qcow2")])
            (work / "copy.qcow2").unlink()
            checksum_started = time.monotonic()
            sha256_file(os.fspath(image))  # what write_metadata does for every file
            checksum_seconds = time.monotonic() - checksum_started

            virt_dup = VirtDup(work, gnupg_home, key)
            job = virt_dup("add-job", vm.name, "--depth", "0").strip().splitlines()[0]
            print("virt-dup full", file=sys.stderr)
            rows.append(virt_dup.backup(job, "`virt-dup run`, full"))
            bare = {
                "no encryption": ["--no-encryption"],
                "gpg": ["--encrypt-key", key],
            }
            backends = {}
            for label, crypto in bare.items():
                print(f"bare duplicity full, {label}", file=sys.stderr)
                name = label.replace(" ", "-")
                seconds, backends[label] = bare_duplicity(work, image, name, crypto, gnupg_home)
                rows.append(
                    Measured(
                        f"bare duplicity full, {label}", seconds, directory_size(backends[label])
                    )
                )

            print("guest writes", file=sys.stderr)
            changed, write_seconds = guest_writes(vm.domain, vm.log_path)

            print("virt-dup incremental", file=sys.stderr)
            rows.append(virt_dup.backup(job, "`virt-dup run`, incremental"))
            for label, crypto in bare.items():
                print(f"bare duplicity incremental, {label}", file=sys.stderr)
                before = directory_size(backends[label])
                name = label.replace(" ", "-")
                seconds = timed(
                    bare_command("incremental", work, image, name, crypto),
                    _environment(gnupg_home),
                )
                rows.append(
                    Measured(
                        f"bare duplicity incremental, {label}",
                        seconds,
                        directory_size(backends[label]) - before,
                    )
                )
    finally:
        connection.close()
        run(["gpgconf", "--homedir", os.fspath(gnupg_home), "--kill", "all"], ok_codes=range(256))
        shutil.rmtree(gnupg_home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)
    rows.sort(key=lambda row: ("incremental" in row.label, not row.label.startswith("`")))
    section = render(
        when,
        host,
        factory.domain_type,
        copy_seconds,
        checksum_seconds,
        changed,
        write_seconds,
        rows,
    )
    section = section.replace(
        SECTION_END, f"(bench took {time.monotonic() - started:.0f} s)\n\n{SECTION_END}"
    )
    print(section)
    if arguments.results:
        write_section(arguments.results, section)


if __name__ == "__main__":
    main()
