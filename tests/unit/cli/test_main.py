"""virt_dup.cli.main: what every verb runs with."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from virt_dup.cli import main as cli_main


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_every_verb_and_its_children_run_with_umask_077(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Files virt-dup or a child creates without an explicit mode (duplicity's
    cache, gpg, qemu-img) are root's alone, as under the units' UMask=0077."""
    seen = {}

    def list_jobs(context: cli_main.Context) -> int:
        seen["umask"] = current_umask()
        subprocess.run(["touch", str(tmp_path / "by-a-child")], check=True)
        return 0

    add_arguments, _handler = cli_main.VERBS["list-jobs"]
    monkeypatch.setitem(cli_main.VERBS, "list-jobs", (add_arguments, list_jobs))
    before = os.umask(0o022)
    try:
        assert cli_main.main(["list-jobs"]) == 0
        after = current_umask()
    finally:
        os.umask(before)

    assert seen["umask"] == 0o077
    assert (tmp_path / "by-a-child").stat().st_mode & 0o777 == 0o600
    assert after == 0o022  # given back: main() is also called in-process
