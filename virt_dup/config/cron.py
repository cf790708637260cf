"""Cron schedules, read exactly as cronie reads them.  Pure: no I/O, no clock.

A job's schedule is a five-field cron string (or one of cron's ``@`` words).
virt-dup never runs cron: :mod:`virt_dup.systemd.schedule` turns every
schedule into ``OnCalendar=`` lines that fire at exactly the minutes cronie
would have run the job; this module says what the string means (and when it
runs: :func:`next_runs`, :func:`describe`).

Grammar and meaning follow cronie's ``src/entry.c`` (``load_entry``,
``get_list``, ``get_range``, ``get_number``) and ``src/cron.c``
(``find_jobs``):

* fields are lists of ``N``, ``a-b``, ``a-b/step``, ``*`` and ``*/step``;
  ``N/step`` is refused, as cronie refuses it;
* month and day-of-week accept cronie's three-letter names, also as range ends
  (``mon-fri``), in any case; the ``@`` words are case-sensitive, as in cronie;
* 0 and 7 both mean Sunday, and ``X-0`` in day-of-week means ``X-7``
  (so ``sat-sun`` is Saturday and Sunday);
* when day-of-month and day-of-week are both restricted a day matches if
  *either* matches -- unless one of the two fields starts with ``*``
  (cronie's ``DOM_STAR``/``DOW_STAR`` flags): then both must match, so
  ``0 0 */2 * 1`` means "odd days that are Mondays".

virt-dup is stricter than cronie where cronie silently accepts a mistake: a
reversed range (cronie sets no value for ``5-3``, and reads ``5-0`` as ``5-7``
in every field), the random ``~`` ranges (a timer needs fixed times), tabs and
other control characters (a schedule ends up inside a unit file), and
schedules that can never run (``0 0 30 2 *``).
"""

from __future__ import annotations

import calendar
import functools
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from virt_dup.errors import ScheduleError

MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")


#: cronie's DowNames: index 0 is Sunday.
WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


#: ``OnBootSec=`` for ``@reboot``.  cron runs @reboot jobs when crond starts,
#: seconds into boot; a minute keeps close to that while letting libvirtd and
#: the autostarted domains come up before a backup competes with them for I/O.
REBOOT_DELAY = "1min"


_SPECIALS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


#: cronie sets DOW_STAR for these words (so day-of-month AND day-of-week apply)
#: and no star flag for the others, whose day fields are full anyway.
_SPECIALS_WITH_DAY_OF_WEEK_STAR = {"@yearly", "@annually", "@monthly", "@weekly"}


#: Longer digit strings are refused before int() sees them (Python limits
#: int() to 4300 digits); cronie takes leading zeros, so "0005" stays valid.
_MAX_DIGITS = 100


_FULL_WEEKDAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


_FULL_MONTHS = tuple(calendar.month_name[number] for number in range(1, 13))


_ELEMENT = re.compile(
    r"(?:(?P<star>\*)|(?P<first>[0-9A-Za-z]+)(?:-(?P<last>[0-9A-Za-z]+))?)"
    r"(?:/(?P<step>[0-9A-Za-z]*))?",
    re.ASCII,
)


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names[i] stands for low + i


_MINUTE = _Field("minute", 0, 59)


_HOUR = _Field("hour", 0, 23)


_DAY_OF_MONTH = _Field("day-of-month", 1, 31)


_MONTH = _Field("month", 1, 12, MONTH_NAMES)


_DAY_OF_WEEK = _Field("day-of-week", 0, 7, WEEKDAY_NAMES)


