"""The pure parts of backups and restore: manifests, backend listings, where files go,
what their headers name afterwards, and how ``--define`` names the domain."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from virt_dup.actions.restore import RestoreRequest, decide_definition
from virt_dup.backup.manifest import ManifestDisk, ManifestFile, parse_manifest
from virt_dup.cli.output import format_size
from virt_dup.duplicity.collection import BackupSet, Chain, Collection
from virt_dup.duplicity.protocol import ListedFile
from virt_dup.duplicity.times import parse_time
from virt_dup.errors import NotFoundError, UsageError, VirtDupError
from virt_dup.restore.plan import (
    RestoreError,
    backing_reference,
    bases_needed,
    choose_disks,
    original_destinations,
    parse_backing_options,
    plan_restore,
    target_dir_destinations,
)
from virt_dup.restore.sources import choose_backup, metadata_folder_in

JOB = "0e1f2a3b-1111-4222-8333-444455556666"
IMAGES = "/var/lib/libvirt/images"


def chain_file(
    path: str, backing: str | None, selected: bool = True, size: int = 1 << 30
) -> ManifestFile:
    return ManifestFile(
        path=path,
        format="qcow2",
        virtual_size=size,
        backing_file=backing,
        backing_format="qcow2" if backing else None,
        selected=selected,
        sha256=("ab" * 32) if selected else None,
    )


def disk(target: str, *files: ManifestFile) -> ManifestDisk:
    return ManifestDisk(target=target, top=files[0].path, files=files)


VDA = disk(
    "vda",
    chain_file(f"{IMAGES}/vm01/vm.qcow2", f"{IMAGES}/vm01/base.qcow2"),
    chain_file(f"{IMAGES}/vm01/base.qcow2", None),
)


# -- manifests -------------------------------------------------------------------
def manifest_text(**changes: object) -> str:
    data = {
        "format": 1,
        "created": "2026-11-26T11:44:49+00:00",
        "host": "h1",
        "full": True,
        "domain": {"name": "vm01", "uuid": "5e3c7d8a-9b0f-4c1d-a2e3-f40516273849"},
        "job": {"uuid": JOB, "xml": "<x/>", "options": {"depth": -1}},
        "disks": [
            {
                "target": "vda",
                "top": "/i/vm.qcow2",
                "files": [
                    {
                        "path": "/i/vm.qcow2",
                        "format": "qcow2",
                        "virtual_size": 1024,
                        "backing_file": "base.qcow2",
                        "backing_format": "qcow2",
                        "actual_size": 10,
                        "selected": True,
                        "sha256": "cd" * 32,
                    },
                    {
                        "path": "/i/base.qcow2",
                        "format": "qcow2",
                        "virtual_size": 1024,
                        "backing_file": None,
                        "backing_format": None,
                        "actual_size": 10,
                        "selected": False,
                    },
                ],
            }
        ],
    }
    data.update(changes)
    return json.dumps(data)


def test_a_manifest_as_run_writes_it() -> None:
    manifest = parse_manifest(manifest_text(), "m")

    assert (manifest.domain_name, manifest.job_uuid, manifest.full) == ("vm01", JOB, True)
    (vda,) = manifest.disks
    assert [entry.path for entry in vda.selected] == ["/i/vm.qcow2"]
    assert vda.files[0].backing_file == "base.qcow2"
    assert vda.files[1].sha256 is None
    assert manifest.options == {"depth": -1}
    assert manifest.disk("vda") is vda
    with pytest.raises(NotFoundError, match="no disk vdb"):
        manifest.disk("vdb")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (manifest_text(format=2), "manifest format 2"),
        (manifest_text(disks=[{"target": "vda"}]), "not a virt-dup manifest"),
        ("{", "not a virt-dup manifest"),
        ("[]", "not a virt-dup manifest"),
    ],
)
def test_a_manifest_this_virt_dup_cannot_read_is_refused(text: str, message: str) -> None:
    with pytest.raises(VirtDupError, match=message):
        parse_manifest(text, "m")


def test_the_metadata_folder_is_found_wherever_the_state_dir_was() -> None:
    listed = [
        ListedFile("var/lib/libvirt/images/vm.qcow2", datetime.now(UTC), "reg"),
        ListedFile(f"srv/state/metadata/{JOB}", datetime.now(UTC), "dir"),
        ListedFile(f"srv/state/metadata/{JOB}/manifest.json", datetime.now(UTC), "reg"),
    ]
    assert metadata_folder_in(listed, JOB) == f"/srv/state/metadata/{JOB}"
    assert metadata_folder_in(listed[:2], JOB) is None
    assert metadata_folder_in(listed, "11111111-2222-4333-8444-555555555555") is None


# -- listings of backups ----------------------------------------------------------------
def test_sizes_read_well() -> None:
    assert [format_size(size) for size in (None, 512, 452710, 5 << 30)] == [
        "-",
        "512B",
        "453kB",
        "5.37GB",
    ]


def test_the_latest_or_the_named_backup() -> None:
    def backup_set(kind: str, text: str) -> BackupSet:
        return BackupSet(kind, parse_time(text), 1, True)

    older = Chain((backup_set("full", "20261101T020000Z"),), complete=False)
    newer = Chain(
        (backup_set("full", "20261120T020000Z"), backup_set("incremental", "20261121T020000Z")),
        complete=True,
    )
    status = Collection((older, newer))

    assert choose_backup(status, None).id == "20261121T020000Z"
    assert choose_backup(status, "20261101T020000Z").kind == "full"
    with pytest.raises(NotFoundError, match="no backup 20261102T020000Z"):
        choose_backup(status, "20261102T020000Z")
    with pytest.raises(NotFoundError, match="no backups yet"):
        choose_backup(Collection(()), None)


# -- where restored files go ----------------------------------------------------------
def test_target_dir_layout_is_one_directory_per_disk() -> None:
    vdb = disk(
        "vdb",
        chain_file("/data/a/disk.qcow2", "/data/b/disk.qcow2"),
        chain_file("/data/b/disk.qcow2", f"{IMAGES}/vm01/base.qcow2"),
        chain_file(f"{IMAGES}/vm01/base.qcow2", None),  # shared with vda: restored once
    )
    assert target_dir_destinations([VDA, vdb], "/restore") == {
        f"{IMAGES}/vm01/vm.qcow2": "/restore/vda/vm.qcow2",
        f"{IMAGES}/vm01/base.qcow2": "/restore/vda/base.qcow2",
        "/data/a/disk.qcow2": "/restore/vdb/disk.qcow2",
        "/data/b/disk.qcow2": "/restore/vdb/2-disk.qcow2",
    }


def test_in_place_the_files_go_where_they_were() -> None:
    assert original_destinations([VDA]) == {path: path for path in (f.path for f in VDA.files)}


def test_a_manifest_whose_backup_lacks_the_top_is_refused() -> None:
    broken = disk(
        "vda",
        chain_file("/i/top.qcow2", "/i/base.qcow2", selected=False),
        chain_file("/i/base.qcow2", None),
    )
    with pytest.raises(RestoreError, match="does not hold the top"):
        original_destinations([broken])


# -- what the headers name ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("destination", "backing", "original", "expected"),
    [
        # absolute stays absolute, pointing at the new place
        ("/r/vda/vm.qcow2", "/r/vda/base.qcow2", "/i/base.qcow2", "/r/vda/base.qcow2"),
        # relative and still right: the header is kept as it is
        ("/r/vda/vm.qcow2", "/r/vda/base.qcow2", "base.qcow2", "base.qcow2"),
        ("/r/vda/vm.qcow2", "/r/vda/base.qcow2", "./base.qcow2", "./base.qcow2"),
        # relative but wrong now: relative to the new place
        ("/r/vda/vm.qcow2", "/srv/golden.qcow2", "../golden.qcow2", "../../srv/golden.qcow2"),
        # in place with an absolute string already right
        ("/i/vm.qcow2", "/i/base.qcow2", "/i/base.qcow2", "/i/base.qcow2"),
    ],
)
def test_backing_reference(destination: str, backing: str, original: str, expected: str) -> None:
    assert backing_reference(destination, backing, original) == expected


def test_a_restored_chain_names_its_restored_backing_files() -> None:
    plan = plan_restore([VDA], target_dir_destinations([VDA], "/r"), {})
    (vda,) = plan.disks
    top, base = vda.files
    assert (top.destination, top.backing, top.rebase) == (
        "/r/vda/vm.qcow2",
        "/r/vda/base.qcow2",
        True,
    )
    assert (base.destination, base.backing, base.rebase) == ("/r/vda/base.qcow2", None, False)
    assert [entry.original for entry in plan.files] == [base.original, top.original]  # bottom first
    assert vda.expected_chain() == ["/r/vda/vm.qcow2", "/r/vda/base.qcow2"]


def test_in_place_no_header_changes() -> None:
    plan = plan_restore([VDA], original_destinations([VDA]), {})
    assert not any(entry.rebase for entry in plan.files)


def test_depth_minus_one_goes_onto_the_named_base() -> None:
    vdb = disk(
        "vdb",
        chain_file("/i/vm.qcow2", "/golden/base.qcow2"),
        chain_file("/golden/base.qcow2", None, selected=False, size=2 << 30),
    )
    needed = bases_needed([vdb])
    assert needed == {"vdb": vdb.files[1]}

    plan = plan_restore([vdb], target_dir_destinations([vdb], "/r"), {"vdb": ("/b/g.raw", "raw")})

    (planned,) = plan.disks
    (top,) = planned.files
    assert (top.backing, top.backing_format, top.rebase) == ("/b/g.raw", "raw", True)
    assert planned.base is not None and planned.base.recorded.virtual_size == 2 << 30
    assert planned.expected_chain() == ["/r/vdb/vm.qcow2", "/b/g.raw"]
    with pytest.raises(RestoreError, match="no base named"):
        plan_restore([vdb], target_dir_destinations([vdb], "/r"), {})


def test_a_base_another_disk_restores_is_not_needed_from_the_user() -> None:
    short = disk(
        "vdb",
        chain_file("/i/b.qcow2", f"{IMAGES}/vm01/base.qcow2"),
        chain_file(f"{IMAGES}/vm01/base.qcow2", None, selected=False),
    )
    assert bases_needed([VDA, short]) == {}
    plan = plan_restore([VDA, short], target_dir_destinations([VDA, short], "/r"), {})
    assert plan.disks[1].files[0].backing == "/r/vda/base.qcow2"


def test_backing_file_options() -> None:
    assert parse_backing_options(["/b/g.qcow2"], ["vda", "vdb"]) == {
        "vda": "/b/g.qcow2",
        "vdb": "/b/g.qcow2",
    }
    assert parse_backing_options(["vdb=/b/x.qcow2", "/b/g.qcow2"], ["vda", "vdb"]) == {
        "vdb": "/b/x.qcow2",
        "vda": "/b/g.qcow2",
    }
    with pytest.raises(UsageError, match="no disk vdc"):
        parse_backing_options(["vdc=/b/x.qcow2"], ["vda"])


def test_disks_named_on_the_command_line() -> None:
    vdb = disk("vdb", chain_file("/i/b.qcow2", None))
    assert choose_disks([VDA, vdb], []) == [VDA, vdb]
    assert choose_disks([VDA, vdb], ["vdb"]) == [vdb]
    with pytest.raises(NotFoundError, match="no disk vdc"):
        choose_disks([VDA, vdb], ["vdc"])


# -- --define ------------------------------------------------------------------------------
def taken(*names: str):
    return lambda name: name in names


def test_define_the_same_domain_when_it_is_gone() -> None:
    request = RestoreRequest("vm01", define=True)
    definition = decide_definition(request, "vm01", False, taken(), files_back_in_place=True)
    assert (definition.name, definition.copy, definition.already_defined) == ("vm01", False, False)


def test_define_a_copy_next_to_the_original() -> None:
    request = RestoreRequest("vm01", define=True, target_dir="/r")
    copy = decide_definition(request, "vm01", True, taken("vm01"), files_back_in_place=False)
    assert (copy.name, copy.copy) == ("vm01-restored", True)
    named = RestoreRequest("vm01", define=True, target_dir="/r", name="vm01-test")
    assert decide_definition(named, "vm01", True, taken("vm01"), False).name == "vm01-test"
    with pytest.raises(RestoreError, match="a domain named vm01-restored exists"):
        decide_definition(request, "vm01", True, taken("vm01", "vm01-restored"), False)


def test_no_copy_on_the_original_files() -> None:
    back = RestoreRequest("vm01", define=True)
    definition = decide_definition(back, "vm01", True, taken("vm01"), files_back_in_place=True)
    assert definition.already_defined
    named = RestoreRequest("vm01", define=True, name="other")
    with pytest.raises(RestoreError, match="would share them"):
        decide_definition(named, "vm01", True, taken("vm01"), files_back_in_place=True)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (RestoreRequest("vm", in_place=True, target_dir="/r"), "exclude each other"),
        (RestoreRequest("vm", in_place=True, define=True), "--define is not needed"),
        (RestoreRequest("vm", keep_replaced=True), "--keep-replaced goes with --in-place"),
        (RestoreRequest("vm", name="x"), "--name goes with --define"),
    ],
)
def test_options_that_do_not_go_together(request_: RestoreRequest, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        request_.check()


# -- the command line ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["restore", "vm01", "--in-place", "--target-dir", "/r"], "not allowed with argument"),
        (["restore", "vm01", "--keep-replaced"], "--keep-replaced goes with --in-place"),
        (["restore", "vm01", "--name", "copy"], "--name goes with --define"),
        (["restore"], "the following arguments are required"),
        (["verify"], "the following arguments are required"),
    ],
)
def test_restore_usage_errors_are_one_line_and_exit_2(
    arguments: list[str], message: str, tmp_path, capsys
) -> None:
    from virt_dup.cli import main as cli

    config = tmp_path / "virt-dup.yml"
    config.write_text("")

    assert cli.main(["--config", str(config), *arguments]) == 2

    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("virt-dup: error: ") and message in line


# -- where a restore may write ---------------------------------------------------------------


def test_a_target_dir_restore_stays_inside_the_target_dir() -> None:
    from virt_dup.restore.plan import is_below

    destinations = target_dir_destinations([VDA], "/srv/restore")
    assert all(is_below(path, ["/srv/restore"]) for path in destinations.values())
    assert not is_below("/srv/restore-evil/x", ["/srv/restore"])
    assert not is_below("/etc/cron.d/x", ["/srv/restore"])


def test_a_restore_to_the_backups_paths_writes_only_below_image_directories() -> None:
    from virt_dup.restore.plan import check_written_only_below

    images = ["/var/lib/libvirt/images", "/srv/vms"]
    check_written_only_below({"a": "/var/lib/libvirt/images/sub/vm.qcow2"}, images)
    check_written_only_below({"a": "/srv/vms/vm.qcow2"}, images)
    with pytest.raises(RestoreError, match=r"/etc/cron.d/evil: not below an image directory"):
        check_written_only_below({"a": "/etc/cron.d/evil", "b": "/srv/vms/ok"}, images)


def test_in_place_replaces_only_the_domains_current_files() -> None:
    from virt_dup.restore.plan import check_replacing_only

    current = {"/i/vm.qcow2", "/i/base.qcow2"}
    check_replacing_only({"/i/vm.qcow2": "/i/vm.qcow2"}, current)
    with pytest.raises(RestoreError, match=r"/root/.ssh/authorized_keys: not a file of"):
        check_replacing_only({"x": "/root/.ssh/authorized_keys"}, current)
