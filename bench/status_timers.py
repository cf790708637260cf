#!/usr/bin/env python3
"""What ``virt-dup status`` pays systemd for COUNT jobs: one ``next_elapse``
D-Bus call per timer, against a real ``systemd --user`` (the test harness's,
in a private mount namespace; run as root).

Makes COUNT timers ``virt-dup@<uuid>.timer`` (daily, each its own minute)
with a do-nothing service, starts them, then times, in this process, the
connection and COUNT ``ServiceManager.next_elapse`` calls as ``status``
makes them.  Prints the median of RUNS rounds.

    .venv/bin/python bench/status_timers.py [--count 100] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "integration")]

from harness.manager import start_user_manager  # noqa: E402

from virt_dup.systemd.manager import ServiceManager  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    manager = start_user_manager(Path("/run"))
    try:
        units = manager.config_home / "systemd" / "user"
        units.mkdir(parents=True, exist_ok=True)
        (units / "virt-dup@.service").write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
        timers = []
        for number in range(arguments.count):
            name = f"virt-dup@{uuid.uuid4()}.timer"
            (units / name).write_text(
                f"[Timer]\nOnCalendar=*-*-* 02:{number % 60:02d}:00\nPersistent=true\n"
            )
            timers.append(name)
        manager.systemctl("daemon-reload")
        manager.systemctl("start", *timers)
        rounds = []
        for _run in range(arguments.runs):
            started = time.perf_counter()
            with ServiceManager.connect("user", environ=manager.env) as systemd:
                missing = [timer for timer in timers if systemd.next_elapse(timer) is None]
            rounds.append(time.perf_counter() - started)
            assert not missing, missing[:3]
        print(
            f"{arguments.count} timers: connect + next_elapse each: median "
            f"{statistics.median(rounds) * 1000:.0f} ms, min {min(rounds) * 1000:.0f} ms "
            f"({arguments.runs} rounds)"
        )
    finally:
        manager.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
