"""Which GnuPG home duplicity, gpg and the units' ReadWritePaths= use: one answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from virt_dup.config.load import parse_config
from virt_dup.config.options import JobOptions
from virt_dup.libvirt.metadata import DiskSelector, Job
from virt_dup.systemd.generator import render_job_paths

JOB = "0e1f2a3b-1111-4222-8333-444455556666"


def job() -> Job:
    return Job(
        uuid=JOB,
        domain_name="vm01",
        domain_uuid="11111111-2222-4333-8444-555555555555",
        disks=DiskSelector((), ()),
        options=JobOptions(),
    )


def paths_of(config) -> str:
    files, _warnings = render_job_paths(config, job(), [], "vm01.xml")
    return files[f"virt-dup@{JOB}.service.d/50-virt-dup-paths.conf"]


def test_an_explicit_gnupg_home_wins(tmp_path: Path) -> None:
    config = parse_config(
        f"encryption:\n  gnupg_home: /etc/g\nstate_dir: {tmp_path}\n", tmp_path / "c.yml"
    )
    (tmp_path / "gnupg").mkdir()
    assert config.gnupg_directory == Path("/etc/g")
    assert 'ReadWritePaths="-/etc/g"\n' in paths_of(config)


def test_virt_dups_own_home_once_init_made_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GNUPGHOME", raising=False)
    config = parse_config(f"state_dir: {tmp_path}\n", tmp_path / "c.yml")
    assert config.own_gnupg_home == tmp_path / "gnupg"
    # before init: GnuPG's own, as always, so a key set up by hand keeps working
    assert config.gnupg_directory == tmp_path / "home" / ".gnupg"
    (tmp_path / "gnupg").mkdir()
    assert config.gnupg_directory == tmp_path / "gnupg"
    assert f'ReadWritePaths="-{tmp_path}/gnupg"\n' in paths_of(config)
