"""virt_dup.actions.jobs on libvirt's in-process test driver."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from virt_dup.actions.jobs import list_jobs
from virt_dup.config.load import parse_config
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.libvirt.metadata import Job


@pytest.fixture
def hypervisor(tmp_path: Path) -> Iterator[Hypervisor]:
    config = parse_config(
        f"libvirt:\n  uri: test:///default\nstate_dir: {tmp_path / 'state'}\n", tmp_path / "c.yml"
    )
    connection = Hypervisor.open(config)
    yield connection
    connection.close()


def test_a_domain_undefined_while_jobs_are_listed_is_left_out(
    hypervisor: Hypervisor, tmp_path: Path
) -> None:
    """list-jobs met an "internal error" when a domain went away between the
    listing and the question whether it runs."""
    config = parse_config(f"state_dir: {tmp_path / 'state'}\n", tmp_path / "c.yml")
    gone = hypervisor.define(
        f"<domain type='test'><name>gone</name><uuid>{uuid.uuid4()}</uuid><memory>1024</memory>"
        "<os><type>hvm</type></os></domain>",
        "gone",
    )
    listed = [
        (domain, [Job(str(uuid.uuid4()), domain.name(), domain.UUIDString())])
        for domain, _jobs in hypervisor.all_jobs()
    ]
    assert {domain.name() for domain, _jobs in listed} >= {"gone", "test"}
    gone.undefine()
    hypervisor.all_jobs = lambda: iter(listed)  # type: ignore[method-assign]

    records, warnings = list_jobs(config, hypervisor)

    assert [record["domain"] for record in records] == ["test"]  # the driver's own domain
    assert records[0]["domain_state"] == "running" and warnings == []
