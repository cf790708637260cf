"""The command line: every verb's arguments and handler, usage errors, help and --version.

Parsing goes through :func:`build_parser` with the real ``VERBS`` table;
``main()`` is run only where nothing needs libvirt or systemd (usage errors,
help, ``--version``, ``schedule explain``, ``check-config``).  A usage error
is exactly one ``virt-dup: error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from virt_dup import __version__
from virt_dup.cli import main as cli
from virt_dup.cli.arguments import build_parser
from virt_dup.config.options import OPTIONS
from virt_dup.errors import UsageError

JOB = "0e1f2a3b-1111-4222-8333-444455556666"

#: The fewest arguments each verb takes.
MINIMAL = {
    "add-job": ["vm01"],
    "edit-job": [JOB, "--depth", "1"],
    "remove-job": [JOB],
    "remove-all-jobs": [],
    "list-jobs": [],
    "status": [],
    "check-config": [],
    "doctor": [],
    "init": [],
    "export-key": [],
    "schedule": ["explain", "@daily"],
    "install-units": [],
    "sync-timers": [],
    "run": [JOB],
    "recover": [],
    "alert": [f"virt-dup@{JOB}.service"],
    "backups": [],
    "restore": ["vm01"],
    "verify": [JOB],
    "migrate-backend": [JOB, "--to", "file:///srv/b"],
    "help": [],
}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "virt-dup.yml"
    path.write_text("backends:\n  local: file:///srv/backups\n")
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser, _subparsers = build_parser(cli.VERBS)
    return parser.parse_args(list(argv))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("virt-dup: error: ")
    return line


# -- every verb ---------------------------------------------------------------------------
def test_every_verb_is_covered_here() -> None:
    assert set(MINIMAL) == set(cli.VERBS)


@pytest.mark.parametrize("verb", sorted(MINIMAL))
def test_each_verb_parses_its_minimal_arguments_into_its_handler(verb: str) -> None:
    arguments = parse(verb, *MINIMAL[verb])
    assert arguments.command == verb
    assert arguments.handler is cli.VERBS[verb][1]
    assert arguments.config is None and arguments.debug is False


def test_list_jobs_is_also_jobs() -> None:
    assert parse("jobs", "vm01").handler is cli.cmd_list_jobs


def test_arguments_land_where_the_handlers_read_them() -> None:
    run = parse("--config", "/c.yml", "--debug", "run", "--domain", "vm01", "--full", "--dry-run")
    assert (run.config, run.debug, run.job, run.domain, run.full, run.dry_run) == (
        "/c.yml",
        True,
        None,
        "vm01",
        True,
        True,
    )
    restore = parse(
        "restore",
        "vm01",
        "20261126T114449Z",
        "--target-dir",
        "/r",
        "--disk",
        "vda",
        "--disk",
        "vdb",
        "--backing-file",
        "vdb=/b/base.qcow2",
    )
    assert (restore.domain, restore.backup_id, restore.target_dir, restore.in_place) == (
        "vm01",
        "20261126T114449Z",
        "/r",
        False,
    )
    assert restore.disk == ["vda", "vdb"]
    assert restore.backing_file == ["vdb=/b/base.qcow2"]
    explain = parse("schedule", "explain", "0 2 * * *", "--count", "3")
    assert (explain.expression, explain.count, explain.json) == ("0 2 * * *", 3, False)
    assert parse("schedule", "explain", "@daily").count == 5
    install = parse("install-units", "--scope", "user", "--unit-dir", "/u")
    assert (install.scope, install.unit_dir, install.root) == ("user", Path("/u"), None)
    assert parse("install-units", "--root", "/tmp/r").root == Path("/tmp/r")


# -- add-job ----------------------------------------------------------------------------------
def test_add_job_has_one_flag_per_option() -> None:
    for option in OPTIONS:
        arguments = parse("add-job", "vm01", option.command_line_flag, option.example)
        expected = [option.example] if option.repeatable else option.example
        assert getattr(arguments, option.name) == expected, option.name
        others = [other.name for other in OPTIONS if other is not option]
        assert all(getattr(arguments, name) is None for name in others), option.name


def test_add_job_list_flags_repeat_and_disks_accumulate() -> None:
    arguments = parse(
        "add-job",
        "vm01",
        "--backend",
        "local",
        "--backend",
        "sftp://h//srv",
        "--dev",
        "vda",
        "--path",
        "/i/data.qcow2",
        "--dev",
        "vdb",
        "--uuid",
        JOB,
    )
    assert arguments.backends == ["local", "sftp://h//srv"]
    assert (arguments.dev, arguments.path, arguments.uuid) == (
        ["vda", "vdb"],
        ["/i/data.qcow2"],
        JOB,
    )


def test_add_job_help_lists_every_option_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["help", "add-job"]) == 0
    text = capsys.readouterr().out
    for option in OPTIONS:
        assert option.command_line_flag in text, option.name


# -- usage errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", JOB, "--nosuch"], "unrecognized arguments: --nosuch"),
        (["add-job", "vm01", "--shedule", "@daily"], "unrecognized arguments: --shedule"),
        (["--nosuch", "list-jobs"], "unrecognized arguments: --nosuch"),
        (["nosuch"], "invalid choice: 'nosuch'"),
        (["schedule"], "the following arguments are required"),
        (["schedule", "explain", "@daily", "--count", "x"], "invalid int value: 'x'"),
        (["install-units", "--scope", "cluster"], "invalid choice: 'cluster'"),
        (["remove-job"], "the following arguments are required: JOB_UUID"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", str(config), *argv]) == 2

    line = one_error_line(capsys)
    assert message in line
    assert re.search(r" \(see 'virt-dup( [a-z-]+)* --help'\)$", line), line


def test_the_parser_raises_usage_error_rather_than_exiting() -> None:
    with pytest.raises(UsageError, match="invalid choice"):
        parse("nosuch")


def test_no_verb_prints_the_help_and_exits_2(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: virt-dup")


# -- help and --version -------------------------------------------------------------------------
@pytest.mark.parametrize("verb", sorted(MINIMAL))
def test_help_verb_prints_that_verbs_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["help", verb]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: virt-dup {verb} ")


def test_help_restore_shows_restore_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["help", "restore"]) == 0
    text = capsys.readouterr().out
    assert "--in-place" in text and "--backing-file" in text
    assert "--full-retention" not in text  # not add-job's help


def test_help_alone_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: virt-dup")
    for verb in cli.VERBS:
        assert verb in text, verb


def test_help_for_an_unknown_verb_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["help", "nosuch"]) == 2
    assert one_error_line(capsys) == "virt-dup: error: no command 'nosuch' (see 'virt-dup help')"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"virt-dup {__version__}\n"


# -- handlers that need neither libvirt nor systemd ---------------------------------------------
def test_schedule_explain_runs_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schedule", "explain", "30 2 * * 1-5", "--json", "--count", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["expression"] == "30 2 * * 1-5"
    assert result["on_calendar"] == ["Mon..Fri *-*-* 02:30:00"]
    assert len(result["next"]) == 3


def test_an_impossible_schedule_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schedule", "explain", "0 0 30 2 *"]) == 2
    assert "day 30 does not exist in February" in one_error_line(capsys)


def test_check_config_reads_the_named_file(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", str(config), "check-config", "--syntax-only"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{config}: ok"
    assert "backends: local=file:///srv/backups" in out


def test_a_bad_config_file_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "virt-dup.yml"
    bad.write_text("defaults:\n  schedul: '@daily'\n")
    assert cli.main(["--config", str(bad), "check-config"]) == 2
    assert "defaults.schedul: unknown option" in one_error_line(capsys)
