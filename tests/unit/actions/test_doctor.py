"""The doctor's view of the libvirt URI, before it connects anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from virt_dup.actions import doctor as doctor_module
from virt_dup.actions.check_config import CheckReport
from virt_dup.config.load import parse_config


def never(*_arguments: object) -> object:
    raise AssertionError("the doctor connected although every run would be refused")


def test_a_uri_naming_another_host_is_one_problem_and_no_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(doctor_module, "check_config", lambda _config: CheckReport())
    config = parse_config(
        "libvirt:\n  uri: qemu+ssh://root@backup.example.invalid/system\n", Path("c.yml")
    )
    (finding,) = doctor_module.doctor(config, never, never)  # type: ignore[arg-type]
    assert (finding.severity, finding.subject) == (doctor_module.PROBLEM, "libvirt")
    assert "names host backup.example.invalid, which is not this host" in finding.message
