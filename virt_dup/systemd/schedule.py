"""Cron schedules in their systemd timer form: ``OnCalendar=`` and ``OnBootSec=``.  Pure.

Every cron schedule (read by :mod:`virt_dup.config.cron`, cronie's meaning)
becomes ``OnCalendar=`` lines (``@reboot`` becomes ``OnBootSec=``) that
elapse at exactly the minutes cronie would have run the job.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from virt_dup.config.cron import REBOOT_DELAY, parse_cron, possible_dates, weekday_runs

_SYSTEMD_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@dataclass(frozen=True)
class TimerSchedule:
    """What a systemd timer needs to fire when cron would.

    ``on_calendar`` holds the ``OnCalendar=`` values, one per line (several
    when cron's OR rule applies); ``on_boot_sec`` the ``OnBootSec=`` value for
    ``@reboot`` (and then ``on_calendar`` is empty), else None.
    """

    on_calendar: tuple[str, ...]
    on_boot_sec: str | None


@functools.lru_cache(maxsize=1024)
def cron_to_timer(expression: str) -> TimerSchedule:
    """Translate a cron schedule into systemd timer settings.

    Takes a cron string (see :func:`parse_cron`).  Returns the
    :class:`TimerSchedule` whose ``OnCalendar=`` lines, together, elapse at
    exactly the minutes cronie would run the job.  Every value is spelled out
    as an explicit list: systemd's ``/`` repeats from the start value without
    cron's range bound, and its ``weekly`` is Monday where cron's is Sunday.
    Raises :class:`ScheduleError` as :func:`parse_cron` does.
    """
    schedule = parse_cron(expression)
    if schedule.reboot:
        return TimerSchedule(on_calendar=(), on_boot_sec=REBOOT_DELAY)
    time = f"{_time_list(schedule.hours, 24)}:{_time_list(schedule.minutes, 60)}:00"
    months = _date_list(schedule.months, 12)
    days = _date_list(schedule.days_of_month, 31)
    weekdays = _systemd_weekdays(schedule.days_of_week)
    day_of_month_full = len(schedule.days_of_month) == 31
    day_of_week_full = len(schedule.days_of_week) == 7
    if schedule.days_either and (day_of_month_full or day_of_week_full):
        lines = [f"*-{months}-* {time}"]
    elif schedule.days_either:
        # systemd ANDs the weekday with the date; cron's OR needs one line per side.
        lines = []
        if possible_dates(schedule.days_of_month, schedule.months):
            lines.append(f"*-{months}-{days} {time}")
        lines.append(f"{weekdays} *-{months}-* {time}")
    elif day_of_week_full:
        lines = [f"*-{months}-{days} {time}"]
    else:
        lines = [f"{weekdays} *-{months}-{days} {time}"]
    return TimerSchedule(on_calendar=tuple(lines), on_boot_sec=None)


def _time_list(values: frozenset[int], size: int) -> str:
    if len(values) == size:
        return "*"
    return ",".join(f"{value:02d}" for value in sorted(values))


def _date_list(values: frozenset[int], size: int) -> str:
    if len(values) == size:
        return "*"
    return ",".join(str(value) for value in sorted(values))


def _systemd_weekdays(days_of_week: frozenset[int]) -> str:
    parts = []
    for run in weekday_runs(days_of_week):
        names = [_SYSTEMD_WEEKDAYS[day] for day in run]
        parts.append(f"{names[0]}..{names[-1]}" if len(run) >= 3 else ",".join(names))
    return ",".join(parts)
