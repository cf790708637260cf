"""The duplicity adapter's pure parts: command lines, environment, parsers.

The samples are what duplicity 3.2.1 wrote in this repository's environment
(see the module docstring of virt_dup.duplicity for the log format).
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from virt_dup.config.options import interval_length
from virt_dup.duplicity import runner
from virt_dup.duplicity.arguments import (
    backup_arguments,
    cleanup_arguments,
    collection_status_arguments,
    list_files_arguments,
    remove_all_but_n_full_arguments,
    remove_all_inc_of_but_n_full_arguments,
    remove_older_than_arguments,
    restore_arguments,
)
from virt_dup.duplicity.collection import BackupSet, Chain, Collection, parse_collection_status
from virt_dup.duplicity.protocol import (
    ListedFile,
    LogRecord,
    backup_set_time,
    parse_backup_statistics,
    parse_listed_file,
    parse_log,
)
from virt_dup.duplicity.runner import find_executable, parse_version
from virt_dup.duplicity.target import Target, environment, secrets
from virt_dup.duplicity.times import parse_time
from virt_dup.errors import CommandError, ConfigError, VirtDupError

KEY = "B2C3AF48EC1B47697BDCF4AC3AD30341F7828B2E"
SECRET = "correct horse battery staple"
UUID = "0b5e3c9e-1f0a-4e43-9d55-3a1f3f4a2c11"
CACHE = Path("/var/cache/virt-dup") / UUID
COMMON = ("--archive-dir", os.fspath(CACHE), "--name", UUID)


def target(**changes: object) -> Target:
    values: dict[str, object] = {
        "url": "sftp://backup@nas.example/vm01",
        "archive_dir": CACHE,
        "name": UUID,
        "encrypt_keys": (KEY,),
        "gnupg_home": Path("/etc/virt-dup/gnupg"),
        "passphrase": SECRET,
    }
    values.update(changes)
    return Target(**values)  # type: ignore[arg-type]


# --- command lines -----------------------------------------------------------------


def test_backup_arguments_encrypted_incremental() -> None:
    arguments = backup_arguments(
        target(),
        full=False,
        source_root="/",
        include_paths=["/var/lib/libvirt/images/vm01.qcow2", "/var/lib/virt-dup/meta"],
        log_fd=7,
    )
    # virt-dup decides full or incremental (once) and says so: never "backup"
    # with --full-if-older-than, which would let duplicity decide again.
    assert arguments == (
        "incremental",
        *COMMON,
        "--encrypt-key",
        KEY,
        "--no-compression",
        "--max-blocksize",
        "4096",
        "--volsize",
        "200",
        "--verbosity",
        "info",
        "--log-fd",
        "7",
        "--include",
        "/var/lib/libvirt/images/vm01.qcow2",
        "--include",
        "/var/lib/virt-dup/meta",
        "--exclude",
        "**",
        "/",
        "sftp://backup@nas.example/vm01",
    )


def test_backup_arguments_full_unencrypted_with_compression() -> None:
    arguments = backup_arguments(
        target(encryption="none", encrypt_keys=(), compression=True, max_blocksize=None),
        full=True,
        source_root="/",
        include_paths=["/img/a.qcow2"],
    )
    assert arguments == (
        "full",
        *COMMON,
        "--no-encryption",
        "--volsize",
        "200",
        "--verbosity",
        "info",
        "--include",
        "/img/a.qcow2",
        "--exclude",
        "**",
        "/",
        "sftp://backup@nas.example/vm01",
    )


def test_every_encryption_key_and_the_sign_key() -> None:
    arguments = collection_status_arguments(
        target(encrypt_keys=("AAAA1111", "BBBB2222"), sign_key="CCCC3333")
    )
    assert arguments == (
        "collection-status",
        *COMMON,
        "--encrypt-key",
        "AAAA1111",
        "--encrypt-key",
        "BBBB2222",
        "--sign-key",
        "CCCC3333",
        "--no-compression",
        "sftp://backup@nas.example/vm01",
    )


@pytest.mark.parametrize(
    ("changes", "agent"),
    [
        ({"passphrase": None}, True),  # encrypt to keys; a restore's key is unprotected
        ({}, False),  # a passphrase for the secret key: handed over by loopback
        ({"passphrase": None, "sign_key": "CCCC3333"}, False),  # signing may need one
        ({"encrypt_keys": ()}, False),  # symmetric: the passphrase is the key
        ({"encryption": "none", "encrypt_keys": (), "passphrase": None}, False),
    ],
    ids=["keys-only", "key-passphrase", "signed", "symmetric", "unencrypted"],
)
def test_use_agent_only_when_gpg_needs_no_passphrase(
    changes: dict[str, object], agent: bool
) -> None:
    """--use-agent skips duplicity's loopback probe (a gpg start per process), and
    hands gpg no passphrase: only when there is none to hand over."""
    for arguments in (
        backup_arguments(target(**changes), False, "/", ["/img/a.qcow2"]),
        collection_status_arguments(target(**changes)),
        restore_arguments(target(**changes), None, None, Path("/srv/r")),
    ):
        assert ("--use-agent" in arguments) is agent


def test_glob_characters_in_paths_are_literal() -> None:
    arguments = backup_arguments(target(), False, "/", ["/img/vm[1]*?.qcow2"])
    assert arguments[arguments.index("--include") + 1] == "/img/vm[[]1][*][?].qcow2"


@pytest.mark.parametrize("path", ["relative.qcow2", "/img/../etc/shadow", "/other/x"])
def test_include_paths_must_be_absolute_and_under_the_root(path: str) -> None:
    with pytest.raises(ValueError, match="is not an absolute path under /img"):
        backup_arguments(target(), False, "/img", [path])


def test_a_backup_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one path"):
        backup_arguments(target(), False, "/", [])


def test_restore_arguments() -> None:
    when = datetime(2024, 1, 31, 3, 0, 5, tzinfo=UTC)
    assert restore_arguments(
        target(), when, "/var/lib/libvirt/images/vm01.qcow2", "/srv/restore/vm01.qcow2", 9
    ) == (
        "restore",
        *COMMON,
        "--encrypt-key",
        KEY,
        "--no-compression",
        "--time",
        "20240131T030005Z",
        "--path-to-restore",
        "var/lib/libvirt/images/vm01.qcow2",
        "--log-fd",
        "9",
        "sftp://backup@nas.example/vm01",
        "/srv/restore/vm01.qcow2",
    )
    assert restore_arguments(target(), None, None, Path("/srv/r"))[-2:] == (
        "sftp://backup@nas.example/vm01",
        "/srv/r",
    )


def test_list_files_and_retention_arguments() -> None:
    plain = target(encryption="none", encrypt_keys=(), passphrase=None)
    url = "sftp://backup@nas.example/vm01"
    base = (*COMMON, "--no-encryption", "--no-compression")
    assert list_files_arguments(plain, "20240131T030005Z") == (
        "list-current-files",
        *base,
        "--time",
        "20240131T030005Z",
        url,
    )
    assert remove_all_but_n_full_arguments(plain, 2) == (
        "remove-all-but-n-full",
        "2",
        "--force",
        *base,
        url,
    )
    assert remove_all_inc_of_but_n_full_arguments(plain, 1) == (
        "remove-all-inc-of-but-n-full",
        "1",
        "--force",
        *base,
        url,
    )
    assert remove_older_than_arguments(plain, "6M") == (
        "remove-older-than",
        "6M",
        "--force",
        *base,
        url,
    )
    with pytest.raises(ValueError):
        remove_all_but_n_full_arguments(plain, 0)


# --- secrets -------------------------------------------------------------------------


def all_arguments(job: Target) -> list[tuple[str, ...]]:
    return [
        backup_arguments(job, False, "/", ["/img/a.qcow2"], 3),
        collection_status_arguments(job, 3),
        restore_arguments(job, "20240131T030005Z", "img/a.qcow2", "/r", 3),
        list_files_arguments(job, None, 3),
        remove_all_but_n_full_arguments(job, 2, 3),
        remove_all_inc_of_but_n_full_arguments(job, 1, 3),
        remove_older_than_arguments(job, "6M", 3),
        cleanup_arguments(job, 3),
    ]


def test_passphrase_never_in_argv_only_in_the_environment() -> None:
    job = target(url="sftp://backup:s3cr3t-pw@nas.example:2222/vm01")
    for arguments in all_arguments(job):
        text = "\0".join(arguments)
        assert SECRET not in text
        assert "s3cr3t-pw" not in text
        assert arguments[-1] in ("sftp://backup@nas.example:2222/vm01", "/r")
    assert environment(job) == {
        "LC_ALL": "C.UTF-8",
        "GNUPGHOME": "/etc/virt-dup/gnupg",
        "PASSPHRASE": SECRET,
        "FTP_PASSWORD": "s3cr3t-pw",
    }
    assert secrets(job) == (SECRET, "s3cr3t-pw")
    assert SECRET not in repr(job)
    assert job.display_url == "sftp://backup:***@nas.example:2222/vm01"


def test_passphrase_is_set_even_when_empty_so_duplicity_never_prompts() -> None:
    job = target(passphrase=None, sign_key="CCCC3333")
    assert environment(job)["PASSPHRASE"] == ""
    assert environment(job)["SIGN_PASSPHRASE"] == ""
    assert "PASSPHRASE" not in environment(target(encryption="none", passphrase=None))


def test_gpg_without_key_or_passphrase_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no encryption key or passphrase"):
        target(encrypt_keys=(), passphrase=None)
    target(encrypt_keys=(), passphrase=SECRET)  # symmetric encryption
    with pytest.raises(ConfigError, match="encryption: expected one of gpg, none"):
        target(encryption="aes")
    with pytest.raises(ConfigError, match="multiple of 512"):
        target(max_blocksize=1000)


# --- version ----------------------------------------------------------------------------


def test_parse_version() -> None:
    assert parse_version("duplicity 3.2.1 September 28, 2024\n") == "3.2.1"
    assert parse_version("duplicity 3.0.0rc1\n") == "3.0.0rc1"
    with pytest.raises(VirtDupError, match=r"^duplicity 0.8.22 is not supported \(need 3.x\)$"):
        parse_version("duplicity 0.8.22\n")
    with pytest.raises(VirtDupError, match="cannot tell the duplicity version"):
        parse_version("Traceback (most recent call last):\n")


def test_missing_executable_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", os.fspath(tmp_path / "python3"))
    monkeypatch.setenv("PATH", os.fspath(tmp_path))
    with pytest.raises(VirtDupError, match=r"duplicity is not installed .*pip install"):
        find_executable()


def test_executable_next_to_the_interpreter_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    beside = tmp_path / "duplicity"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    monkeypatch.setattr(sys, "executable", os.fspath(tmp_path / "python3"))
    assert find_executable() == os.fspath(beside)


# --- parsers --------------------------------------------------------------------------

COLLECTION_LOG = """\
NOTICE 1
. Last full backup date: Thu Nov 26 11:44:49 2026

