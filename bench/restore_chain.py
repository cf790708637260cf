"""What a restore of a changed-block chain costs, against a bare duplicity restore.

One running domain (the integration harness's, no guest OS) with a random-data
qcow2 of ``--size`` MiB, one virt-dup job (``--changed-blocks auto``, depth 0,
gpg to a throw-away key, the options of ``bench/backup_costs.py``) and a bare
``duplicity full`` of the same image with the same options.  The job makes a
full, then ``--sets`` changed-block sets, each after ``--percent`` of the disk
rewritten in scattered ``--write-size`` guest writes (HMP ``qemu-io``, as in
``bench/backup_costs.py``).  The chain is built once; then, ``--rounds``
times, side by side:

* the bare ``duplicity restore`` of the bare full (the issue's yardstick);
* ``virt-dup restore`` of the latest point from each ``--tree`` (a checkout
  with its own ``.venv``, else this one's; e.g. ``git worktree add`` of the
  commit before a change): ``TREE`` as is,
  ``TREE:nocache`` with the metadata cache emptied first (a restore on a
  host that did not make the backups, or before runs kept their metadata).

Before each command: ``sync``, the page cache dropped, the collections read once (warm page cache),
``sync``.  Prints a Markdown table (medians, min-max, ratios to the bare
restore of the same round).

Usage (root, libvirtd running)::

    .venv/bin/python bench/restore_chain.py --tree /work/before:nocache --tree .:nocache \\
        --tree . --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT))
sys.path.insert(0, os.fspath(ROOT / "bench"))
sys.path.insert(0, os.fspath(ROOT / "tests" / "integration"))

import backup_costs as costs  # noqa: E402
import libvirt  # noqa: E402
from harness.domains import DomainFactory, new_session_id  # noqa: E402

from virt_dup.duplicity import arguments as duplicity_arguments  # noqa: E402
from virt_dup.duplicity.runner import find_executable  # noqa: E402
from virt_dup.duplicity.target import environment  # noqa: E402

BARE = "bare `duplicity restore` of the full"


def warm(work: Path) -> None:
    costs.drop_caches()
    for path in work.rglob("*"):
        if path.is_file() and "backend" in path.parts[len(work.parts)]:
            with path.open("rb") as stream:
                while stream.read(1 << 22):
                    pass
    os.sync()


def timed(argv: list[str], cwd: Path | None, env: dict[str, str]) -> float:
    started = time.monotonic()
    finished = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if finished.returncode != 0:
        raise costs.BenchError(f"{' '.join(argv)} failed:\n{finished.stderr[-2000:]}")
    return seconds


def build_chain(subject: costs.Subject, vm, arguments: argparse.Namespace) -> None:
    subject.backup(costs.CHANGES_JOB, full=True)
    subject.backup(costs.DUPLICITY, full=True)
    change = costs.Change("chain", arguments.percent / 100, arguments.write_size)
    for number in range(arguments.sets):
        costs.guest_writes([vm], change, arguments.size * costs.MIB, seed=number)
        sample = subject.backup(costs.CHANGES_JOB, full=False)
        print(f"  set {number + 1}: {costs.human(sample.uploaded)} uploaded", file=sys.stderr)


def measure(subject: costs.Subject, work: Path, trees: list[str], rounds: int) -> dict:
    times: dict[str, list[float]] = {}
    target = work / "restored"
    for number in range(rounds):
        for tool in costs.rotated([BARE, *trees], number):
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            if tool == BARE:
                argv = [
                    find_executable(),
                    *duplicity_arguments.restore_arguments(
                        subject.bare,
                        subject._bare_full_time(),
                        os.fspath(subject.image),
                        target / subject.image.name,
                    ),
                ]
                cwd, env = None, {**os.environ, **environment(subject.bare)}
            else:
                tree, _, mode = tool.partition(":")
                if mode == "nocache":
                    shutil.rmtree(subject.cache / "metadata", ignore_errors=True)
                job = subject.jobs[costs.CHANGES_JOB]
                venv = Path(tree).resolve() / ".venv" / "bin" / "python"
                argv = [
                    # a tree without a venv of its own: this one's (its cwd comes first)
                    os.fspath(venv if venv.exists() else sys.executable),
                    "-m",
                    "virt_dup",
                    "--config",
                    os.fspath(subject.config),
                    "restore",
                    job,
                    "--target-dir",
                    os.fspath(target),
                ]
                cwd, env = Path(tree).resolve(), {**os.environ, "TMPDIR": os.fspath(work / "tmp")}
            warm(work)
            seconds = timed(argv, cwd, env)
            times.setdefault(tool, []).append(seconds)
            print(f"  round {number + 1}: {tool}: {seconds:.1f} s", file=sys.stderr)
    shutil.rmtree(target, ignore_errors=True)
    return times


def render(times: dict[str, list[float]], arguments: argparse.Namespace, command: str) -> str:
    bare = times[BARE]
    lines = [
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {costs.machine()}.",
        "",
        f"Command: `{command}`",
        "",
        f"{arguments.size} MiB of random data, 1 full + {arguments.sets} changed-block sets, "
        f"each after {arguments.percent:g} % of the disk in scattered "
        f"{arguments.write_size // 1024} KiB writes; {arguments.rounds} rounds, medians (min-max); "
        "ratios per round to the bare restore of the same round:",
        "",
        "| what | time | x bare restore of the full |",
        "|---|---|---|",
    ]
    for tool, values in times.items():
        ratios = [value / base for value, base in zip(values, bare, strict=True)]
        name = BARE if tool == BARE else f"`virt-dup restore` of the latest point, `{tool}`"
        lines.append(f"| {name} | {costs.spread(values, ' s')} | {costs.spread(ratios, '', 2)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="TREE or TREE:nocache")
    parser.add_argument("--size", type=int, default=1024, help="MiB (default 1024)")
    parser.add_argument("--sets", type=int, default=7, help="changed-block sets (default 7)")
    parser.add_argument("--percent", type=float, default=1.0, help="of the disk per set")
    parser.add_argument("--write-size", type=int, default=4096, help="bytes per guest write")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    arguments = parser.parse_args()
    trees = arguments.tree or ["."]
    command = " ".join([".venv/bin/python", "bench/restore_chain.py", *sys.argv[1:]])
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    connection = libvirt.open("qemu:///system")
    session = new_session_id()
    work = Path(tempfile.mkdtemp(prefix="vdb-restore-", dir=arguments.workdir))
    gnupg_home, key = costs.make_gpg_home()
    images = Path("/var/lib/libvirt/images") / f"vdt-{session}"
    try:
        with DomainFactory(connection, session, images, label="bench/restore_chain.py") as factory:
            size = arguments.size * costs.MIB
            vm = factory(chain=["disk"], size=size, running=False)
            # backup_costs.Subject wants a twin (virtnbdbackup's); it stays unused.
            twin = factory(chain=["disk"], size=16 * costs.MIB, running=True)
            costs.make_image("random", size, vm.images["vda"][-1], work)
            vm.domain.create()
            (work / "logs").mkdir()
            meter = costs.Meter(work / "logs", costs.Budget(work / "no-stop-file", None))
            meter.qemu_pid = int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text())
            subject = costs.Subject(work, vm, twin, gnupg_home, key, meter)
            try:
                print("building the chain", file=sys.stderr)
                build_chain(subject, vm, arguments)
                times = measure(subject, work, trees, arguments.rounds)
            finally:
                subject.reset()
                Path(f"/run/virt-dup/locks/{vm.uuid}.lock").unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(gnupg_home, ignore_errors=True)
    print(render(times, arguments, command))


if __name__ == "__main__":
    main()