_FIELDS = (_MINUTE, _HOUR, _DAY_OF_MONTH, _MONTH, _DAY_OF_WEEK)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed, validated cron schedule.

    ``days_of_week`` uses 0 for Sunday through 6 for Saturday (a 7 in the text
    is stored as 0).  ``day_of_month_star``/``day_of_week_star`` are cronie's
    DOM_STAR/DOW_STAR: the field's text starts with ``*``.  For ``@reboot``
    every set is empty and ``reboot`` is true.
    """

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]
    day_of_month_star: bool
    day_of_week_star: bool
    reboot: bool

    def matches(self, when: datetime) -> bool:
        """Tell whether cron would start the job in the minute of ``when``.

        Takes a naive or aware datetime, read as wall-clock time (seconds are
        ignored).  Returns False for ``@reboot``, which no clock time matches.
        """
        if self.reboot:
            return False
        if when.minute not in self.minutes or when.hour not in self.hours:
            return False
        if when.month not in self.months:
            return False
        day_of_month = when.day in self.days_of_month
        day_of_week = when.isoweekday() % 7 in self.days_of_week
        if self.day_of_month_star or self.day_of_week_star:
            return day_of_month and day_of_week
        return day_of_month or day_of_week

    @property
    def days_either(self) -> bool:
        """True when a day matches on day-of-month OR day-of-week (cron's OR rule)."""
        return not (self.day_of_month_star or self.day_of_week_star)


@functools.lru_cache(maxsize=1024)
def parse_cron(expression: str) -> CronSchedule:
    """Parse and validate a cron schedule as cronie would read it.

    Takes five fields (minute hour day-of-month month day-of-week) separated
    by spaces, or one of ``@yearly @annually @monthly @weekly @daily
    @midnight @hourly @reboot``; surrounding spaces are ignored.
    Returns the :class:`CronSchedule`.
    Raises :class:`ScheduleError` for anything cronie rejects, for the
    leniencies listed in the module docstring, and for a schedule that can
    never run; the reason names the field at fault.
    """
    for character in expression:
        if character == "\t":
            continue  # cron separates fields with spaces or tabs
        if ord(character) < 32 or ord(character) == 127:
            raise ScheduleError(
                expression, f"control character {character!r} (fields are separated by spaces)"
            )
        if ord(character) > 126:
            raise ScheduleError(expression, f"non-ASCII character {character!r}")
    text = " ".join(expression.split())  # tabs and runs of spaces separate fields
    if not text:
        raise ScheduleError(expression, "empty schedule")
    if text.startswith("@"):
        return _parse_special(text)
    words = text.split()
    if len(words) != len(_FIELDS):
        raise ScheduleError(
            text,
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(words)}",
        )
    minutes, hours, days_of_month, months, days_of_week = (
        _parse_field(text, field, word) for field, word in zip(_FIELDS, words, strict=True)
    )
    # cronie keeps bit 7 next to bit 0; one Sunday is enough here.
    if 7 in days_of_week:
        days_of_week = (days_of_week - {7}) | {0}
    schedule = CronSchedule(
        expression=text,
        minutes=minutes,
        hours=hours,
        days_of_month=days_of_month,
        months=months,
        days_of_week=days_of_week,
        day_of_month_star=words[2].startswith("*"),
        day_of_week_star=words[4].startswith("*"),
        reboot=False,
    )
    _check_can_run(schedule)
    return schedule


def next_runs(expression: str, start: datetime, count: int) -> list[datetime]:
    """List the next times cronie would run a schedule.

    Takes a cron string, the datetime to count from and how many runs to
    return.  Returns up to ``count`` datetimes strictly after ``start``, in
    order, at whole minutes, naive if ``start`` is naive and with
    ``start.tzinfo`` if it is aware; ``[]`` for ``@reboot``.  Times are
    wall-clock times in ``start``'s zone.  Across DST changes this follows
    the timer, not cronie: a minute the clock skips is left out and a
    repeated minute is returned once, at its first occurrence (cronie would
    catch up on the skipped fixed-time runs).
    Raises :class:`ScheduleError` as :func:`parse_cron` does.
    """
    schedule = parse_cron(expression)
    runs: list[datetime] = []
    if schedule.reboot or count <= 0:
        return runs
    first = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    zone = start.tzinfo
    times = [
        (hour, minute) for hour in sorted(schedule.hours) for minute in sorted(schedule.minutes)
    ]
    # parse_cron refused schedules that never run, and the calendar (weekdays
    # included) repeats every 400 years, so this ends well before year 9999.
    for year in range(first.year, datetime.max.year + 1):
        for month in sorted(schedule.months):
            if (year, month) < (first.year, first.month):
                continue
            for day in range(1, calendar.monthrange(year, month)[1] + 1):
                if not schedule.matches(datetime(year, month, day, times[0][0], times[0][1])):
                    continue
                for hour, minute in times:
                    when = datetime(year, month, day, hour, minute, tzinfo=zone)
                    if when < first or not _exists(when):
                        continue
                    runs.append(when)
                    if len(runs) == count:
                        return runs
    return runs