INFO 3\x20
backend BackendWrapper
archive-dir (. dir)
chain-no-sig 0
 full 20261126T114441Z 1 enc
 inc 20261126T114444Z 1 enc
chain-no-sig 1
 full 20261126T114445Z 1 enc
 inc 20261126T114447Z 2 enc
chain-complete
 full 20261126T114449Z 3 enc
orphaned-sets-num 0
incomplete-sets-num 1
. Collection Status
. -----------------
.\x20

NOTICE 1
. Duplicity backup complete.
"""


def test_parse_log_records() -> None:
    records = parse_log(COLLECTION_LOG)
    assert [(record.level, record.code) for record in records] == [
        ("NOTICE", 1),
        ("INFO", 3),
        ("NOTICE", 1),
    ]
    assert records[0] == LogRecord(
        "NOTICE", 1, (), "Last full backup date: Thu Nov 26 11:44:49 2026"
    )
    assert records[1].control[:2] == ("backend BackendWrapper", "archive-dir (. dir)")
    assert records[1].message == "Collection Status\n-----------------\n"


def time(text: str) -> datetime:
    return parse_time(text)


def test_parse_collection_status() -> None:
    record = parse_log(COLLECTION_LOG)[1]
    collection = parse_collection_status(record.control)
    full, inc = "full", "incremental"
    assert collection == Collection(
        chains=(
            Chain(
                (
                    BackupSet(full, time("20261126T114441Z"), 1, True),
                    BackupSet(inc, time("20261126T114444Z"), 1, True),
                ),
                complete=False,
            ),
            Chain(
                (
                    BackupSet(full, time("20261126T114445Z"), 1, True),
                    BackupSet(inc, time("20261126T114447Z"), 2, True),
                ),
                complete=False,
            ),
            Chain((BackupSet(full, time("20261126T114449Z"), 3, True),), complete=True),
        ),
        orphaned_sets=0,
        incomplete_sets=1,
    )
    assert collection.last_full_time == datetime(2026, 11, 26, 11, 44, 49, tzinfo=UTC)
    assert collection.chains[1].incrementals[0].id == "20261126T114447Z"
    assert [backup_set.id for backup_set in collection.backup_sets][:2] == [
        "20261126T114441Z",
        "20261126T114444Z",
    ]


def test_empty_collection() -> None:
    collection = parse_collection_status(
        [
            "",
            "backend BackendWrapper",
            "archive-dir (. dir)",
            "orphaned-sets-num 0",
            "incomplete-sets-num 0",
        ]
    )
    assert collection == Collection(chains=())
    assert collection.last_full_time is None


def test_an_unknown_collection_line_is_an_error_not_a_guess() -> None:
    with pytest.raises(CommandError, match="unexpected line 'chain-broken 2'"):
        parse_collection_status(["chain-broken 2"])


STATISTICS = """\
Last full backup date: none
--------------[ Backup Statistics ]--------------
StartTime 1795693145.40 (Thu Nov 26 11:39:05 2026)
EndTime 1795693145.41 (Thu Nov 26 11:39:05 2026)
ElapsedTime 0.01 (0.01 seconds)
SourceFiles 7
SourceFileSize 120486 (118 KB)
NewFiles 7
NewFileSize 120486 (118 KB)
DeletedFiles 0
ChangedFiles 0
ChangedFileSize 0 (0 bytes)
ChangedDeltaSize 0 (0 bytes)
DeltaEntries 7
RawDeltaSize 100006 (97.7 KB)
TotalDestinationSizeChange 100680 (98.3 KB)
Errors 0
-------------------------------------------------

