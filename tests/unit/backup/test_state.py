"""The state directory: run records, per-domain locks, status files."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from virt_dup.backup.plan import DiskPlan
from virt_dup.backup.state import LockTimeout, RunRecord, StateStore
from virt_dup.images.chain import ChainFile

DOMAIN = "5f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61"
TOP = ChainFile("/i/vm.qcow2", "qcow2", 1 << 30, None, None, 1 << 20)


def record() -> RunRecord:
    return RunRecord(
        job_uuid="11111111-2222-4333-8444-555555555555",
        domain_uuid=DOMAIN,
        domain_name="vm01",
        started="2026-11-26T12:00:00+00:00",
        pid=1234,
        full=True,
        phase="planned",
        disks=(DiskPlan("vda", (TOP,), (TOP,), "/i/vm.virt-dup-x.qcow2"),),
    )


def test_run_record_round_trip_is_private(tmp_path: Path) -> None:
    store = StateStore(tmp_path, tmp_path / "locks")
    store.save_run(record())
    assert store.load_run(DOMAIN) == record()
    assert store.unfinished_runs() == [record()]
    assert stat.S_IMODE(store.run_path(DOMAIN).stat().st_mode) == 0o600
    assert not list(store.run_path(DOMAIN).parent.glob(".*.tmp"))
    store.clear_run(DOMAIN)
    assert store.load_run(DOMAIN) is None
    store.clear_run(DOMAIN)  # clearing twice is fine


def _hold_lock(
    directory: str,
    ready: multiprocessing.synchronize.Event,
    release: multiprocessing.synchronize.Event,
) -> None:
    with StateStore(Path(directory), Path(directory) / "locks").domain_lock(DOMAIN, "vm01"):
        ready.set()
        release.wait(30)


def test_lock_held_by_another_process_times_out_clearly(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with (
            pytest.raises(LockTimeout) as caught,
            StateStore(tmp_path, tmp_path / "locks").domain_lock(DOMAIN, "vm01", wait_seconds=0.5),
        ):
            pass
        message = str(caught.value)
        assert "domain vm01 is busy" in message and f"pid {holder.pid}" in message
    finally:
        release.set()
        holder.join(10)
    # released when the holder ends: the next run gets it at once
    with StateStore(tmp_path, tmp_path / "locks").domain_lock(DOMAIN, "vm01", wait_seconds=0.5):
        assert (tmp_path / "locks" / f"{DOMAIN}.lock").read_text().strip() == str(os.getpid())


def test_run_slots_bound_the_runs_of_a_host(tmp_path: Path) -> None:
    """Two slots: two runs read at once, a third waits (and says so once), and gets
    one as soon as a run ends."""
    store = StateStore(tmp_path, tmp_path / "locks")
    told: list[str] = []
    with store.run_slot(2, 1.0), store.run_slot(2, 1.0):
        with (
            pytest.raises(LockTimeout, match=r"all 2 run slots of this host stayed taken"),
            store.run_slot(2, 0.6, lambda: told.append("waiting")),
        ):
            pass
        assert told == ["waiting"]
    with store.run_slot(2, 0.1):  # released when the holders' descriptors closed
        pass


def test_status_keeps_last_success_and_last_error(tmp_path: Path) -> None:
    store = StateStore(tmp_path, tmp_path / "locks")
    job = "11111111-2222-4333-8444-555555555555"
    store.record_result(job, {"result": "success", "finished": "t1"})
    store.record_result(job, {"result": "failed", "finished": "t2", "message": "boom"})
    status = store.record_result(job, {"result": "skipped", "finished": "t3"})
    assert status["last_run"]["finished"] == "t3"
    assert status["last_success"]["finished"] == "t1"
    assert status["last_error"]["message"] == "boom"
    assert store.load_status(job) == status
