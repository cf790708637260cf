"""When a run may read changed blocks: every case the design lists falls back to
the whole-file path with a reason, never to a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from virt_dup.backup.changes import (
    CHANGES,
    WHOLE,
    ChangesRecord,
    DiskRecord,
    PlannedDisk,
    changes_file,
    decide,
    load_record,
)

JOB = "5e2baef0-d99e-4e22-b65d-25d0dbb82f58"
CHECKPOINT = f"virt-dup-{JOB}-20261202T020000Z"
TOP, BASE = "/images/vm/vm.qcow2", "/images/vm/base.qcow2"
BASE_ID = (1, 2, 3, 4, 5)

RECORD = ChangesRecord(
    checkpoint=CHECKPOINT,
    base_set="20261201T020000Z",
    previous_set="20261202T020000Z",
    disks={"vda": DiskRecord(TOP, (1, 10), 64 << 20, {BASE: BASE_ID})},
)
DISKS = [PlannedDisk("vda", TOP, [BASE], 64 << 20)]


def decision(**changes):
    arguments = {
        "enabled": True,
        "running": True,
        "full": False,
        "record": RECORD,
        "checkpoints": [CHECKPOINT, "users-own"],
        "disks": DISKS,
        "top_identity": lambda _path: (1, 10),
        "identity": lambda _path: BASE_ID,
        **changes,
    }
    return decide(**arguments)


def test_everything_as_the_last_run_left_it_reads_changed_blocks() -> None:
    assert decision().read == CHANGES


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"enabled": False}, "changed_blocks is off"),
        ({"full": True}, "a full backup"),
        ({"running": False}, "shut off"),
        ({"record": None}, "no earlier run left a checkpoint"),
        ({"checkpoints": ["users-own"]}, f"checkpoint {CHECKPOINT} is gone"),
        ({"disks": [*DISKS, PlannedDisk("vdb", "/x.qcow2", [])]}, "not the ones the checkpoint"),
        ({"disks": [PlannedDisk("vda", "/images/vm/new.qcow2", [BASE], 64 << 20)]}, "another"),
        ({"disks": [PlannedDisk("vda", TOP, [BASE], 128 << 20)]}, "resized"),
        ({"top_identity": lambda _path: (1, 11)}, "another file"),  # replaced in place
        ({"disks": [PlannedDisk("vda", TOP, [], 64 << 20)]}, "its chain below the top changed"),
        ({"identity": lambda _path: (1, 2, 3, 4, 6)}, f"{BASE} changed since"),
    ],
    ids=[
        "off",
        "full",
        "shut-off",
        "first-run",
        "checkpoint-gone",
        "disk-added",
        "top-renamed",
        "resized",
        "top-replaced",
        "chain-shortened",
        "base-written",
    ],
)
def test_each_case_the_bitmap_cannot_be_trusted_falls_back(changes, reason) -> None:
    found = decision(**changes)
    assert found.read == WHOLE and reason in found.reason


def test_the_record_round_trips_and_a_broken_one_means_the_whole_file_path(
    tmp_path: Path,
) -> None:
    path = tmp_path / "record.json"
    import json

    path.write_text(json.dumps(RECORD.as_json()))
    assert load_record(path) == RECORD
    for broken in ("{", "[]", '{"checkpoint": 1}', json.dumps({**RECORD.as_json(), "disks": 3})):
        path.write_text(broken)
        assert load_record(path) is None
    assert load_record(tmp_path / "missing.json") is None


def test_the_changes_file_lies_next_to_the_top() -> None:
    assert changes_file(TOP, JOB) == Path(f"/images/vm/vm.virt-dup-{JOB}.changes.qcow2")
