"""What reading the disks of one domain side by side buys (issue 14, part 4).

A backup reads each image twice: once for the manifest's SHA-256 (virt-dup's
own read, :func:`virt_dup.files.sha256_files`), once by duplicity (one process
per run, one file after the other).  virt-dup hashes the files of a run side
by side when they are on different devices or on a device that does not spin
(the kernel's ``queue/rotational``).  This bench, on one running domain
(the integration harness's, no guest OS) with ``--disks`` random-data qcow2
images of ``--size`` MiB each on one file system:

* **the hash of the images**, one after the other against side by side, with
  a warm page cache (the images read once first) and a cold one
  (``drop_caches``), in-process, ``--rounds`` times in rotating order;
* **``virt-dup run --full``** of a job of the domain (depth 0, gpg to a
  throw-away key, ``--changed-blocks off``) with the images' disk flagged as
  spinning (``queue/rotational`` = 1: read one after the other) and as not
  spinning (0: side by side), against a bare ``duplicity full`` of the same
  images with the same options, ``--rounds`` times in rotating order, the
  page cache dropped and the images read once before each.
  The flag is put back as it was afterwards.

Prints a Markdown table (medians, min-max; ratios per round).

Usage (root, libvirtd running)::

    .venv/bin/python bench/two_disks.py --disks 2 --size 1024 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))
sys.path.insert(0, os.fspath(ROOT / "bench"))
sys.path.insert(0, os.fspath(ROOT / "tests" / "integration"))

import backup_costs as costs  # noqa: E402
import libvirt  # noqa: E402
from harness.domains import DiskSpec, DomainFactory, new_session_id  # noqa: E402

from virt_dup.duplicity import arguments as duplicity_arguments  # noqa: E402
from virt_dup.duplicity.runner import find_executable  # noqa: E402
from virt_dup.duplicity.target import Target, environment  # noqa: E402
from virt_dup.files import rotational_flag, sha256_files  # noqa: E402

ONE_BY_ONE = "one after the other"
SIDE_BY_SIDE = "side by side"
RUN_SPINNING = "`virt-dup run --full`, disk flagged spinning (one after the other)"
RUN_FLAT = "`virt-dup run --full`, disk flagged not spinning (side by side)"
BARE = "bare `duplicity full`, same options"


def warm(paths: list[Path]) -> None:
    """Read ``paths`` once (into the page cache); after
    :func:`backup_costs.drop_caches` before a command (why: its docstring)."""
    os.sync()
    for path in paths:
        with path.open("rb") as stream:
            while stream.read(1 << 22):
                pass


def disk_flag(path: Path) -> Path:
    """The ``queue/rotational`` file of the whole disk that holds ``path``."""
    flag = rotational_flag(os.stat(path).st_dev)
    if flag is None:
        raise costs.BenchError(f"{path} is on no block device with a rotational flag")
    return flag


def hash_rounds(images: list[Path], rounds: int) -> dict[tuple[str, str], list[float]]:
    paths = [os.fspath(image) for image in images]
    modes: dict[str, Callable[[int], bool]] = {
        ONE_BY_ONE: lambda _device: True,
        SIDE_BY_SIDE: lambda _device: False,
    }
    times: dict[tuple[str, str], list[float]] = {}
    for cache in ("warm", "cold"):
        for number in range(rounds):
            for mode in costs.rotated(list(modes), number):
                costs.drop_caches() if cache == "cold" else warm(images)
                started = time.monotonic()
                sha256_files(paths, spinning=modes[mode])
                seconds = time.monotonic() - started
                times.setdefault((cache, mode), []).append(seconds)
                print(f"  hash, {cache}, {mode}: {seconds:.2f} s", file=sys.stderr)
    return times


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    finished = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if finished.returncode != 0:
        raise costs.BenchError(f"{' '.join(argv)} failed:\n{finished.stderr[-2000:]}")
    return seconds


def hashed_every_image(work: Path, job: str, images: list[Path]) -> None:
    """The run read every image for its checksum (none was remembered unchanged)."""
    status = json.loads((work / "state" / "status" / f"{job}.json").read_text())
    hashed = status["last_run"].get("bytes_hashed", 0)
    if hashed < sum(image.stat().st_size for image in images):
        raise costs.BenchError(f"the run hashed {hashed} bytes, not every image")


def run_rounds(
    work: Path, images: list[Path], job: str, config: Path, bare: Target, rounds: int
) -> dict[str, list[float]]:
    flag = disk_flag(images[0])
    was = flag.read_text().strip()
    times: dict[str, list[float]] = {}
    virt_dup = [sys.executable, "-m", "virt_dup", "--config", os.fspath(config)]
    try:
        for number in range(rounds):
            for tool in costs.rotated([RUN_SPINNING, RUN_FLAT, BARE], number):
                if tool == BARE:
                    shutil.rmtree(work / "bare-backend", ignore_errors=True)
                    shutil.rmtree(work / "bare-cache", ignore_errors=True)
                    (work / "bare-cache" / "bench").mkdir(parents=True)
                    argv = [
                        find_executable(),
                        *duplicity_arguments.backup_arguments(
                            bare, True, "/", [os.fspath(image) for image in images]
                        ),
                    ]
                    env = {**os.environ, **environment(bare)}
                else:
                    flag.write_text("1\n" if tool == RUN_SPINNING else "0\n")
                    argv = [*virt_dup, "run", "--full", job]
                    env = {**os.environ, "TMPDIR": os.fspath(work / "tmp")}
                costs.drop_caches()  # see warm()
                warm(images)
                seconds = timed(argv, env)
                if tool != BARE:
                    hashed_every_image(work, job, images)
                times.setdefault(tool, []).append(seconds)
                print(f"  round {number + 1}: {tool}: {seconds:.1f} s", file=sys.stderr)
    finally:
        flag.write_text(was + "\n")
    return times


def render(
    hashes: dict[tuple[str, str], list[float]],
    runs: dict[str, list[float]],
    arguments: argparse.Namespace,
    command: str,
    flag: str,
) -> str:
    lines = [
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {costs.machine()}; the images' disk "
        f"says `queue/rotational` = {flag}.",
        "",
        f"Command: `{command}`",
        "",
        f"{arguments.disks} disks of {arguments.size} MiB of random data each, one file "
        f"system; {arguments.rounds} rounds in rotating order, medians (min-max).",
        "",
        "The SHA-256 of the images (virt-dup's own read; ratio per round to one after the other):",
        "",
        "| page cache | how | time | x one after the other |",
        "|---|---|---|---|",
    ]
    for cache in ("warm", "cold"):
        serial = hashes[(cache, ONE_BY_ONE)]
        for mode in (ONE_BY_ONE, SIDE_BY_SIDE):
            values = hashes[(cache, mode)]
            ratios = [value / base for value, base in zip(values, serial, strict=True)]
            lines.append(
                f"| {cache} | {mode} | {costs.spread(values, ' s', 2)} | "
                f"{costs.spread(ratios, '', 2)} |"
            )
    lines += [
        "",
        "The whole full backup (warm page cache; ratios per round):",
        "",
        "| what | time | x bare duplicity | x one after the other |",
        "|---|---|---|---|",
    ]
    for tool in (RUN_SPINNING, RUN_FLAT, BARE):
        values = runs[tool]
        bare = [value / base for value, base in zip(values, runs[BARE], strict=True)]
        serial = [value / base for value, base in zip(values, runs[RUN_SPINNING], strict=True)]
        lines.append(
            f"| {tool} | {costs.spread(values, ' s')} | {costs.spread(bare, '', 2)} | "
            f"{costs.spread(serial, '', 2)} |"
        )
    saved = [
        statistics.median(runs[RUN_SPINNING]) - statistics.median(runs[RUN_FLAT]),
    ]
    lines += ["", f"Median time saved per full run: {saved[0]:.2f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disks", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024, help="MiB per disk (default 1024)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    arguments = parser.parse_args()
    command = " ".join([".venv/bin/python", "bench/two_disks.py", *sys.argv[1:]])
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    connection = libvirt.open("qemu:///system")
    session = new_session_id()
    work = Path(tempfile.mkdtemp(prefix="vdb-disks-", dir=arguments.workdir))
    (work / "tmp").mkdir()
    gnupg_home, key = costs.make_gpg_home()
    images_root = Path("/var/lib/libvirt/images") / f"vdt-{session}"
    size = arguments.size * costs.MIB
    targets = [f"vd{chr(ord('a') + number)}" for number in range(arguments.disks)]
    try:
        with DomainFactory(connection, session, images_root, label="bench/two_disks.py") as factory:
            vm = factory(
                disks=[DiskSpec(target=t, chain=["disk"], size=size) for t in targets],
                running=False,
            )
            images = [vm.images[target][-1] for target in targets]
            for image in images:
                costs.make_image("random", size, image, work)
            vm.domain.create()
            config = work / "virt-dup.yml"
            config.write_text(
                "libvirt:\n  uri: qemu:///system\n"
                f"backends:\n  local: file://{work / 'backend'}\n"
                f"encryption:\n  keys: [{key}]\n  gnupg_home: {gnupg_home}\n"
                f"state_dir: {work / 'state'}\ncache_dir: {work / 'cache'}\n"
                "defaults:\n  backends: [local]\n"
            )
            added = subprocess.run(
                [sys.executable, "-m", "virt_dup", "--config", os.fspath(config), "add-job",
                 vm.name, "--depth", "0", "--changed-blocks", "off"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            job = added.stdout.strip().splitlines()[0]
            bare = Target(
                url=(work / "bare-backend").as_uri(),
                archive_dir=work / "bare-cache",
                name="bench",
                encrypt_keys=(key,),
                gnupg_home=gnupg_home,
                tempdir=work / "bare-cache" / "bench",
            )
            flag = disk_flag(images[0]).read_text().strip()
            print("hashing", file=sys.stderr)
            hashes = hash_rounds(images, arguments.rounds)
            print("backing up", file=sys.stderr)
            runs = run_rounds(work, images, job, config, bare, arguments.rounds)
            Path(f"/run/virt-dup/locks/{vm.uuid}.lock").unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(gnupg_home, ignore_errors=True)
    print(render(hashes, runs, arguments, command, flag))


if __name__ == "__main__":
    main()
