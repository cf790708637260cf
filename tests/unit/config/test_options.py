"""Job options: each value parser, the OPTIONS table, inheritance and parse_options.

The same parsers read XML attributes (text), virt-dup.yml (native YAML types)
and add-job flags, so each one is checked with both spellings of a value, and
every refusal must name ``where`` (the file and key the user has to fix).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

import pytest

from virt_dup.config.options import (
    BUILTIN_DEFAULTS,
    LEGACY_NAMES,
    OPTIONS,
    OPTIONS_BY_NAME,
    JobOptions,
    format_value,
    interval_length,
    parse_backends,
    parse_boolean,
    parse_count,
    parse_integer,
    parse_interval,
    parse_key_ids,
    parse_options,
    parse_schedule,
    parse_text,
)
from virt_dup.errors import ConfigError

WHERE = "virt-dup.yml: defaults.x"
FINGERPRINT = "0123456789ABCDEF0123456789ABCDEF01234567"


def refusal(parse: Callable[[object, str], object], value: object) -> str:
    """The message ``parse`` refuses ``value`` with (it must name WHERE, on one line)."""
    with pytest.raises(ConfigError) as caught:
        parse(value, WHERE)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: ")
    assert "\n" not in message
    return message


# -- integers and counts -------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"), [(3, 3), (-1, -1), (0, 0), ("-1", -1), ("+2", 2), (" 7 ", 7)]
)
def test_integers_from_yaml_and_from_text(value: object, expected: int) -> None:
    assert parse_integer(value, WHERE) == expected


@pytest.mark.parametrize("value", [True, False, "1.5", 1.5, "", "ten", "1e3", None, [1]])
def test_not_an_integer(value: object) -> None:
    assert "expected an integer" in refusal(parse_integer, value)


def test_counts_start_at_one() -> None:
    assert parse_count(1, WHERE) == 1
    assert parse_count("12", WHERE) == 12
    assert "a whole number of at least 1" in refusal(parse_count, 0)
    assert "a whole number of at least 1" in refusal(parse_count, "-3")
    assert "expected an integer" in refusal(parse_count, "two")


# -- booleans and text -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("Yes", True),
        ("1", True),
        ("on", True),
        (1, True),
        ("false", False),
        (" NO ", False),
        ("0", False),
        ("off", False),
        (0, False),
    ],
)
def test_booleans_in_every_spelling(value: object, expected: bool) -> None:
    assert parse_boolean(value, WHERE) is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, "truee"])
def test_not_a_boolean(value: object) -> None:
    assert "expected true or false" in refusal(parse_boolean, value)


def test_text_is_kept_as_written() -> None:
    assert parse_text("nightly backup of the mail server", WHERE) == (
        "nightly backup of the mail server"
    )
    assert parse_text(42, WHERE) == "42"
    assert parse_text("ünïcode ok", WHERE) == "ünïcode ok"


@pytest.mark.parametrize("value", ["two\nlines", "tab\there", "carriage\r", "del\x7f", "nul\x00"])
def test_text_with_control_characters_is_refused(value: str) -> None:
    """Text can end up in a unit file: a newline there would add a directive."""
    assert "without control characters" in refusal(parse_text, value)


@pytest.mark.parametrize("value", [None, True, ["a"], {"a": 1}])
def test_values_that_are_not_text(value: object) -> None:
    assert "expected text" in refusal(parse_text, value)


# -- schedules -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0 2 * * *", "0 2 * * *"),
        ("*/15 8-18 * * mon-fri", "*/15 8-18 * * mon-fri"),
        ("  @daily ", "@daily"),
        ("@reboot", "@reboot"),
        ("0\t2  *\t* *", "0 2 * * *"),  # cron also separates fields with tabs
        ("0 0 29 2 *", "0 0 29 2 *"),  # leap years exist
    ],
)
def test_cron_schedules_are_accepted(value: str, expected: str) -> None:
    assert parse_schedule(value, WHERE) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0 0 30 2 *", "day 30 does not exist in February"),
        ("0 0 31 4 *", "day 31 does not exist in April"),
        ("61 * * * *", "61 is out of range 0-59"),
        ("0 2 * *", "expected 5 fields"),
        ("", "empty schedule"),
        ("@Daily", "unknown @ word"),
        ("0 2 * * *\n0 3 * * *", "control characters"),
    ],
)
def test_impossible_or_malformed_schedules_name_where(value: str, reason: str) -> None:
    message = refusal(parse_schedule, value)
    assert reason in message


def test_an_impossible_date_says_it_never_runs() -> None:
    message = refusal(parse_schedule, "0 0 30 2 *")
    assert message.startswith(f"{WHERE}: invalid schedule '0 0 30 2 *'")
    assert "never runs" in message


# -- intervals -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "length"),
    [
        ("30D", timedelta(days=30)),
        ("2W", timedelta(days=14)),
        ("6M", timedelta(days=180)),  # duplicity's month is 30 days
        ("1Y", timedelta(days=365)),
        ("1Y2M", timedelta(days=365 + 60)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("90s", timedelta(seconds=90)),
    ],
)
def test_interval_lengths_as_duplicity_counts_them(text: str, length: timedelta) -> None:
    assert interval_length(text) == length


@pytest.mark.parametrize("text", ["30 days", "", "5", "D", "30d", "1Y 2M", "1Y2", "-1D", "30D "])
def test_not_an_interval(text: str) -> None:
    with pytest.raises(ValueError, match="is not an interval"):
        interval_length(text)


def test_parse_interval_keeps_the_text_and_names_where() -> None:
    assert parse_interval("1Y2M", WHERE) == "1Y2M"
    assert parse_interval(" 30D ", WHERE) == "30D"
    for bad in ("30 days", "", "5"):
        assert "expected an interval such as 30D" in refusal(parse_interval, bad)


# -- lists: backends and keys ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("local", ("local",)),
        ("local, sftp://backup@h//srv/vd", ("local", "sftp://backup@h//srv/vd")),
        (["offsite", "file:///srv/backups"], ("offsite", "file:///srv/backups")),
        ("b2.eu-1_x", ("b2.eu-1_x",)),
    ],
)
def test_backends_are_names_or_urls(value: object, expected: tuple[str, ...]) -> None:
    assert parse_backends(value, WHERE) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "a non-empty comma-separated list"),
        ("local,,offsite", "a non-empty comma-separated list"),
        ([], "a non-empty comma-separated list"),
        ("my backend", "backend names or duplicity URLs"),
        ("-local", "backend names or duplicity URLs"),
        ("/srv/backups", "backend names or duplicity URLs"),
        ("file://", "backend names or duplicity URLs"),
    ],
)
def test_bad_backends(value: object, message: str) -> None:
    assert message in refusal(parse_backends, value)


def test_key_ids_are_normalised_to_upper_case_without_0x() -> None:
    assert parse_key_ids("0xdeadbeef", WHERE) == ("DEADBEEF",)
    assert parse_key_ids("0123456789abcdef", WHERE) == ("0123456789ABCDEF",)
    assert parse_key_ids([FINGERPRINT.lower(), "0xAAAAAAAA"], WHERE) == (FINGERPRINT, "AAAAAAAA")
    assert parse_key_ids(f"{FINGERPRINT}, AAAAAAAA", WHERE) == (FINGERPRINT, "AAAAAAAA")


@pytest.mark.parametrize("value", ["DEADBEE", "0123456789AB", "nothexxx", "0XDEADBEEF", ""])
def test_bad_key_ids(value: str) -> None:
    refusal(parse_key_ids, value)


# -- the table ----------------------------------------------------------------------------------
def test_every_option_is_documented_with_a_valid_example() -> None:
    for option in OPTIONS:
        assert option.description.strip(), option.name
        assert option.description.endswith("."), option.name
        assert option.metavar, option.name
        option.parse(option.example, f"example of {option.name}")


def test_option_names_and_flags_are_unique_and_well_formed() -> None:
    names = [option.name for option in OPTIONS]
    assert len(names) == len(set(names))
    assert not set(LEGACY_NAMES) & set(names)
    assert set(OPTIONS_BY_NAME) == set(names)
    flags = [option.command_line_flag for option in OPTIONS]
    assert len(flags) == len(set(flags))
    for flag in flags:
        assert re.fullmatch(r"--[a-z]+(-[a-z]+)*", flag), flag
    assert OPTIONS_BY_NAME["full_every"].command_line_flag == "--full-every"
    # lists take one value per flag, so their flag is singular
    assert OPTIONS_BY_NAME["backends"].command_line_flag == "--backend"
    assert OPTIONS_BY_NAME["encryption_keys"].command_line_flag == "--encryption-key"
    assert {option.name for option in OPTIONS if option.repeatable} == {
        "backends",
        "encryption_keys",
    }


def test_what_is_written_to_xml_reads_back_the_same() -> None:
    for option in OPTIONS:
        value = option.parse(option.example, option.name)
        assert option.parse(format_value(value), option.name) == value, option.name
    assert format_value(False) == "false"
    assert format_value(("local", "file:///b")) == "local,file:///b"


# -- inheritance --------------------------------------------------------------------------------
def test_set_values_are_the_set_options_in_table_order() -> None:
    options = JobOptions(description="x", depth=0, schedule="@daily", disable_if_powered_off=False)
    assert list(options.set_values().items()) == [
        ("schedule", "@daily"),
        ("depth", 0),
        ("disable_if_powered_off", False),
        ("description", "x"),
    ]
    assert JobOptions().set_values() == {}


def test_a_job_overrides_the_defaults_and_inherits_the_rest() -> None:
    defaults = JobOptions(schedule="0 2 * * *", depth=-1, backends=("local",), quiesce="auto")
    job = JobOptions(depth=0, backends=("offsite",), disable_if_powered_off=False)

    effective = job.over(defaults)

    assert effective.depth == 0  # set to a falsy value, still set
    assert effective.backends == ("offsite",)
    assert effective.disable_if_powered_off is False
    assert effective.schedule == "0 2 * * *"
    assert effective.quiesce == "auto"
    assert effective.full_every is None  # set nowhere
    assert JobOptions().over(defaults) == defaults


def test_builtin_defaults_fill_what_virt_dup_yml_leaves_out() -> None:
    effective = JobOptions(full_retention=5).over(BUILTIN_DEFAULTS)
    assert effective.full_retention == 5
    assert (effective.encryption, effective.full_every, effective.quiesce) == ("gpg", "30D", "auto")


# -- parse_options -------------------------------------------------------------------------------
def test_parse_options_reads_a_mapping_of_text() -> None:
    parsed = parse_options(
        {
            "schedule": "0 2 * * *",
            "depth": "-1",
            "backends": "local,file:///srv/b",
            "encryption_keys": "0xdeadbeef",
            "full_retention": "3",
            "disable_if_powered_off": "yes",
            "quiesce": "Required",
            "max_age": "6M",
        },
        "vm01.xml: job 1",
    )
    assert parsed.notices == ()
    assert parsed.options == JobOptions(
        schedule="0 2 * * *",
        depth=-1,
        backends=("local", "file:///srv/b"),
        encryption_keys=("DEADBEEF",),
        full_retention=3,
        disable_if_powered_off=True,
        quiesce="required",
        max_age="6M",
    )


def test_a_typo_in_an_option_name_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_options({"schedul": "0 2 * * *"}, "vm01.xml: job 1")
    message = str(caught.value)
    assert message.startswith("vm01.xml: job 1.schedul: unknown option; expected one of ")
    assert "schedule" in message and "full_retention" in message


def test_a_bad_value_names_the_place_and_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^vm01\.xml: job 1\.full_every: expected an interval"):
        parse_options({"full_every": "monthly"}, "vm01.xml: job 1")


def test_a_legacy_name_still_works_with_a_notice_and_loses_to_the_new_one() -> None:
    old = parse_options({"incremental_schedule": "@daily"}, "job 1")
    assert old.options.schedule == "@daily"
    assert old.notices == ("job 1.incremental_schedule is deprecated; it means schedule",)
    for both in (
        {"incremental_schedule": "@daily", "schedule": "@hourly"},
        {"schedule": "@hourly", "incremental_schedule": "@daily"},
    ):
        assert parse_options(both, "job 1").options.schedule == "@hourly"