#: How far :func:`longest_interval` looks ahead at least: two years see every
#: month and weekday pattern of a yearly cycle twice.
_INTERVAL_HORIZON_DAYS = 2 * 366
#: ... and at most: a schedule may run only on February 29 that is a Monday
#: (28 years apart); beyond that the horizon itself is the interval.
_INTERVAL_LIMIT_DAYS = 28 * 366


def longest_interval(expressions: tuple[str, ...], start: date) -> timedelta | None:
    """The longest time between two consecutive runs of the union of schedules.

    Takes cron strings (a job's incremental and full schedules run the same
    backup) and the day to look ahead from; looks at least two years ahead
    (and at most 28, for a schedule that runs so rarely).  Returns None when
    no schedule runs at clock times (only ``@reboot``, or none).  Pure; wall
    clock minutes, DST ignored.  Raises :class:`ScheduleError` as
    :func:`parse_cron` does.
    """
    schedules = tuple(schedule for schedule in map(parse_cron, expressions) if not schedule.reboot)
    if not schedules:
        return None
    return timedelta(minutes=_longest_interval_minutes(schedules, start))


@functools.lru_cache(maxsize=256)
def _longest_interval_minutes(schedules: tuple[CronSchedule, ...], start: date) -> int:
    times = [
        sorted(hour * 60 + minute for hour in schedule.hours for minute in schedule.minutes)
        for schedule in schedules
    ]
    longest = 0
    previous: tuple[int, int] | None = None  # (day number, minute of its last run)
    for offset in range(_INTERVAL_LIMIT_DAYS):
        day = start + timedelta(days=offset)
        if offset >= _INTERVAL_HORIZON_DAYS and longest:
            break
        running = tuple(
            index
            for index, schedule in enumerate(schedules)
            if schedule.matches(
                datetime(day.year, day.month, day.day, *divmod(times[index][0], 60))
            )
        )
        if not running:
            continue
        first, last, within = _day_runs(tuple(tuple(times[index]) for index in running))
        longest = max(longest, within)
        if previous is not None:
            longest = max(longest, (offset - previous[0]) * 1440 + first - previous[1])
        previous = (offset, last)
    if longest == 0:  # one run in the whole horizon: the horizon is its interval
        longest = _INTERVAL_LIMIT_DAYS * 1440
    return longest


@functools.lru_cache(maxsize=256)
def _day_runs(times: tuple[tuple[int, ...], ...]) -> tuple[int, int, int]:
    """(first minute, last minute, longest gap within the day) of a day's runs."""
    minutes = sorted(set().union(*times))
    within = max((b - a for a, b in itertools.pairwise(minutes)), default=0)
    return minutes[0], minutes[-1], within


def describe(expression: str) -> str:
    """Describe a cron schedule in a short English phrase.

    Takes a cron string; returns e.g. ``"at 02:00 every day"`` or
    ``"every 15 minutes on Monday to Friday"``.
    Raises :class:`ScheduleError` as :func:`parse_cron` does.
    """
    schedule = parse_cron(expression)
    if schedule.reboot:
        return f"at boot (after {REBOOT_DELAY})"
    return f"{_describe_time(schedule)} {_describe_days(schedule)}"


def _parse_special(text: str) -> CronSchedule:
    word = text.split()[0]
    if word != "@reboot" and word not in _SPECIALS:
        raise ScheduleError(
            text,
            "unknown @ word (cron knows @reboot @yearly @annually @monthly @weekly "
            "@daily @midnight @hourly, in lower case)",
        )
    if word != text:
        raise ScheduleError(text, f"{word} takes no fields after it")
    if text == "@reboot":
        empty: frozenset[int] = frozenset()
        return CronSchedule(text, empty, empty, empty, empty, empty, False, False, reboot=True)
    fields = parse_cron(_SPECIALS[text])
    return CronSchedule(
        expression=text,
        minutes=fields.minutes,
        hours=fields.hours,
        days_of_month=fields.days_of_month,
        months=fields.months,
        days_of_week=fields.days_of_week,
        day_of_month_star=False,
        day_of_week_star=text in _SPECIALS_WITH_DAY_OF_WEEK_STAR,
        reboot=False,
    )


