"""virt_dup.restore.workspace, the file operations a restore takes back on failure:
directories it made, staged files, final names (never over an existing file), files
set aside; and what a restore reports."""

from __future__ import annotations

import os
import re
import signal
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from virt_dup.files import Interrupted
from virt_dup.restore.plan import DiskRestorePlan, FilePlan, RestoreError, RestorePlan
from virt_dup.restore.workspace import (
    REPLACED_SUFFIX,
    STAGED_PREFIX,
    RestoreResult,
    Workspace,
    destinations_free,
    place,
    rolled_back_on_failure,
    set_aside,
)

JOB = "0e1f2a3b-1111-4222-8333-444455556666"


@contextmanager
def umask(value: int) -> Iterator[None]:
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def mode_of(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def tree(root: Path) -> dict[str, str | None]:
    """Every path under ``root`` -> its text (None for a directory)."""
    found: dict[str, str | None] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        found[name] = None if path.is_dir() else path.read_text()
    return found


def file_plan(original: str, destination: str) -> FilePlan:
    return FilePlan(
        original=original,
        stored=original,
        destination=destination,
        format="qcow2",
        virtual_size=1 << 30,
        sha256="0" * 64,
        backing=None,
        backing_format=None,
        original_backing=None,
        original_backing_format=None,
    )


# -- make_directory -------------------------------------------------------------------
def test_make_directory_records_only_what_it_created(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    workspace = Workspace()
    workspace.make_directory(str(tmp_path / "images" / "restored" / "vm01"))
    assert workspace.created_directories == [
        str(tmp_path / "images" / "restored"),
        str(tmp_path / "images" / "restored" / "vm01"),
    ]
    assert (tmp_path / "images" / "restored" / "vm01").is_dir()


def test_make_directory_of_an_existing_directory_records_nothing(tmp_path: Path) -> None:
    workspace = Workspace()
    workspace.make_directory(str(tmp_path))
    assert workspace.created_directories == []


@pytest.mark.parametrize("mask", [0o077, 0o022, 0o000])
def test_made_directories_are_0755_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    workspace = Workspace()
    with umask(mask):
        workspace.make_directory(str(tmp_path / "a" / "b"))
    assert mode_of(tmp_path / "a") == 0o755
    assert mode_of(tmp_path / "a" / "b") == 0o755


def test_make_directory_takes_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    workspace = Workspace()
    workspace.make_directory("new")
    assert workspace.created_directories == [str(tmp_path / "new")]


# -- stage_path -----------------------------------------------------------------------
def test_stage_path_is_a_hidden_name_next_to_the_destination(tmp_path: Path) -> None:
    workspace = Workspace()
    destination = str(tmp_path / "vm01.qcow2")
    staged = workspace.stage_path(destination)
    directory, name = os.path.split(staged)
    assert directory == str(tmp_path)  # same directory: the final rename is atomic
    assert re.fullmatch(re.escape(STAGED_PREFIX) + r"[0-9a-f]{8}\.vm01\.qcow2", name)
    assert name.startswith(".")
    assert workspace.staged == [staged]
    assert not os.path.lexists(staged)  # a name only


def test_stage_paths_of_one_destination_differ(tmp_path: Path) -> None:
    workspace = Workspace()
    destination = str(tmp_path / "vm01.qcow2")
    names = {workspace.stage_path(destination) for _ in range(20)}
    assert len(names) == 20
    assert len(workspace.staged) == 20


# -- place ----------------------------------------------------------------------------
def test_place_gives_the_final_name_and_removes_the_staged_one(tmp_path: Path) -> None:
    workspace = Workspace()
    destination = tmp_path / "vm01.qcow2"
    staged = Path(workspace.stage_path(str(destination)))
    staged.write_text("image")
    place(workspace, str(staged), str(destination))
    assert destination.read_text() == "image"
    assert not staged.exists()
    assert workspace.placed == [str(destination)]
    assert tree(tmp_path) == {"vm01.qcow2": "image"}


@pytest.mark.parametrize("kind", ["file", "dangling symlink", "directory"])
def test_place_never_replaces_an_existing_destination(tmp_path: Path, kind: str) -> None:
    workspace = Workspace()
    destination = tmp_path / "vm01.qcow2"
    if kind == "file":
        destination.write_text("someone else's")
    elif kind == "dangling symlink":
        destination.symlink_to(tmp_path / "nowhere")
    else:
        destination.mkdir()
    staged = Path(workspace.stage_path(str(destination)))
    staged.write_text("image")
    with pytest.raises(RestoreError, match="not replacing it"):
        place(workspace, str(staged), str(destination))
    assert os.path.lexists(destination)
    if kind == "file":
        assert destination.read_text() == "someone else's"
    elif kind == "dangling symlink":
        assert destination.is_symlink()
    else:
        assert destination.is_dir()
    assert workspace.placed == []  # rollback must not remove what is not ours
    assert staged.read_text() == "image"  # still staged: rollback removes it


# -- set_aside ------------------------------------------------------------------------
def test_set_aside_renames_next_to_the_file(tmp_path: Path) -> None:
    workspace = Workspace()
    current = tmp_path / "vm01.qcow2"
    current.write_text("current")
    set_aside(workspace, str(current), "20261126T120000Z")
    aside = f"{current}{REPLACED_SUFFIX}-20261126T120000Z"
    assert workspace.set_aside == {str(current): aside}
    assert not current.exists()
    assert Path(aside).read_text() == "current"


def test_set_aside_never_overwrites_an_earlier_set_aside_file(tmp_path: Path) -> None:
    workspace = Workspace()
    current = tmp_path / "vm01.qcow2"
    current.write_text("current")
    earlier = Path(f"{current}{REPLACED_SUFFIX}-B1")
    earlier.write_text("kept from an earlier restore")
    set_aside(workspace, str(current), "B1")
    aside = workspace.set_aside[str(current)]
    assert re.fullmatch(re.escape(str(earlier)) + r"-[0-9a-f]{6}", aside)
    assert Path(aside).read_text() == "current"
    assert earlier.read_text() == "kept from an earlier restore"


# -- rollback -------------------------------------------------------------------------
def test_rollback_takes_everything_back(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "vm01.qcow2").write_text("current top")
    (images / "other.qcow2").write_text("not ours")
    before = tree(tmp_path)

    workspace = Workspace()
    # in place: the current file is set aside, the restored one placed
    set_aside(workspace, str(images / "vm01.qcow2"), "B1")
    staged = Path(workspace.stage_path(str(images / "vm01.qcow2")))
    staged.write_text("restored top")
    place(workspace, str(staged), str(images / "vm01.qcow2"))
    # to a new directory: made, one file placed, one still staged
    workspace.make_directory(str(tmp_path / "restored" / "vm01"))
    placed = tmp_path / "restored" / "vm01" / "base.qcow2"
    staged_base = Path(workspace.stage_path(str(placed)))
    staged_base.write_text("base")
    place(workspace, str(staged_base), str(placed))
    still_staged = Path(workspace.stage_path(str(tmp_path / "restored" / "vm01" / "top.qcow2")))
    still_staged.write_text("half restored")

    assert workspace.rollback() == []
    assert tree(tmp_path) == before


def test_rollback_removes_a_staged_directory(tmp_path: Path) -> None:
    workspace = Workspace()
    staged = Path(workspace.stage_path(str(tmp_path / "vm01.qcow2")))
    staged.mkdir()  # duplicity can leave a directory where a file was expected
    (staged / "inside").write_text("x")
    assert workspace.rollback() == []
    assert tree(tmp_path) == {}


def test_rollback_keeps_directories_it_did_not_make_and_non_empty_ones(tmp_path: Path) -> None:
    (tmp_path / "existing").mkdir()
    workspace = Workspace()
    workspace.make_directory(str(tmp_path / "existing" / "made"))
    (tmp_path / "existing" / "made" / "someone-elses").write_text("x")
    assert workspace.rollback() == []
    assert tree(tmp_path) == {
        "existing": None,
        "existing/made": None,
        "existing/made/someone-elses": "x",
    }


def test_rollback_reports_what_it_cannot_undo(tmp_path: Path) -> None:
    workspace = Workspace()
    original = str(tmp_path / "vm01.qcow2")
    aside = str(tmp_path / "vm01.qcow2.virt-dup-replaced-B1")  # gone meanwhile
    workspace.set_aside[original] = aside
    problems = workspace.rollback()
    assert problems == [f"cannot move {aside} back to {original}: No such file or directory"]


# -- rolled_back_on_failure -----------------------------------------------------------
def test_rolled_back_on_failure_undoes_and_reraises(tmp_path: Path) -> None:
    current = tmp_path / "vm01.qcow2"
    current.write_text("current")
    workspace = Workspace()
    error = RestoreError("disk vda: the restored chain is wrong")
    with pytest.raises(RestoreError) as raised, rolled_back_on_failure(workspace) as inside:
        assert inside is workspace
        set_aside(workspace, str(current), "B1")
        staged = Path(workspace.stage_path(str(current)))
        staged.write_text("restored")
        place(workspace, str(staged), str(current))
        raise error
    assert raised.value is error
    assert tree(tmp_path) == {"vm01.qcow2": "current"}


def test_rolled_back_on_failure_undoes_on_any_exception(tmp_path: Path) -> None:
    workspace = Workspace()
    with pytest.raises(KeyboardInterrupt), rolled_back_on_failure(workspace):
        workspace.make_directory(str(tmp_path / "new"))
        raise KeyboardInterrupt
    assert tree(tmp_path) == {}


def test_rolled_back_on_failure_leaves_a_success_alone(tmp_path: Path) -> None:
    workspace = Workspace()
    with rolled_back_on_failure(workspace):
        workspace.make_directory(str(tmp_path / "new"))
        staged = Path(workspace.stage_path(str(tmp_path / "new" / "vm01.qcow2")))
        staged.write_text("image")
        place(workspace, str(staged), str(tmp_path / "new" / "vm01.qcow2"))
    assert tree(tmp_path) == {"new": None, "new/vm01.qcow2": "image"}


def test_rolled_back_on_failure_names_what_could_not_be_undone(tmp_path: Path) -> None:
    workspace = Workspace()
    original = str(tmp_path / "vm01.qcow2")
    aside = f"{original}{REPLACED_SUFFIX}-B1"
    cause = RestoreError("qemu-img check failed")
    with pytest.raises(RestoreError) as raised, rolled_back_on_failure(workspace):
        workspace.set_aside[original] = aside  # its file is gone: cannot move back
        raise cause
    assert str(raised.value) == (
        f"qemu-img check failed; and undoing the restore: cannot move {aside} back to "
        f"{original}: No such file or directory"
    )
    assert raised.value.__cause__ is cause


def test_a_sigterm_during_the_restore_brings_set_aside_files_back(tmp_path: Path) -> None:
    current = tmp_path / "vm01.qcow2"
    current.write_text("current")
    workspace = Workspace()

    def ignore(_number: int, _frame: object) -> None:
        """Ours while the test runs: a stray SIGTERM never stops pytest."""

    previous = signal.signal(signal.SIGTERM, ignore)
    try:
        with pytest.raises(Interrupted) as raised, rolled_back_on_failure(workspace):
            set_aside(workspace, str(current), "B1")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        assert signal.getsignal(signal.SIGTERM) is ignore
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert str(raised.value) == "stopped by SIGTERM; the restore was undone"
    assert tree(tmp_path) == {"vm01.qcow2": "current"}


# -- destinations_free ----------------------------------------------------------------
def plan_of(*destinations: Path) -> RestorePlan:
    files = tuple(
        file_plan(f"/var/lib/libvirt/images/f{number}.qcow2", str(destination))
        for number, destination in enumerate(destinations)
    )
    return RestorePlan((DiskRestorePlan("vda", files, None),))


def test_destinations_free_passes_when_none_exists(tmp_path: Path) -> None:
    destinations_free(plan_of(tmp_path / "a.qcow2", tmp_path / "b.qcow2"))


def test_destinations_free_names_every_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "a.qcow2").write_text("x")
    (tmp_path / "c.qcow2").symlink_to(tmp_path / "nowhere")  # a dangling link counts
    plan = plan_of(tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "c.qcow2")
    with pytest.raises(RestoreError) as raised:
        destinations_free(plan)
    message = str(raised.value)
    assert str(tmp_path / "a.qcow2") in message
    assert str(tmp_path / "c.qcow2") in message
    assert str(tmp_path / "b.qcow2") not in message
    assert "a restore never replaces a file" in message


# -- RestoreResult --------------------------------------------------------------------
def test_restore_success_line() -> None:
    result = RestoreResult(
        JOB,
        "vm01",
        backup_id="20261126T120000Z",
        disks=["vda", "vdb"],
        files=["/r/a.qcow2", "/r/b.qcow2", "/r/c.qcow2"],
        bytes=3 << 20,
        allocated=1 << 19,
    )
    result.result = "success"
    result.duration_seconds = 7.25
    assert result.summary() == (
        f"restored backup 20261126T120000Z of domain vm01 (job {JOB}): vda, vdb, 3 file(s), "
        "3.15MB (524kB allocated) in 7.2 s"
    )


def test_restore_success_line_names_the_defined_domain() -> None:
    result = RestoreResult(JOB, "vm01", backup_id="B1", disks=["vda"], defined="vm01-restored")
    result.result = "success"
    assert result.summary().endswith("; defined domain vm01-restored")


def test_restore_failure_line() -> None:
    result = RestoreResult(JOB, "vm01", backup_id="B1")
    result.finish("failed", "/images/vm01.qcow2 exists")
    assert result.summary() == (
        f"restore of backup B1 of domain vm01 (job {JOB}) failed: /images/vm01.qcow2 exists"
    )


def test_restore_details() -> None:
    result = RestoreResult(JOB, "vm01", backup_id="B1", disks=["vda", "sdb"], bytes=99)
    assert result.details() == {
        "BACKUP_ID": "B1",
        "DISKS": "vda,sdb",
        "BYTES_RESTORED": 99,
        "DEFINED_DOMAIN": None,
    }
    result.defined = "copy"
    assert result.details()["DEFINED_DOMAIN"] == "copy"
    assert RestoreResult(JOB).details()["DISKS"] is None
    assert RestoreResult.ACTION == "restore"
