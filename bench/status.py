#!/usr/bin/env python3
"""How long ``virt-dup status`` takes for COUNT jobs, without libvirt and systemd.

Makes COUNT jobs (ten different schedules, as a host has a few), a status
file for each in a scratch state directory, and times in one process what
``status`` does per job after libvirt has listed them: read the status
file, derive the freshness thresholds from the schedules, mark, describe,
render the table, the JSON and the metrics textfile.  Cold = the first
call (the interval caches empty), warm = the median of RUNS calls.  Not in
it: libvirt's listing of the domains and one ``next_elapse`` D-Bus call per
timer.

    .venv/bin/python bench/status.py [--count 100] [--runs 9]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from virt_dup.actions.status import StatusReport, job_status
from virt_dup.backup.metrics import render_metrics
from virt_dup.backup.state import StateStore
from virt_dup.cli.output import print_status
from virt_dup.config.load import Config
from virt_dup.config.options import JobOptions
from virt_dup.libvirt.metadata import Job

SCHEDULES = (
    "0 2 * * *", "30 1 * * 1-5", "*/15 * * * *", "0 */6 * * *", "@weekly",
    "0 3 1 * *", "0 4 * * 0", "15 22 * * 1,3,5", "0 0 31 * *", "45 23 * * *",
)  # fmt: skip


def once(config: Config, jobs: list[Job]) -> float:
    started = time.perf_counter()
    now = datetime.now(UTC)
    store = StateStore.of(config)
    rows = tuple(job_status(config, store, job, now) for job in jobs)
    report = StatusReport(rows)
    print_status(rows, backend=False, out=io.StringIO())
    json.dumps(report.as_json())
    render_metrics(row.metrics() for row in rows)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--runs", type=int, default=9)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="virt-dup-bench-status-") as scratch:
        config = Config(path=Path(scratch) / "virt-dup.yml", state_dir=Path(scratch))
        store = StateStore.of(config)
        jobs = []
        for number in range(arguments.count):
            job = Job(
                str(uuid.uuid4()),
                f"vm{number:03d}",
                str(uuid.uuid4()),
                options=JobOptions(schedule=SCHEDULES[number % len(SCHEDULES)]),
            )
            finished = (datetime.now(UTC) - timedelta(hours=number)).isoformat()
            record = {"result": "success", "finished": finished, "full": True}
            store.record_result(job.uuid, {**record, "duration_seconds": 12.0})
            jobs.append(job)
        cold = once(config, jobs)
        warm = statistics.median(once(config, jobs) for _ in range(arguments.runs))
    print(f"{arguments.count} jobs: cold {cold * 1000:.0f} ms, warm {warm * 1000:.0f} ms")


if __name__ == "__main__":
    main()