def _parse_field(expression: str, field: _Field, text: str) -> frozenset[int]:
    """Read one field's comma list into the set of values it selects."""
    values: set[int] = set()
    for element in text.split(","):
        values.update(_parse_element(expression, field, element))
    return frozenset(values)


def _parse_element(expression: str, field: _Field, element: str) -> range:
    def fail(reason: str) -> ScheduleError:
        return ScheduleError(expression, f"{field.name}: {reason}")

    if not element:
        raise fail("empty list element")
    if "~" in element:
        raise fail(f"{element!r}: random ranges (~) are not supported, a timer needs fixed times")
    match = _ELEMENT.fullmatch(element)
    if match is None:
        raise fail(f"cannot read {element!r} (expected N, a-b, a-b/step, * or */step)")
    if match["star"]:
        first, last = field.low, field.high
    else:
        first = _parse_value(expression, field, match["first"])
        last = first
        if match["last"] is not None:
            last = _parse_value(expression, field, match["last"])
        elif match["step"] is not None:
            raise fail(
                f"{element!r}: a step needs a range or * "
                f"(write {match['first']}-{field.high}/{match['step']})"
            )
    step = 1 if match["step"] is None else _parse_step(match["step"], element, fail)
    if first > last:
        # cronie's get_range reads "X-0" as "X-7", which only makes sense for weekdays.
        if field is _DAY_OF_WEEK and last == 0 and match["step"] is None:
            last = 7
        else:
            raise fail(f"{element!r}: reversed range (cron would not run it as meant)")
    return range(first, last + 1, step)


def _parse_step(text: str, element: str, fail: Callable[[str], ScheduleError]) -> int:
    if not text.isdigit() or len(text) > _MAX_DIGITS:
        raise fail(f"step {text[:12]!r} is not a number")
    step = int(text)
    if step == 0:
        raise fail(f"{element!r}: step 0")
    return step


def _parse_value(expression: str, field: _Field, token: str) -> int:
    if token.isdigit():
        if len(token) > _MAX_DIGITS:
            raise ScheduleError(expression, f"{field.name}: {token[:12]}... is out of range")
        value = int(token)
    elif field.names and token.lower() in field.names:
        value = field.low + field.names.index(token.lower())
    elif field.names:
        raise ScheduleError(
            expression,
            f"{field.name}: {token!r} is neither a number nor a name "
            f"({field.names[0]}..{field.names[-1]})",
        )
    else:
        raise ScheduleError(expression, f"{field.name}: {token!r} is not a number")
    if not field.low <= value <= field.high:
        raise ScheduleError(
            expression, f"{field.name}: {value} is out of range {field.low}-{field.high}"
        )
    return value


def possible_dates(days_of_month: frozenset[int], months: frozenset[int]) -> bool:
    """Tell whether some day of the list exists in some month (February 29 counts)."""
    return any(day <= _longest_month(month) for day in days_of_month for month in months)


def _longest_month(month: int) -> int:
    return calendar.monthrange(2000, month)[1]  # 2000 is a leap year


def _check_can_run(schedule: CronSchedule) -> None:
    # Under the OR rule the weekday side always runs.  Otherwise a day must
    # match both sides; every date falls on every weekday within the 400-year
    # cycle, so the only way to never run is a day that no chosen month has.
    if schedule.days_either or possible_dates(schedule.days_of_month, schedule.months):
        return
    days = _compress(schedule.days_of_month)
    months = ", ".join(_FULL_MONTHS[month - 1] for month in sorted(schedule.months))
    raise ScheduleError(
        schedule.expression,
        f"day-of-month: day {days} does not exist in {months}, so the schedule never runs",
    )


def _exists(when: datetime) -> bool:
    """Tell whether an aware wall-clock time exists in its zone (naive ones always do)."""
    if when.tzinfo is None:
        return True
    round_trip = when.astimezone(UTC).astimezone(when.tzinfo)
    return round_trip.replace(tzinfo=None) == when.replace(tzinfo=None)


