"""The metrics textfile parses as Prometheus text and says what each job's status says."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from virt_dup.backup.metrics import JobMetrics, render_metrics, write_metrics

DONE = datetime(2025, 3, 3, 2, 5, tzinfo=UTC)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def job(**changes: object) -> JobMetrics:
    values: dict[str, object] = {
        "job": "7f0c54c2-0000-4000-8000-000000000001",
        "domain": "vm01",
        "last_success": DONE,
        "last_result": "success",
        "last_action": "backup",
        "duration_seconds": 12.5,
        "bytes_read": 1024.0,
        "bytes_uploaded": 512.0,
        "backups": None,
        "backend_size": None,
        "freshness": "ok",
    }
    return JobMetrics(**{**values, **changes})  # type: ignore[arg-type]


LABELS = (("domain", "vm01"), ("job_uuid", "7f0c54c2-0000-4000-8000-000000000001"))


def test_every_value_of_a_job_is_a_labelled_sample() -> None:
    found = samples(render_metrics([job()]))
    assert found[("virt_dup_last_success_timestamp_seconds", LABELS)] == DONE.timestamp()
    assert found[("virt_dup_last_run_success", LABELS)] == 1
    assert found[("virt_dup_last_run_duration_seconds", LABELS)] == 12.5
    assert found[("virt_dup_last_backup_read_bytes", LABELS)] == 1024
    assert found[("virt_dup_last_backup_uploaded_bytes", LABELS)] == 512
    assert found[("virt_dup_freshness", LABELS)] == 0
    assert found[("virt_dup_freshness_state", (*LABELS, ("state", "ok")))] == 1
    assert found[("virt_dup_freshness_state", (*LABELS, ("state", "crit")))] == 0
    # the backend was not read: no guess
    assert ("virt_dup_backend_backups", LABELS) not in found


def test_a_failed_stale_job_and_a_known_backend() -> None:
    found = samples(
        render_metrics([job(last_result="failed", freshness="crit", backups=3, backend_size=9)])
    )
    assert found[("virt_dup_last_run_success", LABELS)] == 0
    assert found[("virt_dup_freshness", LABELS)] == 2
    assert found[("virt_dup_freshness_state", (*LABELS, ("state", "crit")))] == 1
    assert found[("virt_dup_backend_backups", LABELS)] == 3
    assert found[("virt_dup_backend_size_bytes", LABELS)] == 9


def test_a_job_that_never_ran_has_no_timestamps() -> None:
    found = samples(
        render_metrics([job(last_success=None, last_result=None, duration_seconds=None)])
    )
    assert ("virt_dup_last_success_timestamp_seconds", LABELS) not in found
    assert ("virt_dup_last_run_success", LABELS) not in found


def test_the_file_is_replaced_and_readable_by_node_exporter(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "virt-dup.prom"
    write_metrics(path, [job()])
    write_metrics(path, [job(freshness="warn")])
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["virt-dup.prom"]  # no temporary left
    assert samples(path.read_text())[("virt_dup_freshness", LABELS)] == 1
