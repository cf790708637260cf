"""Freshness thresholds follow the schedule; options override them; marks and reasons."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from virt_dup.backup.freshness import (
    CRIT,
    OK,
    UNCHECKED,
    WARN,
    Thresholds,
    format_age,
    freshness,
    thresholds,
)
from virt_dup.config.cron import longest_interval
from virt_dup.config.options import JobOptions

TODAY = date(2025, 3, 3)  # a Monday
NOW = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("schedules", "longest"),
    [
        (("0 2 * * *",), timedelta(days=1)),
        (("*/15 * * * *",), timedelta(minutes=15)),
        (("0 2 * * 1-5",), timedelta(days=3)),  # Friday 02:00 to Monday 02:00
        (("0 9,17 * * *",), timedelta(hours=16)),
        (("@weekly",), timedelta(days=7)),
        (("0 0 31 * *",), timedelta(days=61)),  # no 31st in April, June...
        (("0 2 * * 1-6", "0 3 * * 0"), timedelta(hours=25)),  # Sunday's full, an hour later
        (("@reboot",), None),
    ],
)
def test_longest_interval_between_scheduled_runs(
    schedules: tuple[str, ...], longest: timedelta | None
) -> None:
    assert longest_interval(schedules, TODAY) == longest


def test_thresholds_are_one_and_a_half_and_three_times_the_longest_interval() -> None:
    limits = thresholds(JobOptions(schedule="0 2 * * *"), TODAY)
    assert limits == Thresholds(timedelta(hours=36), timedelta(days=3))


def test_options_override_each_threshold() -> None:
    options = JobOptions(schedule="0 2 * * *", freshness_warn="2D")
    assert thresholds(options, TODAY) == Thresholds(timedelta(days=2), timedelta(days=3))
    options = JobOptions(schedule="0 2 * * *", freshness_crit="12h")
    # crit is never earlier than warn
    assert thresholds(options, TODAY) == Thresholds(timedelta(hours=36), timedelta(hours=36))


def test_a_job_without_clock_schedule_is_not_checked_unless_told() -> None:
    assert not thresholds(JobOptions(), TODAY).checked
    assert not thresholds(JobOptions(schedule="@reboot"), TODAY).checked
    limits = thresholds(JobOptions(schedule="@reboot", freshness_crit="1W"), TODAY)
    assert limits == Thresholds(None, timedelta(weeks=1))


DAILY = Thresholds(timedelta(hours=36), timedelta(days=3))


@pytest.mark.parametrize(
    ("age", "mark"),
    [
        (timedelta(hours=1), OK),
        (timedelta(hours=35, minutes=59), OK),
        (timedelta(hours=36), WARN),
        (timedelta(days=2, hours=23), WARN),
        (timedelta(days=3), CRIT),
        (timedelta(days=40), CRIT),
    ],
)
def test_mark_by_age_of_the_last_success(age: timedelta, mark: str) -> None:
    assert freshness(DAILY, NOW - age, "success", NOW).mark == mark


def test_reasons_say_how_old_and_after_what() -> None:
    found = freshness(DAILY, NOW - timedelta(days=4, hours=2), "success", NOW)
    assert found.reason == "last success 4d2h ago (crit after 3d)"


def test_a_failed_last_run_is_at_least_warn() -> None:
    found = freshness(DAILY, NOW - timedelta(hours=2), "failed", NOW)
    assert (found.mark, found.reason) == (WARN, "the last run failed")
    found = freshness(DAILY, NOW - timedelta(hours=40), "failed", NOW)
    assert found.mark == WARN
    assert found.reason == "the last run failed; last success 1d16h ago (warn after 1d12h)"
    assert freshness(DAILY, NOW - timedelta(days=5), "failed", NOW).mark == CRIT


def test_never_succeeded() -> None:
    assert freshness(DAILY, None, None, NOW).mark == WARN  # just added: no run yet
    assert freshness(DAILY, None, "failed", NOW).mark == CRIT
    assert freshness(Thresholds(None, None), None, None, NOW).mark == UNCHECKED


@pytest.mark.parametrize(
    ("age", "text"),
    [
        (timedelta(seconds=5), "5s"),
        (timedelta(minutes=12, seconds=3), "12m"),
        (timedelta(hours=5), "5h"),
        (timedelta(hours=5, minutes=12), "5h12m"),
        (timedelta(days=3), "3d"),
        (timedelta(days=3, hours=4, minutes=5), "3d4h"),
    ],
)
def test_format_age(age: timedelta, text: str) -> None:
    assert format_age(age) == text
