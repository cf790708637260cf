"""``virt-dup schedule explain CRON``: what a cron string becomes, and when it runs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from virt_dup.config.cron import describe, next_runs
from virt_dup.systemd.schedule import cron_to_timer


@dataclass(frozen=True)
class Explanation:
    """A cron string's timer lines, its description and its next runs."""

    expression: str
    description: str
    on_calendar: tuple[str, ...]
    on_boot_sec: str | None
    next_runs: tuple[datetime, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "expression": self.expression,
            "description": self.description,
            "on_calendar": list(self.on_calendar),
            "on_boot_sec": self.on_boot_sec,
            "next": [run.isoformat() for run in self.next_runs],
        }

    def lines(self) -> list[str]:
        """The lines exactly as they go into the timer, then comments."""
        lines = [f"OnCalendar={spec}" for spec in self.on_calendar]
        if self.on_boot_sec is not None:
            lines.append(f"OnBootSec={self.on_boot_sec}")
        lines.append(f"# {self.description}")
        lines += [f"# next: {run.strftime('%a %Y-%m-%d %H:%M %Z')}" for run in self.next_runs]
        return lines


def explain(expression: str, count: int, now: datetime) -> Explanation:
    """Raises :class:`~virt_dup.errors.ScheduleError` for a string cron would refuse."""
    timer = cron_to_timer(expression)
    return Explanation(
        expression=expression,
        description=describe(expression),
        on_calendar=timer.on_calendar,
        on_boot_sec=timer.on_boot_sec,
        next_runs=tuple(next_runs(expression, now, count)),
    )
