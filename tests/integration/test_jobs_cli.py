"""Jobs in real domain XML through the installed CLI, on a real libvirtd.

Each test makes its own throw-away domain; the CLI runs as a separate
process (``python -m virt_dup``), exactly as an admin would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest
from harness.domains import DiskSpec, ScratchDomain, restart_libvirtd

from virt_dup import NAMESPACE

pytestmark = pytest.mark.integration

# libvirt puts the element into the namespace itself (it refuses one declared here)
OTHER_METADATA = '<settings keep="yes">spaces   kept <inner>x</inner></settings>'


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "virt-dup.yml"
    path.write_text(
        "libvirt:\n  uri: qemu:///system\n"
        "backends:\n  local: file:///var/tmp/virt-dup-test-backups\n"
        "defaults:\n  schedule: '0 2 * * *'\n"
    )
    return path


def virt_dup(config: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    finished = subprocess.run(
        [sys.executable, "-m", "virt_dup", "--config", str(config), *arguments],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and finished.returncode != 0:
        raise AssertionError(f"virt-dup {arguments} failed: {finished.stderr}")
    return finished


def metadata(vm: ScratchDomain, inactive: bool) -> str | None:
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if inactive else libvirt.VIR_DOMAIN_AFFECT_LIVE
    try:
        return str(vm.domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, flags))
    except libvirt.libvirtError:
        return None


def jobs_json(config: Path, domain: str) -> list[dict[str, object]]:
    document = json.loads(virt_dup(config, "list-jobs", domain, "--json").stdout)
    assert document["schema"] == "virt-dup/list-jobs/1"
    return document["jobs"]


@pytest.mark.parametrize("running", [True, False], ids=["running", "shut-off"])
def test_add_list_remove(make_domain, config: Path, running: bool) -> None:
    vm = make_domain(chain=["base", "vm"], running=running)
    added = virt_dup(
        config, "add-job", vm.name, "--dev", "vda", "--depth", "-1", "--backend", "local"
    )
    job_uuid = added.stdout.strip()
    assert len(job_uuid) == 36

    inactive = metadata(vm, inactive=True)
    assert inactive is not None and job_uuid in inactive
    if running:
        live = metadata(vm, inactive=False)
        assert live is not None and job_uuid in live
    # the persistent file the generator reads holds it too
    assert job_uuid in Path(f"/etc/libvirt/qemu/{vm.name}.xml").read_text()

    (record,) = jobs_json(config, vm.name)
    assert record["job"] == job_uuid
    assert record["options"]["depth"] == -1
    assert record["options"]["schedule"] == "0 2 * * *"  # from virt-dup.yml
    assert record["disks"] == {"devs": ["vda"], "paths": []}
    table = virt_dup(config, "list-jobs").stdout
    assert job_uuid in table and vm.name in table

    removed = virt_dup(config, "remove-job", job_uuid)
    assert job_uuid in removed.stdout
    assert jobs_json(config, vm.name) == []
    assert metadata(vm, inactive=True) is None


def test_add_job_by_uuid_and_path(make_domain, config: Path) -> None:
    vm = make_domain(disks=["vda", "vdb"], chain=["vm"], running=True)
    source = str(vm.images["vdb"][-1])
    job_uuid = virt_dup(config, "add-job", vm.uuid, "--path", source).stdout.strip()
    (record,) = jobs_json(config, vm.name)
    assert record["job"] == job_uuid
    assert record["disks"]["paths"] == [source]


def test_metadata_survives_destroy_and_start(make_domain, config: Path) -> None:
    vm = make_domain(chain=["base", "vm"], running=True)
    job_uuid = virt_dup(config, "add-job", vm.name, "--schedule", "@daily").stdout.strip()
    vm.domain.destroy()
    vm.domain.create()
    (record,) = jobs_json(config, vm.name)
    assert record["job"] == job_uuid
    assert record["options"]["schedule"] == "@daily"


def test_seed_minimal_job_written_by_hand(make_domain, config: Path) -> None:
    vm = make_domain(chain=["vm"], running=False)
    # exactly what an admin types: virsh metadata --set, no virt-dup involved
    subprocess.run(
        [
            "virsh",
            "-q",
            "-c",
            "qemu:///system",
            "metadata",
            vm.name,
            NAMESPACE,
            "--key",
            "virt-dup",
            "--set",
            "<instance><job/></instance>",
            "--config",
        ],
        check=True,
    )
    first = jobs_json(config, vm.name)
    (record,) = first
    assert record["uuid_derived"] is True
    assert record["options"]["depth"] == 0
    assert record["options"]["schedule"] == "0 2 * * *"
    assert record["options"]["encryption"] == "gpg"
    # stable: the same id every time it is read
    assert jobs_json(config, vm.name)[0]["job"] == record["job"]
    # and it stays the same job when virt-dup rewrites the element
    virt_dup(config, "add-job", vm.name)
    ids = [job["job"] for job in jobs_json(config, vm.name)]
    assert ids[0] == record["job"] and len(ids) == 2


def test_other_namespaces_are_preserved_byte_for_byte(make_domain, config: Path) -> None:
    vm = make_domain(chain=["vm"], running=True)
    vm.domain.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        OTHER_METADATA,
        "other",
        "http://example.com/other",
        libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG,
    )

    def other(flags: int) -> str:
        return str(
            vm.domain.metadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, "http://example.com/other", flags
            )
        )

    before = [other(libvirt.VIR_DOMAIN_AFFECT_LIVE), other(libvirt.VIR_DOMAIN_AFFECT_CONFIG)]
    job_uuid = virt_dup(config, "add-job", vm.name).stdout.strip()
    virt_dup(config, "remove-job", job_uuid)
    virt_dup(config, "add-job", vm.name)
    virt_dup(config, "remove-all-jobs", vm.name, "--yes")
    after = [other(libvirt.VIR_DOMAIN_AFFECT_LIVE), other(libvirt.VIR_DOMAIN_AFFECT_CONFIG)]
    assert after == before


def test_remove_all_jobs_asks_and_refuses_without_a_terminal(make_domain, config: Path) -> None:
    vm = make_domain(chain=["vm"], running=False)
    virt_dup(config, "add-job", vm.name)
    virt_dup(config, "add-job", vm.name)
    refused = virt_dup(config, "remove-all-jobs", vm.name, check=False)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert len(jobs_json(config, vm.name)) == 2
    virt_dup(config, "remove-all-jobs", vm.name, "--yes")
    assert jobs_json(config, vm.name) == []


def test_transient_domain_is_refused(make_domain, config: Path, libvirt_conn) -> None:
    vm = make_domain(chain=["vm"], running=True)
    xml = vm.domain.XMLDesc(0)
    vm.domain.undefine()  # still running: now transient
    try:
        refused = virt_dup(config, "add-job", vm.name, check=False)
        assert refused.returncode == 2
        assert "transient" in refused.stderr
    finally:
        libvirt_conn.defineXML(xml)  # give the harness its persistent domain back


# -- bad input: one line, exit code, XML unchanged --------------------------------------
BAD_ADD_JOB = [
    (["--schedule", "0 0 30 2 *"], "never runs"),
    (["--schedule", "61 * * * *"], "minute"),
    (["--schedule", "* * * *"], "expected 5 fields"),
    (["--schedule", "0 2 * * *\nExecStartPre=/bin/false"], "control character"),
    (["--depth", "deep"], "--depth: expected an integer"),
    (["--backend", "nowhere"], "no backend named 'nowhere'"),
    (["--path", "/etc/passwd"], "is not a disk of domain"),
    (["--dev", "vdz"], "has no disk vdz"),
    (["--full-retention", "0"], "--full-retention: expected a whole number"),
    (["--quiesce", "sometimes"], "--quiesce: expected one of"),
    (["--full-every", "monthly"], "--full-every: expected an interval"),
    (["--encryption-key", "xyz"], "--encryption-key: expected GPG key ids"),
    (["--bogus-option"], "unrecognized arguments: --bogus-option"),
    (["--uuid", "not-a-uuid"], "--uuid: expected a UUID"),
    (["--description", "two\nlines"], "expected one line"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_ADD_JOB)
def test_bad_add_job_changes_nothing(make_domain, config: Path, arguments, message) -> None:
    vm = make_domain(disks=[DiskSpec("vda", chain=["vm"])], running=False)
    existing = virt_dup(config, "add-job", vm.name).stdout.strip()
    before = (vm.domain.XMLDesc(0), vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    refused = virt_dup(config, "add-job", vm.name, *arguments, check=False)
    assert refused.returncode == 2, refused.stderr
    assert message in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "Traceback" not in refused.stderr
    after = (vm.domain.XMLDesc(0), vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert after == before
    assert [job["job"] for job in jobs_json(config, vm.name)] == [existing]


def test_unknown_domain_and_job(config: Path, libvirt_conn) -> None:
    missing = virt_dup(config, "add-job", "no-such-domain-virt-dup-test", check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "virt-dup: error: no domain named 'no-such-domain-virt-dup-test' on qemu:///system"
    )
    unknown_job = virt_dup(
        config, "remove-job", "00000000-0000-4000-8000-000000000000", check=False
    )
    assert unknown_job.returncode == 2
    assert "no job 00000000-0000-4000-8000-000000000000" in unknown_job.stderr


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        ("libvirt: [", "YAML syntax error"),
        ("defaults:\n  depht: 1\n", "defaults.depht: unknown option"),
        ("libvirt:\n  uri: 5\n", "libvirt.uri: expected a non-empty string"),
    ],
)
def test_bad_config_changes_nothing(
    make_domain, tmp_path: Path, config_text: str, message: str
) -> None:
    vm = make_domain(chain=["vm"], running=False)
    bad = tmp_path / "bad.yml"
    bad.write_text(config_text)
    before = vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    refused = virt_dup(bad, "add-job", vm.name, check=False)
    assert refused.returncode == 2
    assert message in refused.stderr and str(bad) in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before


def test_hostile_metadata_is_refused_and_not_overwritten(make_domain, config: Path) -> None:
    vm = make_domain(chain=["vm"], running=False)
    hostile = '<instance><job uuid="not-a-uuid" schedule="@daily"/></instance>'
    subprocess.run(
        [
            "virsh",
            "-q",
            "-c",
            "qemu:///system",
            "metadata",
            vm.name,
            NAMESPACE,
            "--key",
            "virt-dup",
            "--set",
            hostile,
            "--config",
        ],
        check=True,
    )
    before = vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    refused = virt_dup(config, "add-job", vm.name, check=False)
    assert refused.returncode == 2
    assert "job 1.uuid: expected a UUID" in refused.stderr
    assert vm.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before
    # list-jobs keeps going and says which domain it skipped
    listing = virt_dup(config, "list-jobs")
    assert vm.name in listing.stderr and "skipped" in listing.stderr


@pytest.mark.disruptive
def test_metadata_survives_a_libvirtd_restart(make_domain, config: Path, require) -> None:
    running = make_domain(chain=["base", "vm"], running=True)
    shut_off = make_domain(chain=["vm"], running=False)
    jobs = {
        vm.name: virt_dup(config, "add-job", vm.name).stdout.strip() for vm in (running, shut_off)
    }
    restart_libvirtd(require)
    make_domain.conn = libvirt.open("qemu:///system")  # the old connection died with the daemon
    for name, job_uuid in jobs.items():
        assert [job["job"] for job in jobs_json(config, name)] == [job_uuid]
    assert make_domain.conn.lookupByName(running.name).isActive()


def complete(config: Path, line: str, tmp_path: Path) -> list[str]:
    """What the shell completion (argcomplete's protocol) offers for ``line``."""
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
            "VIRT_DUP_CONFIG": str(config),
        },
        capture_output=True,
        check=False,
    )
    return sorted(item.strip() for item in output.read_text().split("\n") if item.strip())


