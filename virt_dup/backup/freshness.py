"""Is a job's last successful backup recent enough?  Pure: the clock is an argument.

Like sanoid's monitor, the thresholds follow the schedule: a job is *warn*
once its last success is older than 1.5 times, and *crit* once it is older
than 3 times, the longest interval between two of its scheduled runs
(incremental and full schedules together: both make a backup).  A daily job
is warn after 36 hours (one run missed, with time for a slow one) and crit
after 3 days.  The job options ``freshness_warn`` and ``freshness_crit``
(intervals, ``36h``, ``3D``) replace either threshold; a job with neither a
clock schedule (none, or only ``@reboot``) nor an option is not checked.

The mark is the worse of the age's and the last run's: a last run that
failed is at least *warn*; a job that never succeeded is *warn* before its
first run and *crit* after a failed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from virt_dup.config.cron import longest_interval
from virt_dup.config.options import JobOptions, interval_length

OK = "ok"
WARN = "warn"
CRIT = "crit"
#: Not checked: no threshold (no clock schedule, no freshness option).
UNCHECKED = "-"
#: Marks from best to worst; Nagios' exit codes are their indexes (0, 1, 2).
MARKS = (OK, WARN, CRIT)

WARN_FACTOR = 1.5
CRIT_FACTOR = 3.0


@dataclass(frozen=True)
class Thresholds:
    """Ages of the last success that make a job warn and crit (None: not checked)."""

    warn: timedelta | None
    crit: timedelta | None

    @property
    def checked(self) -> bool:
        return self.warn is not None or self.crit is not None


def thresholds(options: JobOptions, today: date) -> Thresholds:
    """The thresholds of a job with effective ``options`` (defaults applied).

    The longest interval of its schedules is measured from ``today``.  A crit
    threshold below the warn threshold is raised to it.  Raises
    :class:`~virt_dup.errors.ScheduleError` for a schedule cron refuses.
    """
    schedules = tuple(s for s in (options.schedule, options.full_schedule) if s)
    interval = longest_interval(schedules, today) if schedules else None
    warn = interval * WARN_FACTOR if interval is not None else None
    crit = interval * CRIT_FACTOR if interval is not None else None
    if options.freshness_warn is not None:
        warn = interval_length(options.freshness_warn)
    if options.freshness_crit is not None:
        crit = interval_length(options.freshness_crit)
    if warn is not None and crit is not None and crit < warn:
        crit = warn
    return Thresholds(warn, crit)


@dataclass(frozen=True)
class Freshness:
    """A job's mark and why."""

    mark: str  # ok, warn, crit or "-"
    reason: str  # "" for ok and unchecked

    @property
    def problem(self) -> bool:
        return self.mark in (WARN, CRIT)


def freshness(
    limits: Thresholds,
    last_success: datetime | None,
    last_result: str | None,
    now: datetime,
) -> Freshness:
    """The mark of a job whose last success finished at ``last_success`` (None:
    never) and whose last run ended ``last_result`` (None: never ran)."""
    marks = [Freshness(UNCHECKED, "")]
    if last_result == "failed":
        marks.append(Freshness(WARN, "the last run failed"))
    if limits.checked:
        if last_success is None:
            if last_result is None:
                marks.append(Freshness(WARN, "no backup yet (never ran)"))
            else:
                marks.append(Freshness(CRIT, "no successful backup yet"))
        else:
            age = now - last_success
            shown = format_age(age)
            if limits.crit is not None and age >= limits.crit:
                marks.append(
                    Freshness(
                        CRIT, f"last success {shown} ago (crit after {format_age(limits.crit)})"
                    )
                )
            elif limits.warn is not None and age >= limits.warn:
                marks.append(
                    Freshness(
                        WARN, f"last success {shown} ago (warn after {format_age(limits.warn)})"
                    )
                )
            else:
                marks.append(Freshness(OK, ""))
    worst = max(marks, key=lambda found: _rank(found.mark))
    if worst.mark == WARN:  # every reason of the worst mark, e.g. failed and old
        reasons = [found.reason for found in marks if found.mark == WARN]
        worst = Freshness(WARN, "; ".join(reasons))
    return worst


def _rank(mark: str) -> int:
    return MARKS.index(mark) if mark in MARKS else -1


def format_age(age: timedelta) -> str:
    """``45s``, ``12m``, ``5h12m``, ``3d4h``: an age for people, two units at most."""
    seconds = max(int(age.total_seconds()), 0)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{seconds}s"