Duplicity backup complete.
"""


def test_parse_backup_statistics() -> None:
    assert parse_backup_statistics(STATISTICS) == {
        "elapsed_seconds": 0.01,
        "source_files": 7,
        "bytes_read": 120486,
        "new_bytes": 120486,
        "changed_bytes": 0,
        "delta_entries": 7,
        "raw_delta_bytes": 100006,
        "bytes_uploaded": 100680,
        "errors": 0,
    }
    with pytest.raises(CommandError, match="no backup statistics"):
        parse_backup_statistics("Duplicity backup complete.\n")


def test_backup_set_time_from_volume_names() -> None:
    records = parse_log(
        "INFO 1\n. Writing duplicity-inc.20261126T113905Z.to.20261126T113909Z.vol1.difftar.gz\n\n"
    )
    assert backup_set_time(records) == time("20261126T113909Z")


def test_parse_listed_file_unescapes_the_path() -> None:
    record = parse_log("INFO 10 20261126T114444Z 'img/caf\\xe9 \\x27q\\x27.qcow2' reg\n")[0]
    assert parse_listed_file(record.control) == ListedFile(
        "img/café 'q'.qcow2", time("20261126T114444Z"), "reg"
    )


def test_parse_interval_like_duplicity() -> None:
    assert interval_length("30D") == timedelta(days=30)
    assert interval_length("1Y2M") == timedelta(days=365 + 60)
    assert interval_length("90s") == timedelta(seconds=90)
    with pytest.raises(ValueError):
        interval_length("30 days")


def test_failure_reason_from_the_error_record() -> None:
    gpg_error = parse_log(
        "ERROR 31 GPGError\n. GPGError: GPG Failed, see log below:\n"
        ". ===== Begin GnuPG log =====\n. gpg: DEADBEEF: skipped: No public key\n"
        ". gpg: [stdin]: encryption failed: No public key\n. ===== End GnuPG log =====\n. \n"
    )[0]
    assert runner._reason(gpg_error) == (
        "gpg: DEADBEEF: skipped: No public key; gpg: [stdin]: encryption failed: No public key"
    )


# --- a volume whose signature does not verify (exit 22) ------------------------------
@pytest.mark.parametrize(
    ("said", "meant"),
    [
        # duplicity 3.2.1 says "None" for no good signature and compares only as many
        # trailing digits as both ids have: 4 here.
        (
            "Volume was signed by key None, not 8B2E",
            f"a volume carries no valid signature (expected one by {KEY})",
        ),
        (
            "Volume was signed by key 076CC10442FB138E, not 3AD30341F7828B2E",
            f"a volume is signed by key 076CC10442FB138E, not by {KEY}",
        ),
        ("something else", "something else"),
    ],
)
def test_an_unverified_signature_in_words(said: str, meant: str) -> None:
    assert runner.signature_problem(said, KEY) == meant


def test_an_unsigned_volume_is_one_line_saying_the_signature_did_not_verify() -> None:
    from virt_dup.duplicity.protocol import LogRecord
    from virt_dup.execute import CommandFailed

    failure = CommandFailed(
        "duplicity restore ... exited 22",
        command="duplicity restore ...",
        returncode=22,
        stderr_tail=(),
    )
    record = LogRecord("ERROR", 22, (), "Volume was signed by key None, not 8B2E")
    message = runner._failure_message(target(sign_key=KEY), "restore from", failure, [record])
    assert message == (
        "duplicity restore from sftp://backup@nas.example/vm01: the signature did not "
        f"verify: a volume carries no valid signature (expected one by {KEY})"
    )
    error = CommandError(message)
    error.__cause__ = failure
    assert runner.signature_refused(error)
    assert not runner.restore_path_missing(error)