def test_completion_of_domain_names_and_job_uuids(
    make_domain, config: Path, tmp_path: Path
) -> None:
    vm = make_domain(chain=["vm"], running=False)
    job_uuid = virt_dup(config, "add-job", vm.name).stdout.strip()
    assert complete(config, f"virt-dup add-job {vm.name[:-2]}", tmp_path) == [vm.name]
    assert job_uuid in complete(config, f"virt-dup remove-job {job_uuid[:8]}", tmp_path)
    assert "add-job" in complete(config, "virt-dup ad", tmp_path)


# -- edit-job ---------------------------------------------------------------------------------
def test_edit_job_changes_options_in_both_definitions_and_keeps_the_uuid(
    make_domain, config: Path
) -> None:
    vm = make_domain(chain=["base", "vm"], running=True)
    job = virt_dup(config, "add-job", vm.name, "--depth", "-1").stdout.strip()

    edited = virt_dup(
        config, "edit-job", job, "--full-retention", "5", "--unset", "depth", "--dev", "vda"
    )

    assert f"job {job} of domain {vm.name}: depth: -1 -> inherited" in edited.stdout
    assert f"job {job} of domain {vm.name}: full_retention: inherited -> 5" in edited.stdout
    (record,) = jobs_json(config, vm.name)
    assert record["job"] == job and record["uuid_derived"] is False
    assert record["set_on_job"] == ["full_retention"]
    assert record["options"]["depth"] == 0
    assert record["disks"] == {"devs": ["vda"], "paths": []}
    for inactive in (True, False):
        written = metadata(vm, inactive=inactive)
        assert written is not None and job in written
        assert 'full_retention="5"' in written and "depth=" not in written
    assert 'full_retention="5"' in Path(f"/etc/libvirt/qemu/{vm.name}.xml").read_text()


