"""A ``virt-dup run`` killed with SIGKILL, and what puts the domain back.

The run is killed (by its pid, as the OOM killer or systemd's final kill
would) at three points:

* ``overlay``: right after its overlay exists;
* during duplicity, which leaves one of two things behind: ``duplicity-reading``
  (killed while it reads the first volume's worth of the image: only a
  temporary directory in its cache) and ``duplicity-uploaded`` (killed after
  it uploaded a volume: a partial backup set on the backend and in the
  cache, which duplicity would resume);
* ``merge``: while QEMU commits the overlay back (a block commit job is
  running: 128 MiB written into the overlay make it last long enough to
  be seen).

Then either the next ``virt-dup run`` of the job, or ``virt-dup recover``
(what the boot unit runs) followed by a run, must bring the domain back to
its original chain (live and persistent) with every write made while the
overlay existed in the original top image, leave no overlay and no run
record, and make a backup that plain duplicity restores to exactly the chain
as it was when that run started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness.backups import (
    BackupEnvironment,
    children,
    command_of,
    fill,
    process_ended,
    restored_path,
    sha256,
    snapshot_files,
    wait_for,
)
from harness.domains import MIB, ScratchDomain
from harness.manager import UserManager, user_manager  # noqa: F401 - fixture

from virt_dup.actions.recover import recover_all
from virt_dup.backup.state import StateStore
from virt_dup.duplicity import arguments as duplicity_arguments
from virt_dup.duplicity.cache import discard_interrupted_backup, partial_files
from virt_dup.duplicity.collection import full_is_due
from virt_dup.duplicity.runner import Duplicity, find_executable
from virt_dup.duplicity.target import Target, environment
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.systemd import journal

pytestmark = pytest.mark.integration

DURING = [(0xC1, 1 * MIB), (0xC2, 17 * MIB), (0xC3, 100 * MIB)]  # 1 MiB each, before the kill
AFTER_KILL = (0xC4, 130 * MIB)  # still on the overlay, before recovery
BIG_WRITE = (0xAB, 160 * MIB, 128 * MIB)  # makes the block commit take a while
#: Data in the top image when duplicity is killed: for ``duplicity-uploaded``
#: more than two volumes (200 MiB each), so that two are on the backend.
DATA = {"duplicity-reading": 64 * MIB, "duplicity-uploaded": 424 * MIB}
SIZE = {"overlay": 192, "duplicity-reading": 192, "duplicity-uploaded": 448, "merge": 320}


def descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def duplicity_child(pid: int) -> int | None:
    for child in children(pid):
        if any(word.endswith("/duplicity") for word in command_of(child)[:2]):
            return child
    return None


def read_position(pid: int | None, path: Path) -> int:
    """How far process ``pid`` has read the file ``path`` (0: not open)."""
    if pid is None:
        return 0
    try:
        for descriptor in Path(f"/proc/{pid}/fd").iterdir():
            if os.readlink(descriptor) == os.fspath(path):
                info = Path(f"/proc/{pid}/fdinfo/{descriptor.name}").read_text()
                return int(info.split("pos:")[1].split()[0])
    except (OSError, IndexError):
        pass
    return 0


def on_overlay(vm: ScratchDomain) -> bool:
    return ".virt-dup-" in str(vm.disk_source("vda"))


def leftover_overlays(vm: ScratchDomain) -> list[Path]:
    return sorted(vm.directory.rglob("*.virt-dup-*"))


def kill_run(
    kill_point: str, run: subprocess.Popen[str], vm: ScratchDomain, backend: Path
) -> list[int]:
    """Write the DURING patterns while the overlay exists, then SIGKILL the run
    at ``kill_point``; returns the run's descendants at that moment.
    ``backend``: the job's directory on the backend."""
    top = vm.images["vda"][-1]
    wait_for(lambda: on_overlay(vm) or run.poll() is not None, 60, "the overlay")
    assert run.poll() is None, run.communicate()
    if kill_point == "overlay":
        os.kill(run.pid, signal.SIGKILL)
        for pattern, offset in DURING:
            vm.write_pattern("vda", pattern, offset, MIB)
        return []
    if kill_point.startswith("duplicity"):
        for pattern, offset in DURING:
            vm.write_pattern("vda", pattern, offset, MIB)
        if kill_point == "duplicity-reading":
            wait_for(
                lambda: (
                    read_position(duplicity_child(run.pid), top) > 8 * MIB or run.poll() is not None
                ),
                60,
                "duplicity reading the top image",
            )
        else:
            # Once a volume is uploaded, duplicity records the set as partial.
            # With two on the backend it would resume after the first (with
            # one it starts afresh): the case that must not happen.
            wait_for(
                lambda: any(backend.glob("duplicity-full.*.vol2.*")) or run.poll() is not None,
                60,
                "duplicity's second volume",
            )
        running = descendants(run.pid)
        assert duplicity_child(run.pid) in running and run.poll() is None, run.communicate()
        os.kill(run.pid, signal.SIGKILL)
        return running
    assert kill_point == "merge"
    # Hold the run (not its duplicity) while the overlay gets the big write.
    os.kill(run.pid, signal.SIGSTOP)
    try:
        for pattern, offset in DURING:
            vm.write_pattern("vda", pattern, offset, MIB)
        vm.write_pattern("vda", *BIG_WRITE)
    finally:
        os.kill(run.pid, signal.SIGCONT)
    wait_for(
        lambda: bool(vm.domain.blockJobInfo("vda", 0)) or run.poll() is not None,
        120,
        "the block commit",
        interval=0.001,
    )
    running = descendants(run.pid)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait(10) == -signal.SIGKILL, "the run ended before the kill"
    info = vm.domain.blockJobInfo("vda", 0)
    assert info and on_overlay(vm), f"the commit finished before the kill: {info}"
    return running


