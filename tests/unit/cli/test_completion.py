"""Shell completion (argcomplete's protocol, the real ``virt-dup``) of the key verbs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def complete(line: str, tmp_path: Path, cwd: Path | None = None) -> list[str]:
    output = tmp_path / "completions"
    subprocess.run(
        [sys.executable, "-m", "virt_dup"],
        env={
            **os.environ,
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_IFS": "\n",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": str(output),
            "VIRT_DUP_CONFIG": str(tmp_path / "none.yml"),
        },
        capture_output=True,
        check=False,
        cwd=cwd,
    )
    return sorted(item.strip() for item in output.read_text().split("\n") if item.strip())


def test_the_key_verbs_and_their_options_complete(tmp_path: Path) -> None:
    assert complete("virt-dup exp", tmp_path) == ["export-key"]
    assert "init" in complete("virt-dup in", tmp_path)
    assert complete("virt-dup init --im", tmp_path) == ["--import"]
    assert complete("virt-dup export-key --out", tmp_path) == ["--output"]


def test_init_import_completes_key_files(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("host-key.asc", "host-key.txt", "other.gpg"):
        (keys / name).write_text("")
    assert complete("virt-dup init --import ", tmp_path, cwd=keys) == ["host-key.asc", "other.gpg"]