def test_edit_job_makes_a_derived_uuid_explicit_and_keeps_it(make_domain, config: Path) -> None:
    vm = make_domain(chain=["base", "vm"], running=False)
    vm.domain.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        '<instance><job depth="0"/></instance>',
        "virt-dup",
        NAMESPACE,
        libvirt.VIR_DOMAIN_AFFECT_CONFIG,
    )
    (derived,) = jobs_json(config, vm.name)
    assert derived["uuid_derived"] is True

    virt_dup(config, "edit-job", str(derived["job"]), "--depth", "-1")

    (record,) = jobs_json(config, vm.name)
    assert record["job"] == derived["job"] and record["uuid_derived"] is False
    assert record["options"]["depth"] == -1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--depth", "deep"], "--depth"),
        (["--backend", "nowhere"], "nowhere"),
        (["--dev", "vdz"], "vdz"),
        (["--schedule", "0 0 30 2 *"], "invalid schedule"),
        (["--unset", "colour"], "invalid choice"),
        ([], "nothing to change"),
        (["--depth", "1", "--unset", "depth"], "exclude each other"),
        (["--dev", "vda", "--unset", "disks"], "exclude each other"),
    ],
)
def test_edit_job_refuses_bad_input_in_one_line_and_changes_nothing(
    make_domain, config: Path, arguments: list[str], message: str
) -> None:
    vm = make_domain(chain=["base", "vm"], running=True)
    job = virt_dup(config, "add-job", vm.name, "--depth", "-1").stdout.strip()
    before = metadata(vm, inactive=True), metadata(vm, inactive=False)
    persistent = Path(f"/etc/libvirt/qemu/{vm.name}.xml").read_text()

    refused = virt_dup(config, "edit-job", job, *arguments, check=False)

    (line,) = refused.stderr.splitlines()
    assert refused.returncode == 2, line
    assert line.startswith("virt-dup: error: ") and message in line, line
    assert refused.stdout == ""
    assert (metadata(vm, inactive=True), metadata(vm, inactive=False)) == before
    assert Path(f"/etc/libvirt/qemu/{vm.name}.xml").read_text() == persistent


def test_edit_job_of_an_unknown_job_is_exit_2(config: Path) -> None:
    job = "0e1f2a3b-1111-4222-8333-444455556666"
    refused = virt_dup(config, "edit-job", job, "--depth", "1", check=False)
    assert refused.returncode == 2
    assert job in refused.stderr
