"""The words of an alert and the alerts: section of virt-dup.yml."""

from __future__ import annotations

from pathlib import Path

import pytest

from virt_dup.alerts.message import failure_alert, parse_unit
from virt_dup.alerts.send import ping_url
from virt_dup.config.load import parse_config
from virt_dup.errors import ConfigError, UsageError

JOB = "0e1f2a3b-1111-4222-8333-444455556666"
FAILED_RUN = {
    "last_run": {
        "job_uuid": JOB,
        "domain": "vm01",
        "result": "failed",
        "message": "backend sftp://b@127.0.0.1:1/x: connection refused",
        "finished": "2026-12-02T02:00:07+00:00",
    }
}


def test_the_alert_of_a_failed_run_names_job_domain_error_and_journal_command() -> None:
    alert = failure_alert(
        parse_unit(f"virt-dup@{JOB}.service"), FAILED_RUN, host="kvm1", scope="system"
    )

    assert alert.title == "virt-dup on kvm1: backup of vm01 failed"
    assert alert.body.splitlines() == [
        f"The backup of job {JOB} (domain vm01) failed on kvm1.",
        "error: backend sftp://b@127.0.0.1:1/x: connection refused",
        "finished: 2026-12-02T02:00:07+00:00",
        f"unit: virt-dup@{JOB}.service",
        f"more: journalctl -u virt-dup@{JOB}.service",
    ]


def test_a_unit_that_failed_before_recording_says_so_and_a_user_manager_gets_user() -> None:
    status = {"last_run": {**FAILED_RUN["last_run"], "result": "success"}}
    alert = failure_alert(
        parse_unit(f"virt-dup-verify@{JOB}.service"),
        status,
        host="kvm1",
        scope="user",
        status_path="/s.json",
    )

    assert "error: no failure recorded in /s.json" in alert.body
    assert f"more: journalctl --user -u virt-dup-verify@{JOB}.service" in alert.body
    assert parse_unit("virt-dup-recover.service").action.startswith("boot-time recovery")


@pytest.mark.parametrize("unit", ["", "a b.service", "x\n.service", "é.service"])
def test_what_is_no_unit_name_is_a_usage_error(unit: str) -> None:
    with pytest.raises(UsageError):
        parse_unit(unit)


def test_ping_urls_follow_healthchecks() -> None:
    template = "https://hc-ping.com/KEY/{job}"
    assert ping_url(template, JOB, "start") == f"https://hc-ping.com/KEY/{JOB}/start"
    assert ping_url(template, JOB, "success") == f"https://hc-ping.com/KEY/{JOB}"
    assert ping_url(template, JOB, "failure") == f"https://hc-ping.com/KEY/{JOB}/fail"


def test_the_alerts_section_loads_and_a_password_in_a_url_gets_a_masked_notice() -> None:
    config = parse_config(
        "alerts:\n  urls: [json://h/x, 'mailto://u:pw123@mail.example.com']\n"
        "  events: [failure]\n  ping_url: https://hc-ping.com/K/{job}\n",
        Path("/etc/v.yml"),
    )

    assert config.alerts.urls == ("json://h/x", "mailto://u:pw123@mail.example.com")
    assert config.alerts.events == ("failure",)
    assert config.alerts.ping_url == "https://hc-ping.com/K/{job}"
    assert len(config.notices) == 1 and "u:***@" in config.notices[0]
    assert "pw123" not in config.notices[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alerts:\n  urls: [nope]\n", "alerts.urls[0]: expected an apprise URL"),
        ("alerts:\n  events: [sometimes]\n", "alerts.events: expected a list of failure"),
        ("alerts:\n  on: [failure]\n", "alerts.on: unknown key; write it as events:"),
        ("alerts:\n  ping_url: ftp://x/{job}\n", "alerts.ping_url: expected an http(s) URL"),
        ("alerts:\n  urls: ['json://u:pw9@h x']\n", "alerts.urls[0]"),
    ],
)
def test_bad_alerts_settings_are_one_line_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, Path("/etc/v.yml"))

    assert expected in str(raised.value)
    assert "pw9" not in str(raised.value) and "\n" not in str(raised.value)
