"""Hostile-input corpus, manifests from a hostile backend: refused while reading.

Anyone with write access to a backend writes ``manifest.json``.  Each case
changes one thing in a valid manifest; :func:`parse_manifest` must refuse it
in one line naming where it came from, before a restore plans anything.
Path traversal in disk targets and file paths is covered by
tests/unit/backup/test_manifest.py (``test_a_disk_target_that_is_no_name_is_refused``,
``test_a_file_path_that_is_not_absolute_and_normalized_is_refused``); the
cases here are the other fields.  The restore of such files (symbolic links,
metadata files that are not regular files) is tested in
tests/unit/restore/test_hostile_restore.py and
tests/integration/test_hostile_restore.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from virt_dup.backup.manifest import parse_manifest
from virt_dup.errors import VirtDupError

WHERE = "backup 20260101T000000Z on file:///srv/b"
JOB_UUID = "0e1f2a3b-1111-4222-8333-444455556666"

VALID: dict[str, Any] = {
    "format": 1,
    "domain": {"name": "vm01", "uuid": "5e3c7d8a-9b0f-4c1d-a2e3-f40516273849"},
    "job": {"uuid": JOB_UUID, "xml": "<instance/>", "options": {}},
    "disks": [
        {
            "target": "vda",
            "top": "/i/vm.qcow2",
            "files": [
                {
                    "path": "/i/vm.qcow2",
                    "format": "qcow2",
                    "virtual_size": 1 << 30,
                    "backing_file": "base.qcow2",
                    "backing_format": "qcow2",
                    "actual_size": 10,
                    "selected": True,
                    "sha256": "cd" * 32,
                },
                {
                    "path": "/i/base.qcow2",
                    "format": "qcow2",
                    "virtual_size": 1 << 30,
                    "backing_file": None,
                    "backing_format": None,
                    "selected": False,
                },
            ],
        }
    ],
}


def top_file(**changes: object) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["disks"][0]["files"][0].update(changes)

    return change


def at(keys: tuple[str, ...], value: object) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        parent = data
        for key in keys[:-1]:
            parent = parent[key]
        parent[keys[-1]] = value

    return change


def case(case_id: str, change: Callable[[dict[str, Any]], None], message: str) -> object:
    return pytest.param(change, message, id=case_id)


def twice(data: dict[str, Any]) -> None:
    data["disks"].append(copy.deepcopy(data["disks"][0]))


def file_twice(data: dict[str, Any]) -> None:
    files = data["disks"][0]["files"]
    files.append(copy.deepcopy(files[0]))


HOSTILE_MANIFESTS = [
    # absurd sizes
    case("negative virtual size", top_file(virtual_size=-1), "virtual_size -1 is not a size"),
    case("virtual size of 10^40", top_file(virtual_size=10**40), "is not a size in bytes"),
    case(
        "virtual size of infinity", top_file(virtual_size=float("inf")), "virtual_size inf is not"
    ),
    case("virtual size NaN", top_file(virtual_size=float("nan")), "virtual_size nan is not"),
    case("virtual size as text", top_file(virtual_size="1024"), "virtual_size '1024' is not"),
    case("virtual size true", top_file(virtual_size=True), "virtual_size True is not"),
    case("virtual size 1.5", top_file(virtual_size=1.5), "virtual_size 1.5 is not"),
    case("4000-digit actual size", top_file(actual_size=int("9" * 4000)), "(4000 characters)"),
    # fields that reach qemu-img or a header
    case("format that is an option", top_file(format="--help"), "format '--help' is not"),
    case("format that is a JSON spec", top_file(format='{"driver":"nbd"}'), "is not an image"),
    case("format that is a mapping", top_file(format={"driver": "file"}), "is not an image"),
    case("backing format -f", top_file(backing_format="-f"), "backing_format '-f' is not"),
    case("backing file with a newline", top_file(backing_file="a\nb"), "backing_file 'a\\nb'"),
    case("backing file of 5000 bytes", top_file(backing_file="/" + "b" * 5000), "backing_file"),
    case("backing file as a list", top_file(backing_file=["/etc/shadow"]), "backing_file ["),
    # checksums
    case("checksum that is a path", top_file(sha256="../../etc/shadow"), "sha256 '../../"),
    case("checksum in upper case", top_file(sha256="CD" * 32), "is not 64 hex digits"),
    case("checksum as a list", top_file(sha256=["cd" * 32]), "is not 64 hex digits"),
    case("selected as text", top_file(selected="no"), "selected 'no' is not true or false"),
    # a manifest that does not match the volumes
    case("a disk twice", twice, "disk targets vda, vda: a disk is in it twice"),
    case("a file twice in a chain", file_twice, "disk vda: a file is in its chain twice"),
    case("a disk without files", at(("disks", 0, "files"), []), "files [] is not a list of files"),
    case("files as a mapping", at(("disks", 0, "files"), {"a": 1}), "is not a list of files"),
    case("disks as a mapping", at(("disks",), {"vda": {}}), "disks {'vda': {}} is not a list"),
    case("job options as a list", at(("job", "options"), [1]), "job options [1] are not"),
    # what messages show and caches are named after
    case(
        "domain name with [Service]",
        at(("domain", "name"), "vm\n[Service]\nExecStart=/bin/sh"),
        "domain name 'vm\\n[Service]",
    ),
    case("domain name of 1 MB", at(("domain", "name"), "n" * 2**20), "is not one line of text"),
    case("domain uuid not a UUID", at(("domain", "uuid"), "../../x"), "domain uuid '../../x'"),
    case("job uuid not a UUID", at(("job", "uuid"), "../" + JOB_UUID), "job uuid '../"),
]


@pytest.mark.parametrize(("change", "message"), HOSTILE_MANIFESTS)
def test_a_hostile_manifest_is_refused_in_one_line(
    change: Callable[[dict[str, Any]], None], message: str
) -> None:
    data = copy.deepcopy(VALID)
    change(data)
    with pytest.raises(VirtDupError) as caught:
        parse_manifest(json.dumps(data), WHERE)
    error = str(caught.value)
    assert error.startswith(f"{WHERE}: not a virt-dup manifest: ")
    assert message in error
    assert "\n" not in error and len(error) < 400, error[:400]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('{"format": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", id="nested"),
        pytest.param(
            json.dumps(VALID).replace(
                '"virtual_size": 1073741824', '"virtual_size": ' + "9" * 5000
            ),
            id="5000-digit size",
        ),
    ],
)
def test_json_that_python_cannot_hold_is_one_line(text: str) -> None:
    with pytest.raises(VirtDupError) as caught:
        parse_manifest(text, WHERE)
    assert str(caught.value).startswith(f"{WHERE}: not a virt-dup manifest: ")
    assert "\n" not in str(caught.value)


def test_the_valid_manifest_of_this_corpus_is_read() -> None:
    manifest = parse_manifest(json.dumps(VALID), WHERE)
    assert [entry.path for entry in manifest.disks[0].files] == ["/i/vm.qcow2", "/i/base.qcow2"]
