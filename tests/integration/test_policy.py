"""virt-dup.yml's policy against jobs that domain XML carries (real libvirtd):
whoever may edit a domain's metadata must not choose where its disks go."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness.backups import BackupEnvironment

pytestmark = pytest.mark.integration

_NAMESPACE = "https://www.github.com/spencerharmon/virt-dup"


@pytest.fixture
def strict(tmp_path: Path, gpg_home) -> BackupEnvironment:
    root = tmp_path / "strict"
    root.mkdir()
    return BackupEnvironment.create(
        root,
        gpg_home.path,
        gpg_home.fingerprint,
        extra="policy:\n  allow_job_backend_urls: false\n  require_encryption: true\n",
    )


def error_line(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if line.startswith("virt-dup: error: ")]
    return line


def test_add_job_refuses_what_the_policy_forbids_and_writes_nothing(
    make_domain, strict: BackupEnvironment
) -> None:
    vm = make_domain(chain=["vm"])
    before = vm.domain.XMLDesc(2)
    for arguments, message in (
        (["--backend", "file:///tmp/elsewhere"], "names the backend URL file:///tmp/elsewhere"),
        (["--encryption", "none"], "encryption none, and the policy"),
    ):
        refused = strict.virt_dup("add-job", vm.name, *arguments, check=False)
        assert refused.returncode == 2
        assert message in error_line(refused.stderr)
    assert vm.domain.XMLDesc(2) == before


def test_a_job_written_into_the_xml_by_hand_is_refused_at_run(
    make_domain, strict: BackupEnvironment
) -> None:
    vm = make_domain(chain=["vm"])
    job = "3b1e2f4a-5c6d-4e7f-8a9b-0c1d2e3f4a5b"
    element = f'<instance><job uuid="{job}" backends="file:///tmp/exfiltrate"/></instance>'
    vm.domain.setMetadata(2, element, "virt-dup", _NAMESPACE, 3)  # live and config

    refused = strict.virt_dup("run", job, check=False)

    assert refused.returncode == 2
    assert "names the backend URL file:///tmp/exfiltrate" in error_line(refused.stderr)
    assert not Path("/tmp/exfiltrate").exists()
    assert sorted(vm.directory.rglob("*.virt-dup-*")) == []
