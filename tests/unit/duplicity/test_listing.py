"""A backend's files: sizes per backup set, encryption, job directories, file:// listings.

The pure parts are checked on hand-written listings in duplicity's file
names; ``list_backend`` on a ``file://`` directory in tmp_path (no duplicity
runs for that scheme).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virt_dup.duplicity.listing import (
    encrypted_on_backend,
    file_url_path,
    job_directories,
    list_backend,
    set_sizes,
    unencrypted_files,
)
from virt_dup.errors import CommandError

JOB = "0e1f2a3b-1111-4222-8333-444455556666"
FULL, INC, INC2 = "20261126T114449Z", "20261127T020000Z", "20261128T020000Z"


# -- sizes per backup set -------------------------------------------------------------------
def test_sizes_per_backup_set_from_the_backend_listing() -> None:
    full, inc = "20261126T114449Z", "20261127T020000Z"
    listing = {
        f"duplicity-full.{full}.vol1.difftar.gpg": 200,
        f"duplicity-full.{full}.vol2.difftar.gpg": 50,
        f"duplicity-full.{full}.manifest.gpg": 3,
        f"duplicity-full-signatures.{full}.sigtar.gpg": 7,
        f"duplicity-inc.{full}.to.{inc}.vol1.difftar.gpg": 20,
        f"duplicity-inc.{full}.to.{inc}.manifest.gpg": 1,
        f"duplicity-new-signatures.{full}.to.{inc}.sigtar.gpg": 2,
        "README": 5,
    }
    assert set_sizes(listing) == {("full", full): 260, ("incremental", inc): 23}
    assert set_sizes({**listing, f"duplicity-full.{full}.vol3.difftar.gpg": None}) == {
        ("full", full): None,
        ("incremental", inc): 23,
    }
    assert encrypted_on_backend(listing) is True
    assert encrypted_on_backend([f"duplicity-full.{full}.vol1.difftar.gz"]) is False
    assert encrypted_on_backend(["README"]) is None


def test_an_incremental_is_named_by_the_time_it_ends() -> None:
    listing = {
        f"duplicity-inc.{FULL}.to.{INC}.vol1.difftar.gz": 10,
        f"duplicity-inc.{INC}.to.{INC2}.vol1.difftar.gz": 4,
        f"duplicity-inc.{INC}.to.{INC2}.manifest": 1,
        f"duplicity-new-signatures.{INC}.to.{INC2}.sigtar.gz": 2,
    }
    assert set_sizes(listing) == {("incremental", INC): 10, ("incremental", INC2): 7}


@pytest.mark.parametrize("unknown_first", [True, False])
def test_one_file_of_unknown_size_makes_the_set_size_unknown(unknown_first: bool) -> None:
    unknown = (f"duplicity-full.{FULL}.vol1.difftar.gpg", None)
    known = [
        (f"duplicity-full.{FULL}.vol2.difftar.gpg", 100),
        (f"duplicity-full.{FULL}.manifest.gpg", 1),
    ]
    entries = [unknown, *known] if unknown_first else [*known, unknown]
    assert set_sizes(dict(entries)) == {("full", FULL): None}


def test_unencrypted_partial_and_zero_byte_files_count() -> None:
    listing = {
        f"duplicity-full.{FULL}.vol1.difftar": 30,
        f"duplicity-full.{FULL}.vol2.difftar.gz.part": 5,
        f"duplicity-full.{FULL}.manifest": 0,
        f"duplicity-full-signatures.{FULL}.sigtar.z": 2,
    }
    assert set_sizes(listing) == {("full", FULL): 37}


@pytest.mark.parametrize(
    "name",
    [
        "README",
        f"duplicity-full.{FULL}.vol1.difftar.gpg.sig",
        f"duplicity-full.{FULL}.vol1.tar.gpg",
        "duplicity-full.2026-11-26.vol1.difftar.gpg",
        f"duplicity-inc.{FULL}.vol1.difftar.gpg",
        f"x-duplicity-full.{FULL}.manifest",
        f"{JOB}",
    ],
)
def test_files_that_are_not_duplicity_sets_are_not_counted(name: str) -> None:
    assert set_sizes({name: 100}) == {}
    assert encrypted_on_backend([name]) is None


def test_encrypted_when_any_set_file_is_encrypted() -> None:
    assert encrypted_on_backend(iter([f"duplicity-full.{FULL}.manifest.gpg", "README"])) is True
    mixed = [f"duplicity-full.{FULL}.manifest.gpg", f"duplicity-inc.{FULL}.to.{INC}.manifest"]
    assert encrypted_on_backend(mixed) is True
    assert encrypted_on_backend([]) is None


# -- job directories -------------------------------------------------------------------------
def test_only_job_directories_are_jobs() -> None:
    assert job_directories([JOB, "lost+found", JOB.upper(), "notes.txt"]) == [JOB]


def test_job_directories_come_sorted() -> None:
    other = "00000000-1111-4222-8333-444455556666"
    assert job_directories([JOB, "README", other, f"{JOB}.old", JOB[:-1]]) == [other, JOB]
    assert job_directories([]) == []


# -- file:// URLs ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("file:///srv/backups", Path("/srv/backups")),
        (f"file:///srv/backups/{JOB}", Path(f"/srv/backups/{JOB}")),
        ("file://relative/dir", Path("relative/dir")),
        ("sftp://h//srv/backups", None),
        ("/srv/backups", None),
        ("FILE:///srv", None),
    ],
)
def test_file_url_path(url: str, path: Path | None) -> None:
    assert file_url_path(url) == path


def test_a_file_backend_lists_sizes_of_files_and_none_for_directories(tmp_path: Path) -> None:
    backend = tmp_path / "backups"
    (backend / JOB).mkdir(parents=True)
    (backend / "empty").mkdir()
    (backend / f"duplicity-full.{FULL}.manifest").write_bytes(b"x" * 123)
    (backend / "zero").write_bytes(b"")
    os.symlink(backend / "zero", backend / "link")

    listed = list_backend(f"file://{backend}")

    assert listed == {
        JOB: None,
        "empty": None,
        f"duplicity-full.{FULL}.manifest": 123,
        "zero": 0,
        "link": None,  # not a regular file: never followed
    }
    assert list_backend(f"file://{backend}/") == listed
    assert list_backend(f"file://{backend / JOB}") == {}


def test_a_missing_file_backend_lists_as_empty(tmp_path: Path) -> None:
    assert list_backend(f"file://{tmp_path / 'not-yet'}") == {}
    assert list_backend(f"file://{tmp_path / 'not-yet' / JOB}") == {}


def test_a_file_backend_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "backups"
    not_a_directory.write_text("")
    with pytest.raises(CommandError, match=f"cannot list {not_a_directory}: "):
        list_backend(f"file://{not_a_directory}")


def test_unencrypted_files_are_the_backup_files_without_gpg() -> None:
    # duplicity decides "encrypted" per file name, and checks signatures only
    # when it decrypts: a plain volume in an encrypted set is read unchecked.
    listing = [
        f"duplicity-full.{FULL}.manifest.gpg",
        f"duplicity-full.{FULL}.vol1.difftar.gpg",
        f"duplicity-full.{FULL}.vol2.difftar.gz",
        f"duplicity-full-signatures.{FULL}.sigtar.gpg",
        f"duplicity-inc.{FULL}.to.{INC}.vol1.difftar",
        f"duplicity-new-signatures.{FULL}.to.{INC}.sigtar.gz",
        "README",
        "lost+found",
    ]
    assert unencrypted_files(listing) == [
        f"duplicity-full.{FULL}.vol2.difftar.gz",
        f"duplicity-inc.{FULL}.to.{INC}.vol1.difftar",
        f"duplicity-new-signatures.{FULL}.to.{INC}.sigtar.gz",
    ]
    assert unencrypted_files(listing[:2]) == []