@pytest.mark.parametrize(
    ("kill_point", "recover_by"),
    [
        ("overlay", "run"),
        ("overlay", "recover"),
        ("duplicity-reading", "recover"),
        ("duplicity-uploaded", "run"),
        ("merge", "run"),
        ("merge", "recover"),
    ],
)
def test_sigkill_then_recovery(
    kill_point: str, recover_by: str, make_domain, environment, tmp_path
) -> None:
    vm = make_domain(chain=["base", "vm"], running=False, size=SIZE[kill_point] * MIB)
    base, top = vm.images["vda"]
    fill(base, 0x22, 0, 8 * MIB)
    fill(top, 0x11, 4 * MIB, DATA.get(kill_point, 8 * MIB))
    vm.domain.create()
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    persistent_xml = vm.domain.XMLDesc(2)  # VIR_DOMAIN_XML_INACTIVE

    run = environment.start_run(job)
    running = kill_run(kill_point, run, vm, environment.backend / job)
    run.wait(10)
    assert run.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 1.0
    while not all(process_ended(pid) for pid in running):
        assert time.monotonic() < deadline, (
            f"processes of the killed run outlived it by 1 s: "
            f"{[command_of(pid)[:3] for pid in running if not process_ended(pid)]}"
        )
        time.sleep(0.01)
    cache = environment.cache / job
    if kill_point == "duplicity-reading":
        assert list(cache.glob("duplicity-*-tempdir")), "no temporary directory was left"
    if kill_point == "duplicity-uploaded":
        assert list(cache.glob("*.part")), "no partial set was left"
        assert list((environment.backend / job).glob("duplicity-full.*.vol2.*"))
    assert environment.run_record(vm.uuid).exists()
    vm.write_pattern("vda", AFTER_KILL[0], AFTER_KILL[1], MIB)  # still on the overlay
    written = [*DURING, AFTER_KILL]

    if recover_by == "recover":
        recovered = environment.virt_dup("recover")
        assert f"domain {vm.name}: disk vda back on {top}" in recovered.stdout
        check_back_on_original_chain(vm, environment, persistent_xml, written)
        before = snapshot_files([top, base], tmp_path / "before")
        environment.virt_dup("run", job)
    else:
        finished = environment.virt_dup("run", job)
        assert f"recovered: domain {vm.name}: disk vda back on {top}" in finished.stdout
        before = snapshot_files([top, base], tmp_path / "before")  # the domain writes nothing

    check_back_on_original_chain(vm, environment, persistent_xml, written)
    if kill_point == "merge":
        assert vm.read_pattern_ok(top, *BIG_WRITE)
    collection = environment.collection(job)
    assert collection.incomplete_sets == 0
    # Killed during the merge, the run had made a complete backup: the next one adds to it.
    expected = ["full", "incremental"] if kill_point == "merge" else ["full"]
    assert [[backup_set.kind for backup_set in chain.sets] for chain in collection.chains] == [
        expected
    ]
    assert not list((environment.cache / job).glob("*.part"))
    assert not list((environment.cache / job).glob("duplicity-*-tempdir"))
    restored = environment.restore_all(job, tmp_path / "restored")
    manifest = json.loads(
        restored_path(restored, environment.state / "metadata" / job / "manifest.json").read_text()
    )
    checksums = {entry["path"]: entry["sha256"] for entry in manifest["disks"][0]["files"]}
    for original, copy in before.items():
        restored_file = restored_path(restored, original)
        assert sha256(restored_file) == sha256(copy) == checksums[str(original)], original
    for pattern, offset in written:
        assert vm.read_pattern_ok(restored_path(restored, top), pattern, offset, MIB)