def _compress(values: frozenset[int]) -> str:
    """Write sorted values with runs of three or more as ``a-b``: ``1-5,10``."""
    parts: list[str] = []
    ordered = sorted(values)
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        if end - start >= 2:
            parts.append(f"{ordered[start]}-{ordered[end]}")
        else:
            parts.extend(str(value) for value in ordered[start : end + 1])
        start = end + 1
    return ",".join(parts)


def _step_of(values: frozenset[int], size: int) -> int | None:
    """Return N when ``values`` are exactly 0, N, 2N... below ``size`` (N > 1), else None."""
    ordered = sorted(values)
    if len(ordered) < 2 or ordered[0] != 0:
        return None
    step = ordered[1]
    return step if ordered == list(range(0, size, step)) else None


def _describe_time(schedule: CronSchedule) -> str:
    minutes, hours = schedule.minutes, schedule.hours
    if len(minutes) == 60 and len(hours) == 24:
        return "every minute"
    if len(hours) == 24:
        return _describe_minutes_of_every_hour(minutes)
    if len(minutes) * len(hours) <= 4:
        times = (f"{hour:02d}:{minute:02d}" for hour in sorted(hours) for minute in sorted(minutes))
        return "at " + ", ".join(times)
    hour_step = _step_of(hours, 24)
    if len(minutes) == 1 and hour_step:
        return f"every {hour_step} hours at minute {min(minutes)}"
    return f"{_describe_minutes(minutes)} of hours {_compress(hours)}"


def _describe_minutes_of_every_hour(minutes: frozenset[int]) -> str:
    if len(minutes) == 1:
        return f"at minute {min(minutes)} of every hour"
    minute_step = _step_of(minutes, 60)
    if minute_step:
        return f"every {minute_step} minutes"
    return f"at minutes {_compress(minutes)} of every hour"


def _describe_minutes(minutes: frozenset[int]) -> str:
    """The minutes of some hours: "at minute 5", "every minute", "every 15 minutes"..."""
    if len(minutes) == 1:
        return f"at minute {min(minutes)}"
    if len(minutes) == 60:
        return "every minute"
    minute_step = _step_of(minutes, 60)
    if minute_step:
        return f"every {minute_step} minutes"
    return f"at minutes {_compress(minutes)}"


def _describe_weekdays(days_of_week: frozenset[int]) -> str:
    parts = []
    for run in weekday_runs(days_of_week):
        names = [_FULL_WEEKDAYS[(day + 1) % 7] for day in run]
        parts.append(f"{names[0]} to {names[-1]}" if len(run) >= 3 else ", ".join(names))
    return ", ".join(parts)


def _describe_days(schedule: CronSchedule) -> str:
    in_months = ""
    if len(schedule.months) < 12:
        months = ", ".join(_FULL_MONTHS[month - 1] for month in sorted(schedule.months))
        in_months = f" in {months}"
    day_of_month_full = len(schedule.days_of_month) == 31
    day_of_week_full = len(schedule.days_of_week) == 7
    if schedule.days_either:
        every_day = day_of_month_full or day_of_week_full
    else:
        every_day = day_of_month_full and day_of_week_full
    if every_day:
        return f"every day{in_months}"
    if schedule.days_of_month == frozenset(range(1, 32, 2)):
        days = "odd days"
    elif len(schedule.days_of_month) == 1:
        days = f"day {min(schedule.days_of_month)}"
    else:
        days = f"days {_compress(schedule.days_of_month)}"
    weekdays = _describe_weekdays(schedule.days_of_week)
    if schedule.days_either:
        return f"on {days} of the month or on {weekdays}{in_months}"
    if day_of_week_full:
        return f"on {days}{in_months or ' of the month'}"
    if day_of_month_full:
        return f"on {weekdays}{in_months}"
    return f"on {days} of the month that fall on {weekdays}{in_months}"


def weekday_runs(days_of_week: frozenset[int]) -> list[list[int]]:
    """Group weekdays into runs of consecutive days, Monday first (systemd's order)."""
    monday_first = sorted((day - 1) % 7 for day in days_of_week)
    runs: list[list[int]] = []
    for day in monday_first:
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs
