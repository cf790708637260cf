"""Jobs in domain XML: the seed's shapes, stable derived ids, safe parsing, round trip."""

from __future__ import annotations

import pytest

from virt_dup import NAMESPACE
from virt_dup.config.options import JobOptions
from virt_dup.errors import ConfigError
from virt_dup.libvirt.metadata import (
    DiskSelector,
    Job,
    derived_job_uuid,
    parse_domain_xml,
    parse_instance_text,
    render_instance,
)

DOMAIN_UUID = "5f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61"
SEED_MINIMAL = (
    f'<virt-dup:instance xmlns:virt-dup="{NAMESPACE}">\n    <virt-dup:job />\n</virt-dup:instance>'
)


def domain_xml(metadata: str) -> str:
    return f"""<domain type='kvm'>
  <name>vm01</name>
  <uuid>{DOMAIN_UUID}</uuid>
  <metadata>
    <other:x xmlns:other="http://example.com/other"/>
    {metadata}
  </metadata>
</domain>"""


def test_seed_minimal_job_inherits_everything_and_has_stable_id() -> None:
    jobs = parse_instance_text(SEED_MINIMAL, "vm01", DOMAIN_UUID)
    assert len(jobs) == 1
    job = jobs[0]
    assert job.options == JobOptions()
    assert job.disks.all_disks
    assert job.uuid_derived
    assert job.uuid == derived_job_uuid(DOMAIN_UUID, 0)
    again = parse_instance_text(SEED_MINIMAL, "vm01", DOMAIN_UUID)[0]
    assert again.uuid == job.uuid


def test_derived_id_is_the_same_from_file_and_from_libvirt() -> None:
    """The generator reads files (namespaced); the CLI reads libvirt (no namespace)."""
    _name, _uuid, from_file = parse_domain_xml(domain_xml(SEED_MINIMAL), "vm01.xml")
    from_libvirt = parse_instance_text("<instance><job/></instance>", "vm01", DOMAIN_UUID)
    assert [job.uuid for job in from_file] == [job.uuid for job in from_libvirt]


def test_hand_added_job_does_not_take_an_id_made_explicit_before() -> None:
    first = derived_job_uuid(DOMAIN_UUID, 0)
    text = f'<instance><job uuid="{first}"/><job/></instance>'
    jobs = parse_instance_text(text, "vm01", DOMAIN_UUID)
    assert jobs[0].uuid == first
    assert jobs[1].uuid not in (first,)
    assert jobs[1].uuid == derived_job_uuid(DOMAIN_UUID, 1)


def test_original_attributes_keep_their_meaning() -> None:
    text = (
        f'<virt-dup:instance xmlns:virt-dup="{NAMESPACE}">'
        '<virt-dup:job uuid="0D7A3A0C-4D0E-4C3B-9C4B-2E4A7E3B9B10" incremental_schedule="0 2 * * *"'
        ' full_schedule="0 3 * * 0" depth="-1" path="/var/lib/libvirt/images/vm01.qcow2"'
        ' dev_name="vdb" backends="local,sftp://h//srv" description="mail"'
        ' full_retention="3" incremental_retention="1">'
        "<virt-dup:dev>vdc</virt-dup:dev>"
        "</virt-dup:job></virt-dup:instance>"
    )
    (job,) = parse_instance_text(text, "vm01", DOMAIN_UUID)
    assert job.uuid == "0d7a3a0c-4d0e-4c3b-9c4b-2e4a7e3b9b10"
    assert job.options.schedule == "0 2 * * *"
    assert job.options.full_schedule == "0 3 * * 0"
    assert job.options.depth == -1
    assert job.options.backends == ("local", "sftp://h//srv")
    assert job.options.full_retention == 3
    assert job.disks == DiskSelector(
        devs=("vdb", "vdc"), paths=("/var/lib/libvirt/images/vm01.qcow2",)
    )
    assert any("incremental_schedule" in notice for notice in job.notices)


