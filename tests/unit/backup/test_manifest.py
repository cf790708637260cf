"""The metadata folder of a backup: reading ``manifest.json`` and writing the folder.

``parse_manifest`` must refuse, in one line naming the file, anything that is
not a manifest this virt-dup reads (a restore must never guess).  The round
trip writes the folder from a hand-made :class:`Plan` over small real files
and reads it back: every disk and chain file, which files the depth selected,
their real SHA-256, the domain XML and ``SHA256SUMS``, all mode 0600.
"""

from __future__ import annotations

import hashlib
import json
import socket
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from virt_dup.backup.manifest import (
    CHECKSUMS,
    DOMAIN_XML,
    MANIFEST,
    Manifest,
    ManifestDisk,
    ManifestFile,
    parse_manifest,
    write_metadata,
)
from virt_dup.backup.plan import DiskPlan, Plan
from virt_dup.config.options import JobOptions
from virt_dup.duplicity.target import Target
from virt_dup.errors import NotFoundError, VirtDupError
from virt_dup.images.chain import ChainFile
from virt_dup.libvirt.metadata import DiskSelector, Job, parse_instance_text

JOB_UUID = "0e1f2a3b-1111-4222-8333-444455556666"
DOMAIN_UUID = "5e3c7d8a-9b0f-4c1d-a2e3-f40516273849"
WHERE = "/var/lib/virt-dup/metadata/x/manifest.json"


def manifest_data() -> dict[str, Any]:
    return {
        "format": 1,
        "virt_dup_version": "0.1.0",
        "created": "2026-11-26T11:44:49+00:00",
        "host": "h1",
        "full": False,
        "domain": {"name": "vm01", "uuid": DOMAIN_UUID},
        "job": {"uuid": JOB_UUID, "xml": "<instance/>", "options": {"backends": ["local"]}},
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
                        "format": "raw",
                        "virtual_size": 1 << 30,
                        "backing_file": None,
                        "backing_format": None,
                        "actual_size": 10,
                        "selected": False,
                    },
                ],
            },
            {
                "target": "vdb",
                "top": "/i/data.qcow2",
                "files": [
                    {
                        "path": "/i/data.qcow2",
                        "format": "qcow2",
                        "virtual_size": 4096,
                        "selected": True,
                        "sha256": "ef" * 32,
                    }
                ],
            },
        ],
    }


# -- reading ------------------------------------------------------------------------------
def test_a_good_manifest_reads_into_typed_objects() -> None:
    manifest = parse_manifest(json.dumps(manifest_data()), WHERE)

    assert manifest == Manifest(
        domain_name="vm01",
        domain_uuid=DOMAIN_UUID,
        job_uuid=JOB_UUID,
        created="2026-11-26T11:44:49+00:00",
        full=False,
        host="h1",
        disks=(
            ManifestDisk(
                target="vda",
                top="/i/vm.qcow2",
                files=(
                    ManifestFile(
                        "/i/vm.qcow2", "qcow2", 1 << 30, "base.qcow2", "qcow2", True, "cd" * 32, 10
                    ),
                    ManifestFile("/i/base.qcow2", "raw", 1 << 30, None, None, False, None, 10),
                ),
            ),
            ManifestDisk(
                target="vdb",
                top="/i/data.qcow2",
                files=(ManifestFile("/i/data.qcow2", "qcow2", 4096, None, None, True, "ef" * 32),),
            ),
        ),
        options={"backends": ["local"]},
        job_xml="<instance/>",
        virt_dup_version="0.1.0",
    )
    assert [entry.path for entry in manifest.disks[0].selected] == ["/i/vm.qcow2"]
    # what is read, written again, reads the same
    assert parse_manifest(json.dumps(manifest.as_json()), WHERE) == manifest


def test_optional_keys_may_be_missing() -> None:
    data = manifest_data()
    for key in ("created", "host", "full"):
        del data[key]
    del data["job"]["options"]
    manifest = parse_manifest(json.dumps(data), WHERE)
    assert (manifest.created, manifest.host, manifest.full, manifest.options) == ("", "", False, {})


@pytest.mark.parametrize("number", [0, 2, "1", 1.5, None])
def test_another_manifest_format_is_refused(number: object) -> None:
    data = manifest_data()
    data["format"] = number
    with pytest.raises(VirtDupError) as caught:
        parse_manifest(json.dumps(data), WHERE)
    assert str(caught.value) == (
        f"{WHERE}: manifest format {number!r}, this virt-dup reads format 1"
    )


