"""Habits of the command line: global options on either side of the verb,
-q/-v, one versioned JSON object per --json command, exit code 3
for "no backups yet", progress only for a person at a terminal.

Commands that need libvirt run against libvirt's own test driver
(``test:///default``, a real libvirt connection with a fake hypervisor).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from virt_dup.cli import main as cli
from virt_dup.cli import output
from virt_dup.cli.arguments import build_parser
from virt_dup.config.load import parse_config
from virt_dup.duplicity.collection import Collection
from virt_dup.errors import EXIT_NO_BACKUPS
from virt_dup.files import human_size
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.restore.sources import choose_backup

from .test_arguments import MINIMAL

GLOBAL = ["--config", "/etc/other.yml", "--debug", "-v", "-q", "-q"]


def parse(*argv: str) -> argparse.Namespace:
    parser, _subparsers = build_parser(cli.VERBS)
    return parser.parse_args(list(argv))


def global_values(arguments: argparse.Namespace) -> tuple[object, ...]:
    return (arguments.config, arguments.debug, arguments.verbose, arguments.quiet)


# -- global options before or after the verb ------------------------------------------------
@pytest.mark.parametrize("verb", sorted(MINIMAL))
def test_every_verb_takes_the_global_options_before_and_after_it(verb: str) -> None:
    before = parse(*GLOBAL, verb, *MINIMAL[verb])
    after = parse(verb, *MINIMAL[verb], *GLOBAL)
    expected = ("/etc/other.yml", True, 1, 2)
    assert global_values(before) == expected
    assert global_values(after) == expected
    assert before.handler is after.handler is cli.VERBS[verb][1]


@pytest.mark.parametrize("verb", sorted(MINIMAL))
def test_a_global_option_before_the_verb_is_not_undone_by_the_verb(verb: str) -> None:
    arguments = parse("--config", "/etc/other.yml", "-v", verb, *MINIMAL[verb])
    assert global_values(arguments) == ("/etc/other.yml", False, 1, 0)
    assert global_values(parse(verb, *MINIMAL[verb])) == (None, False, 0, 0)


def test_a_verbs_help_lists_the_global_options_once_in_their_own_group(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["help", "list-jobs"]) == 0
    text = capsys.readouterr().out
    assert text.count("global options (before or after the command):") == 1
    assert text.count("\n  --config FILE") == 1
    assert "-q, --quiet" in text and "-v, --verbose" in text


def test_config_after_the_verb_is_the_file_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "elsewhere.yml"
    config.write_text("backends:\n  offsite: file:///srv/offsite\n")
    assert cli.main(["check-config", "--syntax-only", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{config}: ok" in out and "offsite=file:///srv/offsite" in out


# -- -q / -v ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "level"),
    [
        ([], logging.INFO),
        (["-v"], logging.DEBUG),
        (["-vv"], logging.DEBUG),
        (["-q"], logging.WARNING),
        (["-qq"], logging.ERROR),
        (["-qqq"], logging.ERROR),
        (["--debug", "-q"], logging.DEBUG),
    ],
)
def test_quiet_and_verbose_move_the_log_level(argv: list[str], level: int) -> None:
    assert cli.log_level(parse("recover", *argv)) == level


def test_quiet_hides_info_messages_and_keeps_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "virt-dup.yml"
    config.write_text("backends: {}\n")
    logger = logging.getLogger("virt_dup.test")
    try:
        assert cli.main(["check-config", "--syntax-only", "-q", "--config", str(config)]) == 0
        assert not logger.isEnabledFor(logging.INFO)
        assert logger.isEnabledFor(logging.WARNING)
        assert not output.showing_progress()
    finally:
        logging.getLogger().setLevel(logging.WARNING)


# -- --json -----------------------------------------------------------------------------------
@pytest.fixture
def test_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Hypervisor]]:
    """virt-dup.yml on libvirt's test driver (its domain ``test``), its own state."""
    config = tmp_path / "virt-dup.yml"
    config.write_text(
        "libvirt:\n  uri: test:///default\n"
        f"state_dir: {tmp_path / 'state'}\ncache_dir: {tmp_path / 'cache'}\n"
        f"backends:\n  local: file://{tmp_path / 'backend'}\n"
    )
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    hypervisor = Hypervisor.open(parse_config(config.read_text(), config))
    yield config, hypervisor
    hypervisor.close()