def check_back_on_original_chain(
    vm: ScratchDomain,
    environment: BackupEnvironment,
    persistent_xml: str,
    written: list[tuple[int, int]],
) -> None:
    base, top = vm.images["vda"]
    assert vm.is_running()
    assert vm.disk_chain("vda") == (base, top)
    assert vm.domain.XMLDesc(2) == persistent_xml
    assert leftover_overlays(vm) == []
    assert not environment.run_record(vm.uuid).exists()
    assert not vm.domain.blockJobInfo("vda", 0)
    for pattern, offset in written:
        assert vm.read_pattern_ok(top, pattern, offset, MIB, with_backing=False)


def test_a_partial_backup_set_is_discarded_not_resumed(tmp_path: Path) -> None:
    """Why a run discards what a killed duplicity left: duplicity would resume the
    set from its last volume, with source files that have changed since."""
    source = tmp_path / "disk.img"
    source.write_bytes(os.urandom(40 * MIB))

    def target(name: str) -> Target:
        return Target(
            url=(tmp_path / name / "backend").as_uri(),
            archive_dir=tmp_path / name / "cache",
            name="job",
            encryption="none",
            volsize=1,  # many volumes, so a kill lands between two
        )

    killed = target("killed")
    backup = subprocess.Popen(
        [
            find_executable(),
            *duplicity_arguments.backup_arguments(killed, True, "/", [os.fspath(source)]),
        ],
        env={**os.environ, **environment(killed)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    backend = tmp_path / "killed" / "backend"
    wait_for(
        lambda: any(backend.glob("*.vol2.*")) or backup.poll() is not None,
        60,
        "the second volume",
        interval=0.001,
    )
    backup.kill()
    assert backup.wait() == -signal.SIGKILL, "the backup finished before the kill"
    resumed = target("resumed")
    shutil.copytree(tmp_path / "killed", tmp_path / "resumed")
    old = sha256(source)
    with source.open("r+b") as stream:  # recovery merged the guest's writes meanwhile
        stream.write(os.urandom(MIB))
    new = sha256(source)

    duplicity = Duplicity()
    # Left alone, duplicity resumes: the set holds the old start and the new rest.
    duplicity.backup(resumed, [os.fspath(source)], full=True)
    duplicity.restore(resumed, tmp_path / "resumed.img", path_to_restore=os.fspath(source))
    assert sha256(tmp_path / "resumed.img") not in (old, new)

    assert partial_files(killed)
    collection = discard_interrupted_backup(duplicity, killed)
    assert collection.chains == () and collection.incomplete_sets == 0
    assert not partial_files(killed)
    assert not list(backend.iterdir())
    stats = duplicity.backup(killed, [os.fspath(source)], full=full_is_due(collection, None))
    assert stats.kind == "full"
    duplicity.restore(killed, tmp_path / "restored.img", path_to_restore=os.fspath(source))
    assert sha256(tmp_path / "restored.img") == new


def test_the_boot_unit_recovers_a_killed_run(
    user_manager: UserManager,  # noqa: F811
    make_domain,
    gpg_home,
) -> None:
    """virt-dup-recover.service, installed by install-units and started by a real
    systemd manager, puts back a domain whose run was SIGKILLed."""
    # Under the manager's directory, which the unit runs next to (and removes with it).
    (user_manager.root / "virt-dup").mkdir()
    environment = BackupEnvironment.create(
        user_manager.root / "virt-dup", gpg_home.path, gpg_home.fingerprint
    )
    environment.config.write_text("scope: user\n" + environment.config.read_text())
    unit_dir = user_manager.config_home / "systemd" / "user"
    user_manager.run(
        [
            user_manager.virt_dup,
            "install-units",
            "--scope",
            "user",
            "--unit-dir",
            unit_dir,
            "--generator-dir",
            "/run/systemd/user-generators",
        ],
        env={"VIRT_DUP_CONFIG": str(environment.config)},
    )
    vm = make_domain(chain=["base", "vm"], size=192 * MIB)
    base, top = vm.images["vda"]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    persistent_xml = vm.domain.XMLDesc(2)
    run = environment.start_run(job)
    kill_run("overlay", run, vm, environment.backend / job)
    run.wait(10)
    assert on_overlay(vm) and environment.run_record(vm.uuid).exists()

    with user_manager.journald():
        user_manager.systemctl("start", "virt-dup-recover.service")  # oneshot: returns when done
        listed = user_manager.run(
            ["journalctl", "--no-pager", "-o", "json", "-t", "virt-dup", f"DOMAIN={vm.name}"]
        ).stdout
        everything = user_manager.run(["journalctl", "--no-pager", "-o", "json"]).stdout
    # One record of the recovery, and its lines not printed again on the unit's stdout.
    (recovered,) = [json.loads(line) for line in listed.splitlines()]
    assert recovered["MESSAGE_ID"] == journal.MESSAGE_RECOVERY
    assert (recovered["ACTION"], recovered["RESULT"]) == ("recover", "success")
    assert recovered["DOMAIN_UUID"] == vm.uuid
    assert recovered["MESSAGE"].startswith(f"recovery of domain {vm.name}: ")
    entries = [json.loads(line) for line in everything.splitlines()]
    from_unit = [
        str(entry.get("MESSAGE"))
        for entry in entries
        if str(entry.get("_SYSTEMD_CGROUP", "")).endswith("/virt-dup-recover.service")
    ]
    assert not [message for message in from_unit if message.startswith("recovered:")], from_unit

    shown = user_manager.systemctl(
        "show", "virt-dup-recover.service", "--property=Result", "--property=ExecMainStatus"
    ).stdout.split()
    assert shown == ["Result=success", "ExecMainStatus=0"]
    check_back_on_original_chain(vm, environment, persistent_xml, DURING)
    assert vm.disk_chain("vda") == (base, top)


def test_a_domain_that_vanishes_while_listed_is_skipped(
    make_domain, environment, libvirt_conn, tmp_path
) -> None:
    """Finding a job and recovering every domain read each domain after listing
    them all; one undefined meanwhile (another admin, a test's teardown) has no
    jobs and nothing to recover, and must not fail the run or the boot unit."""
    vm = make_domain(running=False)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    gone = make_domain(running=False).domain
    gone.undefine()

    class ListedBeforeItVanished(Hypervisor):
        def domains(self) -> list:
            return [gone, vm.domain]  # only these two: recovery must not touch others

    hypervisor = ListedBeforeItVanished(libvirt_conn)
    domain, found = hypervisor.find_job(job)
    assert (domain.UUIDString(), found.uuid) == (vm.uuid, job)
    assert recover_all(hypervisor, StateStore(tmp_path / "state", tmp_path / "locks")) == ([], [])