def test_a_manifest_without_format_is_refused() -> None:
    data = manifest_data()
    del data["format"]
    with pytest.raises(VirtDupError, match="manifest format None"):
        parse_manifest(json.dumps(data), WHERE)


def _without(path: tuple[str | int, ...]) -> str:
    data = manifest_data()
    parent: Any = data
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return json.dumps(data)


@pytest.mark.parametrize(
    "text",
    [
        _without(("domain",)),
        _without(("domain", "uuid")),
        _without(("job",)),
        _without(("job", "uuid")),
        _without(("disks",)),
        _without(("disks", 0, "top")),
        _without(("disks", 1, "files", 0, "path")),
        _without(("disks", 0, "files", 1, "selected")),
        _without(("disks", 0, "files", 0, "virtual_size")),
        json.dumps({**manifest_data(), "disks": [{"target": "vda", "top": "/i", "files": 5}]}),
        json.dumps({**manifest_data(), "domain": "vm01"}),
    ],
)
def test_a_manifest_with_missing_or_mistyped_keys_is_refused(text: str) -> None:
    with pytest.raises(VirtDupError) as caught:
        parse_manifest(text, WHERE)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: not a virt-dup manifest: ")
    assert "\n" not in message


@pytest.mark.parametrize("text", ["", "{", "not json at all", "[]", "null", '"manifest"', "1"])
def test_text_that_is_no_json_object_is_one_line_naming_where(text: str) -> None:
    with pytest.raises(VirtDupError) as caught:
        parse_manifest(text, WHERE)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: ")
    assert "\n" not in message


def test_a_disk_is_found_by_its_target_dev() -> None:
    manifest = parse_manifest(json.dumps(manifest_data()), WHERE)
    assert manifest.disk("vdb").top == "/i/data.qcow2"
    with pytest.raises(NotFoundError) as caught:
        manifest.disk("vdc")
    assert str(caught.value) == "the backup of domain vm01 has no disk vdc (it has vda, vdb)"


# -- writing --------------------------------------------------------------------------------
def image(path: Path, content: bytes, backing: Path | None) -> ChainFile:
    path.write_bytes(content)
    return ChainFile(
        path=str(path),
        format="qcow2",
        virtual_size=len(content) * 1024,
        backing_file=backing.name if backing else None,
        backing_format="qcow2" if backing else None,
        actual_size=len(content),
    )


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def plan(tmp_path: Path) -> Plan:
    """vda: top <- middle <- base, depth 2 selects top and middle; vdb: one image."""
    images = tmp_path / "images"
    images.mkdir()
    base = image(images / "base.qcow2", b"base " * 1000, None)
    middle = image(images / "middle.qcow2", b"middle " * 700, images / "base.qcow2")
    top = image(images / "vm01.qcow2", b"top " * 300, images / "middle.qcow2")
    data = image(images / "data.qcow2", b"\x00\x01data" * 50, None)
    job = Job(
        uuid=JOB_UUID,
        domain_name="vm01",
        domain_uuid=DOMAIN_UUID,
        disks=DiskSelector(devs=("vda", "vdb")),
        options=JobOptions(depth=2, backends=("local",)),
    )
    return Plan(
        job=job,
        options=job.options.over(JobOptions(encryption="none", full_retention=2)),
        domain_running=True,
        disks=(
            DiskPlan("vda", (top, middle, base), (top, middle), str(images / "vm01.overlay")),
            DiskPlan("vdb", (data,), (data,), str(images / "data.overlay")),
        ),
        backend_url="file:///srv/backups",
        full=True,
        target=Target(
            url=f"file:///srv/backups/{JOB_UUID}",
            archive_dir=tmp_path / "cache",
            name=JOB_UUID,
            encryption="none",
        ),
    )


DOMAIN_DEFINITION = "<domain type='kvm'><name>vm01</name></domain>"


