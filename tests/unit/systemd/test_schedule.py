"""virt_dup.schedule: cron strings read as cronie reads them, and their timer form.

The large equivalence proof (fire times of the timers against cron's) is in
test_cron_corpus.py; these are the readable, hand-checked cases.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from virt_dup.config.cron import REBOOT_DELAY, CronSchedule, describe, next_runs, parse_cron
from virt_dup.errors import ConfigError, ScheduleError
from virt_dup.systemd.schedule import TimerSchedule, cron_to_timer

TIMERS = [
    ("0 2 * * *", ("*-*-* 02:00:00",)),
    ("  0 2 * * *  ", ("*-*-* 02:00:00",)),
    ("* * * * *", ("*-*-* *:*:00",)),
    ("5 * * * *", ("*-*-* *:05:00",)),
    ("*/15 * * * *", ("*-*-* *:00,15,30,45:00",)),
    ("*/1 */1 */1 */1 */1", ("*-*-* *:*:00",)),
    ("0-59/20 * * * *", ("*-*-* *:00,20,40:00",)),
    # The step counts from the range's start, not from zero (systemd's / would not stop at 30).
    ("10-30/7 * * * *", ("*-*-* *:10,17,24:00",)),
    ("*/25 * * * *", ("*-*-* *:00,25,50:00",)),
    ("0 */6 * * *", ("*-*-* 00,06,12,18:00:00",)),
    ("30 9-17/4 * * *", ("*-*-* 09,13,17:30:00",)),
    ("0 0 1 * *", ("*-*-1 00:00:00",)),
    ("0 0 31 * *", ("*-*-31 00:00:00",)),
    ("0 0 29 2 *", ("*-2-29 00:00:00",)),
    ("0 12 * jan,jul *", ("*-1,7-* 12:00:00",)),
    ("0 12 15 1,7 *", ("*-1,7-15 12:00:00",)),
    ("0 12 * */3 *", ("*-1,4,7,10-* 12:00:00",)),
    ("0 12 * Feb-APR *", ("*-2,3,4-* 12:00:00",)),
    ("0 22 * * 1-5", ("Mon..Fri *-*-* 22:00:00",)),
    ("0 22 * * mon-fri", ("Mon..Fri *-*-* 22:00:00",)),
    ("0 22 * * 1,3,5", ("Mon,Wed,Fri *-*-* 22:00:00",)),
    ("0 0 * * 0", ("Sun *-*-* 00:00:00",)),
    ("0 0 * * 7", ("Sun *-*-* 00:00:00",)),
    ("0 0 * * 0,7", ("Sun *-*-* 00:00:00",)),
    ("0 0 * * 5-7", ("Fri..Sun *-*-* 00:00:00",)),
    ("0 0 * * sat-sun", ("Sat,Sun *-*-* 00:00:00",)),
    ("0 0 * * fri-0", ("Fri..Sun *-*-* 00:00:00",)),
    ("0 0 * * 0-2", ("Mon,Tue,Sun *-*-* 00:00:00",)),
    ("0 0 * * */2", ("Tue,Thu,Sat,Sun *-*-* 00:00:00",)),
    ("0 0 * * 0-6", ("*-*-* 00:00:00",)),
    ("0 0 * * 1-7", ("*-*-* 00:00:00",)),
    # The OR rule: both day fields restricted, neither starting with '*'.
    ("30 4 1,15 * 5", ("*-*-1,15 04:30:00", "Fri *-*-* 04:30:00")),
    ("0 0 13 * fri", ("*-*-13 00:00:00", "Fri *-*-* 00:00:00")),
    ("0 0 1-31/7 * 1", ("*-*-1,8,15,22,29 00:00:00", "Mon *-*-* 00:00:00")),
    ("0 0 1 6 1", ("*-6-1 00:00:00", "Mon *-6-* 00:00:00")),
    # OR with a full side is every day.
    ("0 0 1-31 * 1", ("*-*-* 00:00:00",)),
    ("0 0 1 * 0-7", ("*-*-* 00:00:00",)),
    # OR whose day-of-month side never exists: only the weekday side is left.
    ("0 0 31 2 mon", ("Mon *-2-* 00:00:00",)),
    # cronie's star exception: a field starting with '*' makes it AND.
    ("0 0 */7 * 1", ("Mon *-*-1,8,15,22,29 00:00:00",)),
    ("0 0 */2 * 1-5", ("Mon..Fri *-*-1,3,5,7,9,11,13,15,17,19,21,23,25,27,29,31 00:00:00",)),
    ("0 0 1,15 * */3", ("Wed,Sat,Sun *-*-1,15 00:00:00",)),
    ("0 0 1 * *,1", ("*-*-1 00:00:00",)),
    ("@yearly", ("*-1-1 00:00:00",)),
    ("@annually", ("*-1-1 00:00:00",)),
    ("@monthly", ("*-*-1 00:00:00",)),
    # cron's @weekly is Sunday; systemd's "weekly" would be Monday.
    ("@weekly", ("Sun *-*-* 00:00:00",)),
    ("@daily", ("*-*-* 00:00:00",)),
    ("@midnight", ("*-*-* 00:00:00",)),
    ("@hourly", ("*-*-* *:00:00",)),
    ("00 002 * * *", ("*-*-* 02:00:00",)),
    ("0 * * * *", ("*-*-* *:00:00",)),
    ("0 0-23 * * *", ("*-*-* *:00:00",)),
]


@pytest.mark.parametrize(("expression", "on_calendar"), TIMERS)
def test_cron_to_timer(expression: str, on_calendar: tuple[str, ...]) -> None:
    assert cron_to_timer(expression) == TimerSchedule(on_calendar=on_calendar, on_boot_sec=None)


def test_reboot_becomes_on_boot_sec() -> None:
    assert cron_to_timer("@reboot") == TimerSchedule(on_calendar=(), on_boot_sec=REBOOT_DELAY)
    assert REBOOT_DELAY == "1min"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_every_line() -> None:
    lines = sorted({line for _, on_calendar in TIMERS for line in on_calendar})
    result = subprocess.run(
        ["systemd-analyze", "calendar", *lines],
        env={**os.environ, "TZ": "UTC"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    normalized = [
        line.split(":", 1)[1].strip()
        for line in result.stdout.splitlines()
        if line.strip().startswith("Normalized form:")
    ]
    assert len(normalized) == len(lines)


def test_parse_cron_fields() -> None:
    assert parse_cron(" 5,10-12 */8 1-31/10 jan-mar/2 MON-wed ") == CronSchedule(
        expression="5,10-12 */8 1-31/10 jan-mar/2 MON-wed",
        minutes=frozenset({5, 10, 11, 12}),
        hours=frozenset({0, 8, 16}),
        days_of_month=frozenset({1, 11, 21, 31}),
        months=frozenset({1, 3}),
        days_of_week=frozenset({1, 2, 3}),
        day_of_month_star=False,
        day_of_week_star=False,
        reboot=False,
    )


@pytest.mark.parametrize(
    ("expression", "day_of_month_star", "day_of_week_star"),
    [
        ("0 0 * * *", True, True),
        ("0 0 */2 * 1", True, False),
        ("0 0 1-31/2 * 1", False, False),
        ("0 0 1 * *,1", False, True),
        # cronie sets DOW_STAR for these words, no flag for @daily/@hourly.
        ("@weekly", False, True),
        ("@monthly", False, True),
        ("@yearly", False, True),
        ("@daily", False, False),
        ("@hourly", False, False),
    ],
)
def test_star_flags(expression: str, day_of_month_star: bool, day_of_week_star: bool) -> None:
    schedule = parse_cron(expression)
    assert (schedule.day_of_month_star, schedule.day_of_week_star) == (
        day_of_month_star,
        day_of_week_star,
    )


def test_sunday_is_zero_and_seven() -> None:
    assert parse_cron("0 0 * * 7").days_of_week == frozenset({0})
    assert parse_cron("0 0 * * 1-7/2").days_of_week == frozenset({0, 1, 3, 5})
    assert parse_cron("0 0 * * */7").days_of_week == frozenset({0})


def test_matches_or_rule_and_star_exception() -> None:
    friday_13 = datetime(2026, 11, 13, 0, 0)
    friday_20 = datetime(2026, 11, 20, 0, 0)
    saturday_14 = datetime(2026, 11, 14, 0, 0)
    either = parse_cron("0 0 13 * 5")
    assert either.matches(friday_13) and either.matches(friday_20)
    assert not either.matches(saturday_14)
    both = parse_cron("0 0 */13 * 5")  # days 1, 14, 27 AND Friday
    assert not both.matches(friday_13) and not both.matches(datetime(2026, 11, 27, 0, 1))
    assert both.matches(datetime(2026, 11, 27, 0, 0, 59))
    assert not parse_cron("@reboot").matches(friday_13)


REJECTED = [
    ("", "empty"),
    ("   ", "empty"),
    ("* * * *", "got 4"),
    ("* * * * * *", "got 6"),
    ("0 2 * * * /bin/true", "got 6"),
    ("60 * * * *", "minute: 60 is out of range 0-59"),
    ("* 24 * * *", "hour: 24 is out of range 0-23"),
    ("* * 0 * *", "day-of-month: 0 is out of range 1-31"),
    ("* * 32 * *", "day-of-month: 32"),
    ("* * * 0 *", "month: 0 is out of range 1-12"),
    ("* * * 13 *", "month: 13"),
    ("* * * * 8", "day-of-week: 8 is out of range 0-7"),
    ("*/0 * * * *", "minute: '*/0': step 0"),
    ("0-59/0 * * * *", "step 0"),
    ("*/ * * * *", "minute: step '' is not a number"),
    ("*/x * * * *", "is not a number"),
    ("5/10 * * * *", "a step needs a range or *"),
    ("5-3 * * * *", "minute: '5-3': reversed range"),
    ("0 5-0 * * *", "hour: '5-0': reversed range"),
    ("0 0 * * sat-sun/2", "day-of-week: 'sat-sun/2': reversed range"),
    ("1,,2 * * * *", "minute: empty list element"),
    ("1, * * * *", "empty list element"),
    (",1 * * * *", "empty list element"),
    ("-1 * * * *", "cannot read"),
    ("*5 * * * *", "cannot read"),
    ("** * * * *", "cannot read"),
    ("1.5 * * * *", "cannot read"),
    ("0x10 * * * *", "minute: '0x10' is not a number"),
    ("0~30 * * * *", "random ranges"),
    ("~ * * * *", "random ranges"),
    ("0 0 L * *", "day-of-month: 'L' is not a number"),
    ("0 0 15W * *", "is not a number"),
    ("0 0 ? * *", "cannot read"),
    ("0 0 * * 1#2", "cannot read"),
    ("0 0 * * 5L", "day-of-week: '5L' is neither a number nor a name"),
    # Names only where cron takes them, and only cron's three-letter ones.
    ("mon * * * *", "minute: 'mon' is not a number"),
    ("* jan * * *", "hour: 'jan' is not a number"),
    ("* * mon * *", "day-of-month: 'mon' is not a number"),
    ("* * * mon *", "month: 'mon' is neither a number nor a name (jan..dec)"),
    ("* * * * jan", "day-of-week: 'jan' is neither a number nor a name (sun..sat)"),
    ("* * * * monday", "'monday' is neither"),
    ("* * * january *", "'january' is neither"),
    ("* * * * mon-fri/x", "step 'x' is not a number"),
    ("* * * */jan *", "step 'jan' is not a number"),
    # The @ words: exactly cron's, lower case, nothing after them.
    ("@every", "unknown @ word"),
    ("@every 5m", "unknown @ word"),
    ("@reboot now", "@reboot takes no fields"),
    ("@Daily", "unknown @ word"),
    ("@daily *", "@daily takes no fields"),
    ("@", "unknown @ word"),
    # Control and non-ASCII characters, so nothing can ride along into a unit file.
    ("0 2 * * *\nExecStartPre=/bin/evil", "control character '\\n'"),
    ("0 2 * * *\n", "control character"),
    ("0 2 * * *\r", "control character"),
    ("0 2 * * \x00", "control character"),
    ("0 2 * * \x7f", "control character"),
    ("\u0663 * * * *", "non-ASCII"),
    ("0 2 * * *\u2028", "non-ASCII"),
    ("1" * 200 + " * * * *", "out of range"),
    # Never runs.
    ("0 0 30 2 *", "day-of-month: day 30 does not exist in February"),
    ("0 0 31 4,6,9,11 *", "day 31 does not exist in April, June, September, November"),
    ("0 0 30,31 feb *", "does not exist in February"),
    ("0 0 31 2 */2", "never runs"),
]


@pytest.mark.parametrize(("expression", "reason"), REJECTED)
def test_rejected(expression: str, reason: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        cron_to_timer(expression)
    assert reason in caught.value.reason
    assert caught.value.expression.strip(" ") == expression.strip(" ")
    assert isinstance(caught.value, ConfigError)
    for function in (parse_cron, describe):
        with pytest.raises(ScheduleError):
            function(expression)
    with pytest.raises(ScheduleError):
        next_runs(expression, datetime(2026, 1, 1), 1)


@pytest.mark.parametrize(
    "expression",
    ["0 0 31 2 mon", "0 0 30 2 1-5", "0 0 29 2 *", "0 0 29 2 */7", "0 0 31 * *", "0 5-7 * * *"],
)
def test_accepted_oddities(expression: str) -> None:
    """Cron runs these, so they are valid even though part of them is dead."""
    assert next_runs(expression, datetime(2026, 1, 1), 1)


@pytest.mark.parametrize(
    ("expression", "description"),
    [
        ("0 2 * * *", "at 02:00 every day"),
        ("30 4 * * *", "at 04:30 every day"),
        ("0,30 8 * * *", "at 08:00, 08:30 every day"),
        ("* * * * *", "every minute every day"),
        ("*/15 * * * *", "every 15 minutes every day"),
        ("5 * * * *", "at minute 5 of every hour every day"),
        ("0 */2 * * *", "every 2 hours at minute 0 every day"),
        ("0 9-17 * * mon-fri", "at minute 0 of hours 9-17 on Monday to Friday"),
        ("*/10 9-17 * * *", "every 10 minutes of hours 9-17 every day"),
        ("0 22 * * 1,3,5", "at 22:00 on Monday, Wednesday, Friday"),
        ("0 0 * * sat,sun", "at 00:00 on Saturday, Sunday"),
        ("0 3 1 * *", "at 03:00 on day 1 of the month"),
        ("0 3 1,15 * *", "at 03:00 on days 1,15 of the month"),
        ("0 3 1 1,7 *", "at 03:00 on day 1 in January, July"),
        ("0 3 * 12 *", "at 03:00 every day in December"),
        ("30 4 1,15 * 5", "at 04:30 on days 1,15 of the month or on Friday"),
        ("0 0 */2 * 1", "at 00:00 on odd days of the month that fall on Monday"),
        ("@weekly", "at 00:00 on Sunday"),
        ("@monthly", "at 00:00 on day 1 of the month"),
        ("@yearly", "at 00:00 on day 1 in January"),
        ("@hourly", "at minute 0 of every hour every day"),
        ("@reboot", "at boot (after 1min)"),
    ],
)
def test_describe(expression: str, description: str) -> None:
    assert describe(expression) == description


def minutes(*text: str) -> list[datetime]:
    return [datetime.fromisoformat(value) for value in text]


@pytest.mark.parametrize(
    ("expression", "start", "expected"),
    [
        (
            "0 2 * * *",
            "2026-11-26 12:34",
            minutes("2026-11-27 02:00", "2026-11-28 02:00", "2026-11-29 02:00"),
        ),
        # Strictly after: a start on a fire time does not count.
        (
            "0 2 * * *",
            "2026-11-27 02:00",
            minutes("2026-11-28 02:00", "2026-11-29 02:00", "2026-11-30 02:00"),
        ),
        (
            "*/20 * * * *",
            "2026-12-31 23:20:30",
            minutes("2026-12-31 23:40", "2027-01-01 00:00", "2027-01-01 00:20"),
        ),
        # 2026-11-29 is a Sunday.
        (
            "@weekly",
            "2026-11-26 12:34",
            minutes("2026-11-29 00:00", "2026-12-06 00:00", "2026-12-13 00:00"),
        ),
        # Friday the 13th is OR: the 13ths and every Friday.
        (
            "0 0 13 * 5",
            "2026-11-10 00:00",
            minutes("2026-11-13 00:00", "2026-11-20 00:00", "2026-11-27 00:00", "2026-12-04 00:00"),
        ),
        # ...but with a '*'-field it is AND: odd days that are Mondays.
        (
            "0 0 */2 * 1",
            "2026-11-26 12:34",
            minutes("2026-12-07 00:00", "2026-12-21 00:00", "2027-01-11 00:00"),
        ),
        (
            "0 0 29 2 *",
            "2026-11-26 12:34",
            minutes("2028-02-29 00:00", "2032-02-29 00:00", "2036-02-29 00:00"),
        ),
        # 2100 is not a leap year.
        (
            "0 0 29 2 *",
            "2096-03-01 00:00",
            minutes("2104-02-29 00:00", "2108-02-29 00:00"),
        ),
        # February 29 that is also a Sunday (AND because day-of-week starts with '*').
        (
            "0 0 29 2 */7",
            "2026-01-01 00:00",
            minutes("2032-02-29 00:00", "2060-02-29 00:00", "2088-02-29 00:00"),
        ),
        (
            "0 0 31 * *",
            "2026-11-26 12:34",
            minutes("2026-12-31 00:00", "2027-01-31 00:00", "2027-03-31 00:00"),
        ),
    ],
)
def test_next_runs(expression: str, start: str, expected: list[datetime]) -> None:
    assert next_runs(expression, datetime.fromisoformat(start), len(expected)) == expected


def test_next_runs_keeps_time_zone() -> None:
    start = datetime(2026, 11, 26, 12, 34, 56, tzinfo=UTC)
    runs = next_runs("0 2 * * *", start, 2)
    assert runs == [datetime(2026, 11, 27, 2, tzinfo=UTC), datetime(2026, 11, 28, 2, tzinfo=UTC)]
    offset = timezone(timedelta(hours=-5))
    assert next_runs("30 * * * *", datetime(2026, 1, 1, tzinfo=offset), 1) == [
        datetime(2026, 1, 1, 0, 30, tzinfo=offset)
    ]


def test_next_runs_across_dst_changes_as_the_timer_fires() -> None:
    """systemd-analyze (TZ=Europe/Berlin) gives these same times."""
    berlin = ZoneInfo("Europe/Berlin")
    # 2026-03-29 02:00 jumps to 03:00: there is no 02:30 that day.
    runs = next_runs("30 2 * * *", datetime(2026, 3, 28, 12, 0, tzinfo=berlin), 2)
    assert runs == [
        datetime(2026, 3, 30, 2, 30, tzinfo=berlin),
        datetime(2026, 3, 31, 2, 30, tzinfo=berlin),
    ]
    # 2026-10-25 03:00 goes back to 02:00: 02:00 and 02:30 come once (summer time).
    runs = next_runs("0,30 * * * *", datetime(2026, 10, 25, 1, 50, tzinfo=berlin), 4)
    assert [run.strftime("%H:%M %Z") for run in runs] == [
        "02:00 CEST",
        "02:30 CEST",
        "03:00 CET",
        "03:30 CET",
    ]


def test_next_runs_edges() -> None:
    assert next_runs("@reboot", datetime(2026, 1, 1), 5) == []
    assert next_runs("* * * * *", datetime(2026, 1, 1), 0) == []
    assert next_runs("59 23 31 12 *", datetime(9998, 6, 1), 5) == minutes(
        "9998-12-31 23:59", "9999-12-31 23:59"
    )


def test_tabs_separate_fields_as_in_cron() -> None:
    assert parse_cron("0\t2 *  * *").expression == "0 2 * * *"
    assert cron_to_timer("0\t2 * * *") == cron_to_timer("0 2 * * *")
