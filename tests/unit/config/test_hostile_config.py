"""Hostile-input corpus, virt-dup.yml: every case is one clear line, no traceback.

Each case goes through :func:`parse_config` (the error names the file and the
key) and through the real CLI (``virt-dup --config FILE check-config``: exit
2, one ``virt-dup: error:`` line, no traceback, no "internal error", the file
untouched).  docs/security.md lists the cases.  Bad values that are the same
for virt-dup.yml and a job's XML attributes (they share one option table)
are in tests/unit/systemd/test_hostile_generator.py as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from virt_dup.cli import main as cli
from virt_dup.config.load import parse_config
from virt_dup.errors import ConfigError

PATH = Path("/etc/virt-dup/virt-dup.yml")

#: A whole config file can be no longer than this in an error line.
MAX_LINE = 400


def case(case_id: str, text: str, message: str) -> object:
    return pytest.param(text, message, id=case_id)


HOSTILE_CONFIGS = [
    # syntax
    case("tab-indented YAML", "defaults:\n\tdepth: 1\n", "YAML syntax error at line 2"),
    case("NUL byte", "scope: sys\x00tem\n", "YAML syntax error"),
    case("python object tag", "scope: !!python/object/apply:os.system [id]\n", "constructor"),
    case("nested 20000 deep", "[" * 20000 + "]" * 20000, "YAML nested too deeply"),
    case("a key given twice", "scope: user\nscope: system\n", "the key 'scope' is given twice"),
    case(
        "an option given twice",
        "defaults:\n  depth: 1\n  depth: 2\n",
        "the key 'depth' is given twice",
    ),
    case(
        "alias bomb",
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n",
        "a: unknown key",
    ),
    # types
    case("scope is a list", "scope: [system]\n", "scope: expected system or user"),
    case("libvirt is a string", "libvirt: qemu:///system\n", "libvirt: expected a mapping"),
    case("state_dir is a number", "state_dir: 5\n", "state_dir: expected a non-empty string"),
    case("state_dir is relative", "state_dir: ../state\n", "state_dir: expected an absolute path"),
    case(
        "schedule is a boolean", "defaults:\n  schedule: yes\n", "defaults.schedule: expected text"
    ),
    case("schedule is a date", "defaults:\n  schedule: 2024-01-01\n", "defaults.schedule"),
    case("keys hold a list", "policy:\n  allowed_keys: [[1]]\n", "policy.allowed_keys: expected"),
    # unknown keys
    case("unknown top-level key", "ExecStart: /bin/sh\n", "ExecStart: unknown key"),
    case("unknown non-ASCII key", "défaults: {}\n", "unknown key (did you mean defaults?)"),
    case("unknown encryption key", "encryption:\n  passphrase: x\n", "encryption.passphrase"),
    # hostile URLs
    case(
        "backend URL starting with --",
        "backends:\n  evil: '--exclude-filelist=/x://y'\n",
        "backends.evil: expected a duplicity URL",
    ),
    case(
        "backend URL starting with -",
        "backends:\n  evil: '-file:///srv'\n",
        "backends.evil: expected a duplicity URL",
    ),
    case(
        "backend URL with a blank",
        "backends:\n  evil: 'file:///srv --allow-source-mismatch'\n",
        "backends.evil: expected a duplicity URL",
    ),
    case(
        "backend URL with DEL",
        'backends:\n  evil: "file:///srv\\x7f"\n',
        "backends.evil: expected one line of text",
    ),
    case(
        "backend URL with a newline",
        'backends:\n  evil: "file:///srv\\nx"\n',
        "backends.evil: expected one line of text",
    ),
    case(
        "default backend URL starting with --",
        "defaults:\n  backends: ['--x://y']\n",
        "defaults.backends: expected backend names or duplicity URLs",
    ),
    case(
        "libvirt URI starting with --",
        "libvirt:\n  uri: '--readonly'\n",
        "libvirt.uri: expected a libvirt URI",
    ),
    case(
        "libvirt URI with a line separator",
        'libvirt:\n  uri: "qemu:///system\\u2028x"\n',
        "libvirt.uri: expected a libvirt URI",
    ),
    # huge values
    case(
        "5000-digit integer",
        "defaults:\n  depth: " + "9" * 5000 + "\n",
        "a number with more digits than any setting takes",
    ),
    case(
        "depth beyond 64 bits",
        "defaults:\n  depth: 99999999999999999999999\n",
        "defaults.depth: expected an integer",
    ),
    case(
        "libvirt flags beyond 32 bits",
        "libvirt:\n  flags: 4294967296\n",
        "libvirt.flags: expected a non-negative integer",
    ),
    case(
        "full_every of 10^14 days",
        "defaults:\n  full_every: 99999999999999D\n",
        "defaults.full_every: expected an interval",
    ),
    case(
        "max_age of 10^12 years",
        "defaults:\n  max_age: 999999999999Y\n",
        "defaults.max_age: expected an interval",
    ),
    case(
        "stall_timeout of 10^19 seconds",
        "defaults:\n  stall_timeout: 9999999999999999999s\n",
        "defaults.stall_timeout: expected an interval",
    ),
    case(
        "1 MB description",
        "defaults:\n  description: " + "a" * 1_000_000 + "\n",
        "defaults.description: expected at most 4096 characters",
    ),
    case(
        "5000-digit time span",
        "randomized_delay: " + "9" * 5000 + "s\n",
        "randomized_delay: expected a systemd time span",
    ),
    # what reaches a unit file
    case(
        "randomized_delay with a newline",
        'randomized_delay: "10\\nExecStart=/bin/sh"\n',
        "randomized_delay: expected a systemd time span",
    ),
    case(
        "randomized_delay with a newline between number and unit",
        'randomized_delay: "10\\nmin"\n',
        "randomized_delay: expected a systemd time span",
    ),
    case(
        "randomized_delay with a tab",
        'randomized_delay: "10\\tmin"\n',
        "randomized_delay: expected a systemd time span",
    ),
    case(
        "randomized_delay with a % specifier",
        "randomized_delay: '%i'\n",
        "randomized_delay: expected a systemd time span",
    ),
    case(
        "default schedule with [Service]",
        'defaults:\n  schedule: "@daily\\n[Service]\\nExecStart=/bin/sh"\n',
        "defaults.schedule: expected one line of text",
    ),
    case(
        "description with [Service]",
        'defaults:\n  description: "x\\n[Service]\\nExecStart=/bin/sh"\n',
        "defaults.description: expected one line of text",
    ),
]


@pytest.mark.parametrize(("text", "message"), HOSTILE_CONFIGS)
def test_a_hostile_config_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    error = str(caught.value)
    assert error.startswith(f"{PATH}: ")
    assert message in error
    assert "\n" not in error
    assert len(error) <= MAX_LINE, error[:MAX_LINE]


@pytest.mark.parametrize(("text", "message"), HOSTILE_CONFIGS)
def test_check_config_says_it_in_one_line_and_changes_nothing(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "virt-dup.yml"
    config.write_text(text)
    before = config.read_bytes()

    assert cli.main(["--config", str(config), "check-config"]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"virt-dup: error: {config}: ")
    assert message in line
    assert "Traceback" not in captured.err and "internal error" not in captured.err
    assert config.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["virt-dup.yml"]


def test_a_merge_key_beside_an_explicit_key_is_no_duplicate() -> None:
    """YAML's ``<<:`` is not a repeated key: the explicit key wins, as YAML says."""
    config = parse_config("defaults: {<<: {depth: 1, full_retention: 3}, depth: 2}\n", PATH)
    assert (config.defaults.depth, config.defaults.full_retention) == (2, 3)


def test_a_normal_time_span_with_spaces_still_loads() -> None:
    assert parse_config("randomized_delay: 1h 30min\n", PATH).randomized_delay == "1h 30min"
