"""``virt-dup status`` under a real systemd user manager, after a real run.

The next run comes from the job's timer (pystemd, the manager's private
socket), the last success from a real ``virt-dup run``, and ``--check``'s
exit codes follow the age of that success: the status file's timestamp is
moved back by hand, as time would.  The metrics textfile the run and
``status --check`` write is read back with prometheus_client's parser.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from harness.domains import DomainFactory
from harness.manager import UserManager, user_manager  # noqa: F401 - fixtures
from prometheus_client.parser import text_string_to_metric_families
from test_systemd_e2e import Host

from virt_dup.systemd.manager import ServiceManager

pytestmark = pytest.mark.integration


def metric(path: Path, name: str, job: str) -> float | None:
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("job_uuid") == job:
                return sample.value
    return None


def test_status_shows_the_timers_next_run_the_last_success_and_checks_freshness(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
) -> None:
    job = str(uuid.uuid4())
    host = Host(user_manager, [job])
    host.install()
    vm = make_domain()
    # 03:00 every day: the timer does not fire during the test; the run is by hand.
    host.virt_dup(
        "add-job", vm.name, "--uuid", job, "--schedule", "0 3 * * *",
        "--backend", "local", "--encryption", "none",
    )  # fmt: skip
    try:
        _check_status(host, user_manager, vm.name, job)
    finally:
        host.virt_dup("remove-job", job, check=False)


def _status(host: Host, domain: str) -> dict[str, object]:
    document = json.loads(host.virt_dup("status", domain, "--json").stdout)
    assert document["schema"] == "virt-dup/status/1"
    (row,) = document["jobs"]
    return dict(row)


def _check(host: Host, domain: str) -> tuple[int, str]:
    checked = host.virt_dup("status", domain, "--check", check=False)
    return checked.returncode, checked.stdout


def _check_status(host: Host, manager: UserManager, domain: str, job: str) -> None:
    timer = f"virt-dup@{job}.timer"
    with ServiceManager.connect("user", environ=manager.env) as systemd:
        elapse = systemd.next_elapse(timer)
    assert elapse is not None

    # Before any run: the next run is the timer's, no backup yet is a warning.
    row = _status(host, domain)
    assert row["job"] == job
    assert row["schedule_description"] == "at 03:00 every day"
    assert datetime.fromisoformat(str(row["next_run"])) == elapse
    assert row["last_success"] is None
    assert row["encryption"] is False
    assert row["freshness"] == {
        "state": "warn",
        "reason": "no backup yet (never ran)",
        "warn_after_seconds": 36 * 3600,
        "crit_after_seconds": 3 * 86400,
    }
    code, lines = _check(host, domain)
    assert (code, lines) == (1, f"WARN: job {job} of domain {domain}: no backup yet (never ran)\n")
    table = host.virt_dup("status", domain).stdout
    assert "0 3 * * * (at 03:00 every day)" in table
    assert elapse.astimezone().strftime("%Y-%m-%d %H:%M") in table

    # A real run: the last success, its age, the last full; ok.
    host.virt_dup("run", job)
    row = _status(host, domain)
    success = row["last_success"]
    assert isinstance(success, dict) and success["result"] == "success"
    assert row["last_full"] == success
    age = row["last_success_age_seconds"]
    assert isinstance(age, int) and 0 <= age < 300
    assert row["freshness"]["state"] == "ok"  # type: ignore[index]
    assert _check(host, domain) == (0, "OK: 1 job(s) fresh, 1 job(s) in all\n")
    assert " ago)" in host.virt_dup("status", domain).stdout
    # The run rewrote the metrics textfile.
    metrics = host.state / "metrics" / "virt-dup.prom"
    finished = datetime.fromisoformat(success["finished"])
    assert metric(metrics, "virt_dup_last_success_timestamp_seconds", job) == pytest.approx(
        finished.timestamp()
    )
    assert metric(metrics, "virt_dup_last_run_success", job) == 1
    assert metric(metrics, "virt_dup_freshness", job) == 0

    # Time passes: two days without a success warn, four are critical.
    status_file = host.state / "status" / f"{job}.json"
    for days, code, word in ((2, 1, "WARN"), (4, 2, "CRIT")):
        recorded = json.loads(status_file.read_text())
        recorded["last_success"]["finished"] = (
            datetime.now(UTC) - timedelta(days=days)
        ).isoformat()
        status_file.write_text(json.dumps(recorded))
        found, lines = _check(host, domain)
        assert found == code, lines
        assert lines.startswith(f"{word}: job {job} of domain {domain}: last success {days}d")
    # status --check of every job rewrites the metrics: crit now.
    host.virt_dup("status", "--check", check=False)
    assert metric(metrics, "virt_dup_freshness", job) == 2