def json_of(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    document = json.loads(capsys.readouterr().out)
    assert isinstance(document, dict)
    return document


def test_check_config_json_names_its_schema_and_masks_passwords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "virt-dup.yml"
    config.write_text("backends:\n  nas: sftp://backup:hunter2@nas/srv\n")
    assert cli.main(["--config", str(config), "check-config", "--syntax-only", "--json"]) == 0
    document = json_of(capsys)
    assert document["schema"] == "virt-dup/check-config/1"
    assert document["backends"] == {"nas": "sftp://backup:***@nas/srv"}
    assert document["config_exists"] is True
    assert "hunter2" not in json.dumps(document)


def test_schedule_explain_json_is_versioned(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schedule", "explain", "@daily", "--json"]) == 0
    document = json_of(capsys)
    assert document["schema"] == "virt-dup/schedule-explain/1"
    assert document["expression"] == "@daily"


def test_list_jobs_json_is_an_object_with_the_jobs(
    test_host: tuple[Path, Hypervisor], capsys: pytest.CaptureFixture[str]
) -> None:
    config, hypervisor = test_host
    assert cli.main(["list-jobs", "--json", "--config", str(config)], hypervisor=hypervisor) == 0
    assert json_of(capsys) == {"schema": "virt-dup/list-jobs/1", "jobs": []}


def test_an_error_under_json_is_one_line_on_stderr_and_nothing_on_stdout(
    test_host: tuple[Path, Hypervisor], capsys: pytest.CaptureFixture[str]
) -> None:
    config, hypervisor = test_host
    code = cli.main(
        ["list-jobs", "no-such-domain", "--json", "--config", str(config)], hypervisor=hypervisor
    )
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("virt-dup: error: ")


# -- no backups yet ---------------------------------------------------------------------------
def test_no_backups_yet_is_exit_3_not_a_usage_error() -> None:
    with pytest.raises(Exception) as raised:
        choose_backup(Collection(()), None)
    assert getattr(raised.value, "exit_code", None) == EXIT_NO_BACKUPS == 3
    assert str(raised.value) == "no backups yet"


# -- sizes and progress -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "shown"),
    [(0, "0B"), (999, "999B"), (1000, "1.00kB"), (452_710, "453kB"), (5 << 30, "5.37GB")],
)
def test_sizes_are_human_readable_with_honest_units(size: int, shown: str) -> None:
    assert human_size(size) == shown


def test_no_progress_bar_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress, close = output.backup_progress()
    assert progress is None
    close()
    assert capsys.readouterr().err == ""


# -- completion -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("virt-dup list-jobs --con", "--config"),
        ("virt-dup run --dry-run --js", "--json"),
        ("virt-dup edit-job X --un", "--unset"),
        ("virt-dup edit-job X --unset full_r", "full_retention"),
        ("virt-dup edit-job X --full-ret", "--full-retention"),
    ],
)
def test_completion_offers_global_options_after_the_verb_and_edit_job_flags(
    line: str, expected: str, tmp_path: Path
) -> None:
    """Through argcomplete's own protocol, as bash runs it."""

    finished = subprocess.run(
        ["bash", "-c", '"$0" -m virt_dup 8>&1 9>/dev/null', sys.executable],
        env={
            **os.environ,
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_IFS": "\n",
            "VIRT_DUP_CONFIG": str(tmp_path / "absent.yml"),
        },
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
        timeout=60,
    )
    assert expected in finished.stdout.split(), finished.stderr