def test_render_then_parse_round_trips() -> None:
    job = Job(
        uuid="0d7a3a0c-4d0e-4c3b-9c4b-2e4a7e3b9b10",
        domain_name="vm01",
        domain_uuid=DOMAIN_UUID,
        disks=DiskSelector(devs=("vda",), paths=("/images/a b.qcow2",)),
        options=JobOptions(schedule="@daily", depth=-1, backends=("local",), quiesce="required"),
    )
    text = render_instance([job])
    assert NAMESPACE not in text  # libvirt adds the namespace itself
    assert parse_instance_text(text, "vm01", DOMAIN_UUID) == [job]


def test_other_elements_of_the_domain_are_not_jobs() -> None:
    _name, _uuid, jobs = parse_domain_xml(domain_xml(""), "vm01.xml")
    assert jobs == []


BAD_INSTANCES = [
    ('<instance><job uuid="nope"/></instance>', "job 1.uuid: expected a UUID"),
    ('<instance><job depth="two"/></instance>', "job 1.depth: expected an integer"),
    ('<instance><job schedule="0 0 30 2 *"/></instance>', "never runs"),
    ('<instance><job colour="red"/></instance>', "job 1.colour: unknown option"),
    ('<instance><job full-retention="3"/></instance>', "job 1.full-retention: unknown option"),
    ("<instance><job><disk>vda</disk></job></instance>", "unexpected element"),
    ("<instance><job><dev/></job></instance>", "empty <virt-dup:dev>"),
    ("<instance><job", "not well-formed XML"),
    (
        '<instance><job uuid="0d7a3a0c-4d0e-4c3b-9c4b-2e4a7e3b9b10"/>'
        '<job uuid="0d7a3a0c-4d0e-4c3b-9c4b-2e4a7e3b9b10"/></instance>',
        "duplicate job uuid",
    ),
    ('<instance><job schedule="0 2 * * *&#10;ExecStartPre=/bin/sh"/></instance>', "schedule"),
]


@pytest.mark.parametrize(("text", "message"), BAD_INSTANCES)
def test_bad_job_xml_is_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_instance_text(text, "vm01", DOMAIN_UUID)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_entity_expansion_is_refused() -> None:
    billion_laughs = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
        '<instance><job description="&lol2;"/></instance>'
    )
    with pytest.raises(ConfigError, match="DOCTYPE"):
        parse_instance_text(billion_laughs, "vm01", DOMAIN_UUID)


def test_external_entity_is_refused() -> None:
    external = (
        '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/shadow">]>'
        '<instance><job description="&e;"/></instance>'
    )
    with pytest.raises(ConfigError):
        parse_instance_text(external, "vm01", DOMAIN_UUID)


def test_leniently_a_broken_job_is_left_out_and_the_others_keep_their_ids() -> None:
    """The generator's reading: one broken job costs only its own timer, and the
    ids derived after it are those it will have once it is fixed."""
    broken = domain_xml(
        f'<virt-dup:instance xmlns:virt-dup="{NAMESPACE}">'
        '<virt-dup:job schedule="not cron"/><virt-dup:job schedule="@daily"/>'
        "</virt-dup:instance>"
    )
    fixed = broken.replace("not cron", "@weekly")
    errors: list[str] = []

    _name, _uuid, jobs = parse_domain_xml(broken, "vm01.xml", errors)

    assert [job.uuid for job in jobs] == [derived_job_uuid(DOMAIN_UUID, 1)]
    assert [job.uuid for job in parse_domain_xml(fixed, "vm01.xml")[2]][1] == jobs[0].uuid
    (error,) = errors
    assert error.startswith("vm01.xml") and "job 1" in error and "not cron" in error
    with pytest.raises(ConfigError, match="not cron"):
        parse_domain_xml(broken, "vm01.xml")  # strictly (the CLI): the whole domain


def test_leniently_two_jobs_with_one_id_are_both_left_out() -> None:
    job = '<virt-dup:job uuid="11111111-2222-4333-8444-555555555555"/>'
    text = domain_xml(
        f'<virt-dup:instance xmlns:virt-dup="{NAMESPACE}">{job}{job}'
        '<virt-dup:job uuid="21111111-2222-4333-8444-555555555555"/></virt-dup:instance>'
    )
    errors: list[str] = []

    jobs = parse_domain_xml(text, "vm01.xml", errors)[2]

    assert [job.uuid for job in jobs] == ["21111111-2222-4333-8444-555555555555"]
    assert len(errors) == 1 and "duplicate job uuid" in errors[0]
