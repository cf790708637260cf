"""Proof that the generated timers fire exactly when cronie would run the job.

For every expression of a corpus (hand-picked edge cases plus a seeded random
sample of every syntax cron has), the next 100 elapses of its ``OnCalendar=``
lines, as ``systemd-analyze calendar`` computes them, must equal the next 100
times of a reference that knows nothing of the translation: a brute-force walk
over days, hours and minutes asking :meth:`CronSchedule.matches`.  The
reference itself is checked against croniter (``day_or=True``,
``implement_cron_bug=True``, its emulation of cronie's star exception) and
against :func:`next_runs`.

All expressions of one base time go to one ``systemd-analyze`` call, so the
whole file costs three process runs.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta

import pytest
from croniter import croniter

from virt_dup.config.cron import MONTH_NAMES, WEEKDAY_NAMES, CronSchedule, next_runs, parse_cron
from virt_dup.errors import ScheduleError
from virt_dup.systemd.schedule import cron_to_timer

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)

ITERATIONS = 100
BASES = (
    datetime(2026, 11, 26, 12, 34, tzinfo=UTC),
    # A leap year, just before February 29.
    datetime(2028, 2, 28, 22, 10, tzinfo=UTC),
    # Across 2100, which is not a leap year, up to systemd's end of time.
    datetime(2099, 12, 31, 23, 59, tzinfo=UTC),
)
#: systemd's calendar computation stops before 2200 ("Next elapse: never").
SYSTEMD_END = datetime(2199, 12, 31, 23, 59, tzinfo=UTC)

HAND_PICKED = [
    "* * * * *",
    "0 * * * *",
    "59 * * * *",
    "*/5 * * * *",
    "*/7 * * * *",
    "*/59 * * * *",
    "*/60 * * * *",
    "0-59/13 * * * *",
    "7-52/9 */5 * * *",
    "15,45 */3 * * *",
    "0-59/15 0-23/6 * * *",
    "23 0-20/2 * * *",
    "* 0 * * *",
    "0 2 * * *",
    "0 0 * * *",
    "59 23 31 12 *",
    "0 0 1 1 *",
    "0 0 29 2 *",
    "* 0 29 2 *",
    "30 12 28-29 2 *",
    "0 0 31 * *",
    "0 0 30 * *",
    "0 0 28-31 * *",
    "0 0 30,31 2,4 *",
    "0 0 31 1-12/2 *",
    "0 0 1-31 * *",
    "0 0 */1 * *",
    "0 0 1-31/7 * *",
    "0 0 */7 * *",
    "0 0 */10 * *",
    # The OR rule and cronie's star exception side by side.
    "0 0 1-31/7 * 1",
    "0 0 */7 * 1",
    "0 0 1-31/2 * 0",
    "0 0 */2 * 0",
    "0 0 1,15 * 1",
    "0 0 1,15 * */2",
    "0 0 */2 * 1-5",
    "0 0 */2,15 * 1",
    "0 0 15,*/2 * 1",
    "0 0 1 * *,1",
    "0 0 1 * 1,*",
    "0 0 13 * 5",
    "0 0 13 * fri",
    "30 4 1,15 * 5",
    "30 4 1-7 * mon",
    "30 4 */10 */2 sun",
    "0 0 1 6 1",
    "0 0 29 2 1",
    "0 0 29 2 */7",
    "0 0 */28 2 */7",
    "0 0 31 2 mon",
    "0 0 31 4,6,9,11 mon",
    "0 0 1 1 0",
    "0 0 1-31 * 1",
    "0 0 1 * 0-7",
    # Sunday is 0 and 7.
    "0 0 * * 0",
    "0 0 * * 7",
    "0 0 * * 0,7",
    "0 0 * * 5-7",
    "0 0 * * 1-7",
    "0 0 * * 0-6",
    "0 0 * * 1-7/2",
    "0 0 * * 0-7/3",
    "0 0 * * */2",
    "0 0 * * */3",
    "0 0 * * */7",
    "5 4 * * sun",
    "0 0 * * sat-sun",
    "0 0 * * fri-0",
    "0 0 * * 6-0",
    "0 0 * * 7-0",
    "0 22 * * 1-5",
    "0 22 * * mon-fri",
    "0 0 * * MON",
    "0 0 * * Mon,Wed,Fri",
    "0 0 * * mon-wed,fri",
    "0 0 * * tue-thu/2",
    # Months, names in any case, steps over names.
    "0 12 * jan,jul *",
    "0 12 * JAN-MAR *",
    "0 12 * Jan-Dec/3 *",
    "0 12 * */2 *",
    "0 12 * 2-11/3 *",
    "0 0,12 1 */2 *",
    "0 4 8-14 * *",
    "0 0 * 2 *",
    "0 0 1 dec *",
    # One value short of full, so a lazy "*" would show.
    "1-59 * * * *",
    "0 1-23 * * *",
    "0 0 1-30 * *",
    "0 0 2-31 * *",
    "0 0 * 1-11 *",
    "0 0 * 2-12 *",
    "0 0 * * 1-6",
    "0 0 * * 0-5",
    "0 0 2-31 * 1-6",
    "00 00 * * *",
    "05 02 01 02 *",
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
]


def random_element(rng: random.Random, low: int, high: int, names: tuple[str, ...]) -> str:
    """One list element: N, a-b, a-b/step, */step; values sometimes as names."""

    def value(number: int) -> str:
        if names and number - low < len(names) and rng.random() < 0.4:
            name = names[number - low]
            return rng.choice([name, name.upper(), name.capitalize()])
        return str(number)

    kind = rng.randrange(5)
    if kind == 0:
        return value(rng.randint(low, high))
    first = rng.randint(low, high)
    last = rng.randint(first, high)
    if kind == 1:
        return f"{value(first)}-{value(last)}"
    step = rng.randint(1, max(2, (high - low) // 2))
    if kind == 2:
        return f"{value(first)}-{value(last)}/{step}"
    if kind == 3:
        return f"*/{step}"
    return ",".join(value(rng.randint(low, high)) for _ in range(rng.randint(2, 4)))


def random_field(rng: random.Random, low: int, high: int, names: tuple[str, ...] = ()) -> str:
    if rng.random() < 0.3:
        return "*"
    elements = [random_element(rng, low, high, names) for _ in range(rng.choice([1, 1, 1, 2]))]
    return ",".join(elements)


def random_corpus(size: int, seed: int = 20261126) -> list[str]:
    """Valid random expressions; some fields kept narrow so fire times stay dense enough."""
    rng = random.Random(seed)
    corpus: list[str] = []
    while len(corpus) < size:
        expression = " ".join(
            [
                random_field(rng, 0, 59),
                random_field(rng, 0, 23),
                random_field(rng, 1, 31),
                random_field(rng, 1, 12, MONTH_NAMES),
                random_field(rng, 0, 7, WEEKDAY_NAMES),
            ]
        )
        try:
            parse_cron(expression)
        except ScheduleError:
            continue  # e.g. day 31 in months that have none: covered by the rejection tests
        corpus.append(expression)
    return corpus


CORPUS = list(dict.fromkeys(HAND_PICKED + random_corpus(260)))


def reference_runs(
    schedule: CronSchedule, start: datetime, count: int, end: datetime
) -> list[datetime]:
    """Cron's next runs after ``start`` up to ``end``, by asking matches() minute by minute.

    Days and hours are skipped only when matches() says no for their first
    possible minute, so the walk needs nothing but matches() and the smallest
    hour and minute of the schedule.
    """
    runs: list[datetime] = []
    first_hour, first_minute = min(schedule.hours), min(schedule.minutes)
    day = start.date()
    while len(runs) < count and day <= end.date():
        if schedule.matches(datetime.combine(day, time(first_hour, first_minute))):
            for hour in range(24):
                if not schedule.matches(datetime.combine(day, time(hour, first_minute))):
                    continue
                for minute in range(60):
                    when = datetime.combine(day, time(hour, minute), tzinfo=UTC)
                    if start < when <= end and schedule.matches(when):
                        runs.append(when)
        day += timedelta(days=1)
    return runs[:count]


def systemd_elapses(specs: list[str], base: datetime) -> dict[str, list[datetime]]:
    """Run one ``systemd-analyze calendar`` over all specs; return each one's elapses."""
    result = subprocess.run(
        [
            "systemd-analyze",
            "calendar",
            f"--base-time=@{int(base.timestamp())}",
            f"--iterations={ITERATIONS}",
            *specs,
        ],
        env={**os.environ, "TZ": "UTC"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    elapses: dict[str, list[datetime]] = {}
    current = ""
    after_original = False
    # A block starts with "Original form:" only when normalizing changed the
    # spec; otherwise "Normalized form:" is the spec as given.
    for line in result.stdout.splitlines():
        label, _, value = line.strip().partition(": ")
        if label == "Original form":
            current, after_original = value, True
            elapses[current] = []
        elif label == "Normalized form":
            if not after_original:
                current = value
                elapses[current] = []
            after_original = False
        elif label in ("Next elapse",) or label.startswith("Iter. #"):
            found = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", value)
            if found:
                elapses[current].append(datetime.fromisoformat(found[0]).replace(tzinfo=UTC))
            else:
                assert value == "never", line
    assert sorted(elapses) == sorted(set(specs)), "systemd-analyze skipped or renamed a spec"
    return elapses


def timer_elapses(
    lines: tuple[str, ...], elapses: dict[str, list[datetime]]
) -> tuple[list[datetime], datetime]:
    """Merge the elapses of a schedule's lines; return them and how far they are complete.

    A line that gave all its iterations is complete only up to its last elapse;
    one that gave fewer is complete up to systemd's end of time.
    """
    complete_until = SYSTEMD_END
    merged: set[datetime] = set()
    for line in lines:
        times = elapses[line]
        merged.update(times)
        if len(times) == ITERATIONS:
            complete_until = min(complete_until, times[-1])
    return sorted(when for when in merged if when <= complete_until)[:ITERATIONS], complete_until


@pytest.fixture(scope="module")
def systemd_results() -> dict[datetime, dict[str, list[datetime]]]:
    specs = sorted(
        {line for expression in CORPUS for line in cron_to_timer(expression).on_calendar}
    )
    return {base: systemd_elapses(specs, base) for base in BASES}


def test_corpus_size_and_coverage() -> None:
    assert len(CORPUS) >= 300
    assert len(HAND_PICKED) == len(set(HAND_PICKED))
    fields = [expression.split() for expression in CORPUS if not expression.startswith("@")]
    for index in range(5):
        texts = [words[index] for words in fields]
        assert any(re.search(r"\d-\d+/", text) for text in texts), f"a-b/step in field {index}"
        assert any(text.startswith("*/") for text in texts), f"*/step in field {index}"
        assert any("," in text for text in texts), f"list in field {index}"
        assert any(re.fullmatch(r"\w+-\w+", text) for text in texts), f"range in field {index}"
    schedules = [parse_cron(expression) for expression in CORPUS]
    restricted = [
        schedule
        for schedule in schedules
        if len(schedule.days_of_month) < 31 and len(schedule.days_of_week) < 7
    ]
    assert sum(schedule.days_either for schedule in restricted) >= 20, "OR rule"
    assert sum(not schedule.days_either for schedule in restricted) >= 20, "star exception"
    assert sum(bool(re.search(r"[a-z]", words[3], re.I)) for words in fields) >= 20, "month names"
    assert sum(bool(re.search(r"[a-z]", words[4], re.I)) for words in fields) >= 20, "day names"
    assert sum("7" in words[4] for words in fields) >= 20, "7 is Sunday"
    assert {"@yearly", "@monthly", "@weekly", "@daily", "@hourly"} <= set(CORPUS)


def corpus_chunks(size: int = 40) -> Iterator[list[str]]:
    for start in range(0, len(CORPUS), size):
        yield CORPUS[start : start + size]


@pytest.mark.parametrize("chunk", list(corpus_chunks()), ids=lambda chunk: chunk[0])
def test_timers_fire_when_cron_runs(
    chunk: list[str], systemd_results: dict[datetime, dict[str, list[datetime]]]
) -> None:
    for expression in chunk:
        schedule = parse_cron(expression)
        lines = cron_to_timer(expression).on_calendar
        for base in BASES:
            timer, complete_until = timer_elapses(lines, systemd_results[base])
            cron = reference_runs(schedule, base, ITERATIONS, complete_until)
            assert timer == cron, (expression, lines, base)
            assert cron or base.year > 2150, (expression, base)
            assert next_runs(expression, base, len(cron)) == cron, (expression, base)


def croniter_divergence(expression: str) -> str | None:
    """Name a form croniter 7 reads differently from cronie, or return None.

    Found by this very cross-check; cronie's reading is the one in entry.c.
    """
    fields = expression.split()
    for index, field in enumerate(fields):
        for element in field.split(","):
            if "*" in element and not field.startswith("*"):
                return "croniter sets the star flag for a '*' anywhere in the list"
            ends = re.fullmatch(r"(\w+)-(\w+)(?:/\d+)?", element)
            if ends is None:
                continue
            first, last = (field_value(index, end) for end in ends.groups())
            if first == last:
                return "croniter reads a range a-a as '*'"
            if first > last:
                return "croniter does not read cronie's X-0 (X-7) weekday range"
    return None


def field_value(index: int, token: str) -> int:
    if token.isdigit():
        return int(token)
    if index == 3:
        return MONTH_NAMES.index(token.lower()) + 1
    return WEEKDAY_NAMES.index(token.lower())


def test_reference_agrees_with_croniter() -> None:
    checked = 0
    for expression in CORPUS:
        if croniter_divergence(expression):
            continue
        schedule = parse_cron(expression)
        for base in BASES[:2]:
            expected = [
                when.replace(tzinfo=None)
                for when in reference_runs(schedule, base, 20, SYSTEMD_END)
            ]
            iterator = croniter(
                expression, base.replace(tzinfo=None), day_or=True, implement_cron_bug=True
            )
            assert [iterator.get_next(datetime) for _ in expected] == expected, expression
        checked += 1
    assert checked >= 200


REJECTED = [
    # What cronie refuses.
    "",
    "* * * *",
    "* * * * * *",
    "60 * * * *",
    "* 24 * * *",
    "* * 0 * *",
    "* * 32 * *",
    "* * * 0 *",
    "* * * 13 *",
    "* * * * 8",
    "*/0 * * * *",
    "1-5/0 * * * *",
    "5/10 * * * *",
    "0/35 * * * *",
    "*-5 * * * *",
    "1-/2 * * * *",
    "1,,2 * * * *",
    "-1 * * * *",
    "1.5 * * * *",
    "mon * * * *",
    "* * * mon *",
    "* * * * jan",
    "* * * * monday",
    "* * * * mon-fri/x",
    "0 0 L * *",
    "0 0 * * 1#2",
    "0 0 ? * *",
    "@every",
    "@every 1h",
    "@DAILY",
    "@daily 0",
    # What virt-dup refuses on top.
    "0 2 * * *\nExecStartPre=/bin/evil",
    "5-3 * * * *",
    "0 5-0 * * *",
    "0 0 * * sat-sun/2",
    "0~30 * * * *",
    # Never runs.
    "0 0 30 2 *",
    "0 0 31 2 *",
    "0 0 30,31 2 *",
    "0 0 31 4,6,9,11 *",
    "0 0 31 apr,jun *",
    "0 0 31 2 */2",
]


@pytest.mark.parametrize("expression", REJECTED)
def test_rejected(expression: str) -> None:
    with pytest.raises(ScheduleError):
        cron_to_timer(expression)
