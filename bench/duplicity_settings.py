#!/usr/bin/env python3
"""Which duplicity settings suit qcow2 images: compression and --max-blocksize.

Makes a 1 GiB qcow2 of random data (incompressible, like most guest data),
then measures, through virt-dup's own adapter (virt_dup.duplicity) on a
file:// backend:

1. full backups with each compression setting, unencrypted and with a GPG
   key, against a bare ``cp`` of the image (same run, warm page cache);
2. for several ``--max-blocksize`` values: a full backup, then 1 % of the
   image rewritten in scattered 4 KiB writes (``qemu-io``, the same offsets
   for every value), then the incremental: time, bytes uploaded (split into
   data volumes and signatures), and the growth of the local cache.

Usage: ``.venv/bin/python bench/duplicity_settings.py [--results bench/RESULTS.md]``
(root not needed; ~3 minutes on 2 cores; needs ~6 GiB in $TMPDIR).  Prints
a Markdown section; with ``--results`` it replaces that section of the file
(between its markers) or appends it, leaving other sections alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))

from virt_dup.duplicity import arguments as duplicity_arguments
from virt_dup.duplicity.runner import Duplicity, find_executable
from virt_dup.duplicity.target import Target, environment, secrets
from virt_dup.execute import run

MIB = 1024 * 1024
GIB = 1024 * MIB
IMAGE_SIZE = 1 * GIB
WRITE_SIZE = 4096
CHANGED_FRACTION = 0.01
BLOCK_SIZES: tuple[int | None, ...] = (None, 4096, 16384, 65536)
SECTION_START = "<!-- bench/duplicity_settings.py: start -->"
SECTION_END = "<!-- bench/duplicity_settings.py: end -->"


def directory_size(path: Path, pattern: str = "*") -> int:
    return sum(entry.stat().st_size for entry in path.rglob(pattern) if entry.is_file())


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    started = time.monotonic()
    elapsed: list[float] = []
    yield lambda: elapsed[0]
    elapsed.append(time.monotonic() - started)


def make_image(work: Path) -> Path:
    raw = work / "random.raw"
    with raw.open("wb") as stream:
        for _ in range(IMAGE_SIZE // (64 * MIB)):
            stream.write(os.urandom(64 * MIB))
    image = work / "disk.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(raw), os.fspath(image)])
    raw.unlink()
    return image


def scattered_writes(image: Path, seed: int = 1) -> int:
    """Rewrite 1 % of the image in 4 KiB writes at random aligned offsets."""
    rng = random.Random(seed)
    blocks = IMAGE_SIZE // WRITE_SIZE
    count = int(blocks * CHANGED_FRACTION)
    commands: list[str] = []
    for number, block in enumerate(sorted(rng.sample(range(blocks), count))):
        pattern = number % 255 + 1
        commands += ["-c", f"write -q -P {pattern} {block * WRITE_SIZE} {WRITE_SIZE}"]
    run(["qemu-io", "-f", "qcow2", *commands, os.fspath(image)])
    return count * WRITE_SIZE


def make_gpg_home(work: Path) -> tuple[Path, str]:
    home = Path(tempfile.mkdtemp(prefix="vdb-gnupg-"))  # short: agent socket path limit
    home.chmod(0o700)
    gpg = ["gpg", "--homedir", os.fspath(home), "--batch"]
    user = "bench <bench@example.invalid>"
    run([*gpg, "--passphrase", "", "--quick-gen-key", user, "default", "default", "never"])
    colons = run([*gpg, "--with-colons", "--list-secret-keys", user]).stdout
    fingerprint = next(line.split(":")[9] for line in colons.splitlines() if line[:4] == "fpr:")
    return home, fingerprint


@dataclass(frozen=True)
class FullResult:
    label: str
    seconds: float
    stored: int


@dataclass(frozen=True)
class IncrementalResult:
    label: str
    full_seconds: float
    full_signature: int
    seconds: float
    volumes: int
    signature: int
    manifest: int
    reported: int
    cache_growth: int


def full_backup(target: Target, image: Path, extra: tuple[str, ...] = ()) -> float:
    """One full backup; ``extra`` options go through execute.run directly."""
    if not extra:
        with timed() as elapsed:
            Duplicity().backup(target, [os.fspath(image)], full=True)
        return elapsed()
    arguments = duplicity_arguments.backup_arguments(target, True, "/", [os.fspath(image)])
    with timed() as elapsed:
        run(
            [find_executable(), *arguments[:1], *extra, *arguments[1:]],
            environment=environment(target),
            secrets=secrets(target),
        )
    return elapsed()


def bench_compression(work: Path, image: Path, gpg_home: Path, key: str) -> list[FullResult]:
    plain: dict[str, object] = {"encryption": "none"}
    gpg: dict[str, object] = {"encryption": "gpg", "encrypt_keys": (key,), "gnupg_home": gpg_home}
    cases: list[tuple[str, dict[str, object], bool, tuple[str, ...]]] = [
        ("no encryption, gzip (duplicity default)", plain, True, ()),
        ("no encryption, `--no-compression`", plain, False, ()),
        ("gpg, default (gpg compresses)", gpg, True, ()),
        ("gpg, `--no-compression`", gpg, False, ()),
        (
            "gpg, `--gpg-options=--compress-algo=none`",
            gpg,
            True,
            ("--gpg-options=--compress-algo=none",),
        ),
    ]
    results = []
    for number, (label, crypto, compression, extra) in enumerate(cases):
        target = Target(
            url=(work / f"full-{number}").as_uri(),
            archive_dir=work / f"cache-full-{number}",
            name="bench",
            compression=compression,
            **crypto,  # type: ignore[arg-type]
        )
        seconds = full_backup(target, image, extra)
        stored = directory_size(work / f"full-{number}")
        results.append(FullResult(label, seconds, stored))
        print(f"  {label}: {seconds:.1f} s, {stored / MIB:.1f} MiB", file=sys.stderr)
        shutil.rmtree(work / f"full-{number}")
        shutil.rmtree(work / f"cache-full-{number}")
    return results


def bench_block_sizes(
    work: Path, image: Path, gpg_home: Path, key: str
) -> tuple[list[IncrementalResult], int]:
    results = []
    changed = 0
    cases: list[tuple[str, int | None, bool]] = [
        (f"{size}" if size else "default (sqrt(size) = 32768 here)", size, False)
        for size in BLOCK_SIZES
    ]
    cases.append(("4096, gpg", 4096, True))
    for number, (label, block_size, encrypted) in enumerate(cases):
        copy = work / f"inc-{number}.qcow2"
        shutil.copyfile(image, copy)
        backend = work / f"inc-{number}"
        cache = work / f"cache-inc-{number}"
        target = Target(
            url=backend.as_uri(),
            archive_dir=cache,
            name="bench",
            encryption="gpg" if encrypted else "none",
            encrypt_keys=(key,) if encrypted else (),
            gnupg_home=gpg_home if encrypted else None,
            compression=False,
            max_blocksize=block_size,
        )
        with timed() as full_elapsed:
            Duplicity().backup(target, [os.fspath(copy)], full=True)
        full_signature = directory_size(backend, "*signatures*")
        cache_before = directory_size(cache)
        before = {entry.name for entry in backend.iterdir()}
        changed = scattered_writes(copy)
        with timed() as elapsed:
            stats = Duplicity().backup(target, [os.fspath(copy)], full=False)
        assert stats.kind == "incremental", stats
        new = [entry for entry in backend.iterdir() if entry.name not in before]
        result = IncrementalResult(
            label=label,
            full_seconds=full_elapsed(),
            full_signature=full_signature,
            seconds=elapsed(),
            volumes=sum(entry.stat().st_size for entry in new if ".difftar" in entry.name),
            signature=sum(entry.stat().st_size for entry in new if "signatures" in entry.name),
            manifest=sum(entry.stat().st_size for entry in new if ".manifest" in entry.name),
            reported=stats.bytes_uploaded,
            cache_growth=directory_size(cache) - cache_before,
        )
        results.append(result)
        print(f"  {result}", file=sys.stderr)
        copy.unlink()
        shutil.rmtree(backend)
        shutil.rmtree(cache)
    return results, changed


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
    qemu = run(["qemu-img", "--version"]).stdout.splitlines()[0]
    gpg = run(["gpg", "--version"]).stdout.splitlines()[0]
    return (
        f"{os.cpu_count()} x {cpu}, {memory_kib / 1024 / 1024:.0f} GiB RAM, "
        f"Linux {platform.release()}; duplicity {Duplicity().version()}, {gpg}, {qemu}"
    )


def render(
    when: str,
    host: str,
    copy_seconds: float,
    fulls: list[FullResult],
    incrementals: list[IncrementalResult],
    changed: int,
) -> str:
    lines = [
        SECTION_START,
        "## duplicity settings (`bench/duplicity_settings.py`)",
        "",
        f"Run {when} on {host}.",
        "1 GiB qcow2 of random data (`qemu-img convert` of urandom), file:// backend on the",
        "same disk, warm page cache, virt-dup's adapter (`virt_dup.duplicity`) with its",
        "`/` + `--include` source.  Ratios are against a bare `cp` of the image in the same",
        "run.",
        "",
        f"### Full backup, by compression setting (`cp`: {copy_seconds:.1f} s)",
        "",
        "| setting | time | x cp | stored |",
        "|---|---|---|---|",
    ]
    for full in fulls:
        lines.append(
            f"| {full.label} | {full.seconds:.1f} s | {full.seconds / copy_seconds:.1f} | "
            f"{full.stored / MIB:.0f} MiB |"
        )
    lines += [
        "",
        f"### Incremental after {changed / MIB:.1f} MiB of scattered 4 KiB writes (1 %), "
        "by `--max-blocksize`",
        "",
        "No compression; unencrypted unless it says gpg.  *uploaded* = new files on the",
        "backend (data volumes + signature + manifest); *reported* = duplicity's",
        "TotalDestinationSizeChange (volumes only); *cache* = growth of the local",
        "archive dir; *full sig* = the full backup's signature file.",
        "",
        "| max-blocksize | full | incremental | uploaded | x change | volumes | signature | "
        "reported | cache | full sig |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in incrementals:
        uploaded = result.volumes + result.signature + result.manifest
        lines.append(
            f"| {result.label} | {result.full_seconds:.1f} s | {result.seconds:.1f} s | "
            f"{uploaded / MIB:.1f} MiB | {uploaded / changed:.1f} | "
            f"{result.volumes / MIB:.1f} MiB | {result.signature / MIB:.2f} MiB | "
            f"{result.reported / MIB:.1f} MiB | {result.cache_growth / MIB:.2f} MiB | "
            f"{result.full_signature / MIB:.2f} MiB |"
        )
    lines += ["", SECTION_END, ""]
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
    parser.add_argument("--workdir", type=Path, default=None, help="scratch space (~6 GiB)")
    arguments = parser.parse_args()

    started = time.monotonic()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    host = machine()
    work = Path(tempfile.mkdtemp(prefix="vd-bench-", dir=arguments.workdir))
    gpg_home, key = make_gpg_home(work)
    try:
        print("making the image", file=sys.stderr)
        image = make_image(work)
        with image.open("rb") as stream:  # warm the page cache for cp and backups alike
            while stream.read(64 * MIB):
                pass
        with timed() as copy_elapsed:
            run(["cp", os.fspath(image), os.fspath(work / "copy.qcow2")])
        (work / "copy.qcow2").unlink()
        print(f"cp: {copy_elapsed():.1f} s; full backups", file=sys.stderr)
        fulls = bench_compression(work, image, gpg_home, key)
        print("block sizes", file=sys.stderr)
        incrementals, changed = bench_block_sizes(work, image, gpg_home, key)
    finally:
        run(["gpgconf", "--homedir", os.fspath(gpg_home), "--kill", "all"], ok_codes=range(256))
        shutil.rmtree(gpg_home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    section = render(when, host, copy_elapsed(), fulls, incrementals, changed)
    section = section.replace(
        SECTION_END, f"(bench took {time.monotonic() - started:.0f} s)\n\n{SECTION_END}"
    )
    print(section)
    if arguments.results:
        write_section(arguments.results, section)


if __name__ == "__main__":
    main()
