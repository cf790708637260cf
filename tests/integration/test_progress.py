"""Progress on a terminal: a bar with total, percent, rate and time left, ended
before the summary; nothing of it when stderr is no terminal (or with -q).

``virt-dup run`` and ``virt-dup restore`` run on a pseudo-terminal
(harness.terminal), against real libvirtd, QEMU, duplicity and gpg.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from harness.backups import BackupEnvironment
from harness.domains import MIB
from harness.terminal import on_terminal

pytestmark = pytest.mark.integration

#: What tqdm draws: "virt-dup: restore: 100%|#####| 6.55M/6.55M [00:01<00:00, 5.2MB/s]".
BAR = re.compile(
    r"virt-dup: (?P<what>backup|restore): +(?P<percent>\d+)%\|.*\| "
    r"(?P<done>[\d.]+[kMGT]?B?)/(?P<total>[\d.]+[kMGT]?B?) \[[\d:]+<[\d:?]+, +[\d.?]+[kMGT]?B/s\]"
)


def test_restore_and_backup_show_a_bar_on_a_terminal_and_end_it_before_the_summary(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    vm = make_domain(size=256 * MIB)
    vm.write_pattern("vda", 0x5A, 8 * MIB, 4 * MIB)
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    command = [sys.executable, "-m", "virt_dup", "--config", str(environment.config)]
    env = environment.process_environment

    status, shown = on_terminal([*command, "run", job], env)
    assert status == 0, shown
    summary = next(line for line in shown.splitlines() if "backup of vda done" in line)
    bars = [match for match in BAR.finditer(shown) if match["what"] == "backup"]
    if bars:  # duplicity reports progress only every few seconds: a small disk may end first
        assert shown.rindex(bars[-1].group(0)) < shown.rindex(summary)

    status, shown = on_terminal(
        [*command, "restore", vm.name, "--target-dir", str(tmp_path / "r")], env
    )
    assert status == 0, shown
    bars = [match for match in BAR.finditer(shown) if match["what"] == "restore"]
    assert bars, shown
    assert bars[-1]["percent"] == "100" and bars[-1]["done"] == bars[-1]["total"]
    summary = next(line for line in shown.splitlines() if line.startswith("restored backup"))
    assert shown.rindex(bars[-1].group(0)) < shown.rindex(summary)
    # the per-file lines stay readable above the bar
    assert re.search(r"virt-dup: \[1/\d\] restoring ", shown)

    # a terminal that says it is 0x0 still gets a bar (tqdm alone would draw nothing)
    status, shown = on_terminal(
        [*command, "restore", vm.name, "--target-dir", str(tmp_path / "bare")], env, size=None
    )
    assert status == 0 and BAR.search(shown), shown

    # no terminal: no bar
    plain = environment.virt_dup("restore", vm.name, "--target-dir", str(tmp_path / "plain"))
    assert not BAR.search(plain.stderr + plain.stdout)