def test_the_written_manifest_reads_back_as_the_plan(tmp_path: Path, plan: Plan) -> None:
    folder = tmp_path / "metadata" / JOB_UUID
    before = datetime.now(UTC)

    write_metadata(folder, plan, DOMAIN_DEFINITION)

    manifest = parse_manifest((folder / MANIFEST).read_text(), str(folder / MANIFEST))
    assert (manifest.domain_name, manifest.domain_uuid, manifest.job_uuid) == (
        "vm01",
        DOMAIN_UUID,
        JOB_UUID,
    )
    assert manifest.full is True
    assert manifest.host == socket.gethostname()
    created = datetime.fromisoformat(manifest.created)
    assert before - timedelta(seconds=1) <= created <= datetime.now(UTC)
    assert manifest.options == {
        "depth": 2,
        "backends": ["local"],
        "encryption": "none",
        "full_retention": 2,
    }
    assert [disk.target for disk in manifest.disks] == ["vda", "vdb"]
    for written, planned in zip(manifest.disks, plan.disks, strict=True):
        assert written.top == planned.original_top
        assert [entry.path for entry in written.files] == [f.path for f in planned.chain]
        assert [entry.path for entry in written.selected] == [f.path for f in planned.selected]
        for entry, chain_file in zip(written.files, planned.chain, strict=True):
            assert (entry.format, entry.virtual_size) == (
                chain_file.format,
                chain_file.virtual_size,
            )
            assert (entry.backing_file, entry.backing_format) == (
                chain_file.backing_file,
                chain_file.backing_format,
            )
            # the real checksum of every selected file, none for the others
            assert entry.sha256 == (sha256(entry.path) if entry.selected else None)
    base = manifest.disk("vda").files[2]
    assert (base.selected, base.backing_file) == (False, None)


def test_the_job_is_recorded_as_its_xml(tmp_path: Path, plan: Plan) -> None:
    write_metadata(tmp_path / "m", plan, DOMAIN_DEFINITION)
    data = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert data["format"] == 1
    (job,) = parse_instance_text(data["job"]["xml"], "vm01", DOMAIN_UUID)
    assert job == plan.job


def test_domain_xml_and_checksums_are_written_beside_it(tmp_path: Path, plan: Plan) -> None:
    folder = tmp_path / "metadata" / JOB_UUID

    write_metadata(folder, plan, DOMAIN_DEFINITION)

    assert (folder / DOMAIN_XML).read_text() == DOMAIN_DEFINITION
    selected = [f.path for disk in plan.disks for f in disk.selected]
    lines = (folder / CHECKSUMS).read_text().splitlines()
    # sha256sum's format: "DIGEST  PATH", one line per backed-up file
    assert lines == [f"{sha256(path)}  {path}" for path in selected]
    assert {entry.name for entry in folder.iterdir()} == {MANIFEST, DOMAIN_XML, CHECKSUMS}
    for name in (MANIFEST, DOMAIN_XML, CHECKSUMS):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_writing_again_replaces_the_folder_contents(tmp_path: Path, plan: Plan) -> None:
    folder = tmp_path / "m"
    write_metadata(folder, plan, "<domain>old</domain>")
    Path(plan.disks[1].chain[0].path).write_bytes(b"changed since")

    write_metadata(folder, plan, DOMAIN_DEFINITION)

    manifest = parse_manifest((folder / MANIFEST).read_text(), "m")
    data_file = manifest.disk("vdb").files[0]
    assert data_file.sha256 == hashlib.sha256(b"changed since").hexdigest()
    assert (folder / DOMAIN_XML).read_text() == DOMAIN_DEFINITION
    assert {entry.name for entry in folder.iterdir()} == {MANIFEST, DOMAIN_XML, CHECKSUMS}


# -- a backend is not trusted to name paths ------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["../../../etc/cron.d", "/etc/cron.d", "vda/../x", "..", "", "a" * 65, "vd\x00a", "vd a"],
)
def test_a_disk_target_that_is_no_name_is_refused(target: str) -> None:
    data = manifest_data()
    data["disks"][0]["target"] = target
    with pytest.raises(VirtDupError, match="is not a name") as caught:
        parse_manifest(json.dumps(data), WHERE)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "path",
    [
        "vm.qcow2",
        "../vm.qcow2",
        "/i/../etc/cron.d/x",
        "/i/./vm.qcow2",
        "/i/vm.qcow2/",
        "/i/vm\x00.qcow2",
        "/i/" + "x" * 256,
        "/" + "d/" * 2100 + "x",
        "/",
    ],
)
@pytest.mark.parametrize("key", ["path", "backed_up_as"])
def test_a_file_path_that_is_not_absolute_and_normalized_is_refused(path: str, key: str) -> None:
    data = manifest_data()
    data["disks"][0]["files"][0][key] = path
    with pytest.raises(VirtDupError, match="is not an absolute, normalized file path"):
        parse_manifest(json.dumps(data), WHERE)
