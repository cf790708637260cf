"""Hostile-input corpus, the command line: one ``virt-dup: error:`` line, nothing changed.

Every case runs the real ``main`` on libvirt's own test driver
(``test:///default``: libvirt in-process, its domain ``test`` with one disk),
injected so that the domain's XML can be compared before and after on the
same connection.  A case passes when the exit code is 2 (a usage or input
error), stderr is exactly one line without a traceback or "internal error",
stdout is empty, the domain's XML is unchanged and nothing was written into
the state, cache or unit directories.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from virt_dup.cli import main as cli
from virt_dup.config.load import parse_config
from virt_dup.libvirt.connection import Hypervisor

INJECTED = "x\n[Service]\nExecStart=/bin/sh -c evil"
JOB = "0e1f2a3b-1111-4222-8333-444455556666"


def case(case_id: str, *argv: str, message: str) -> object:
    return pytest.param(list(argv), message, id=case_id)


HOSTILE_ARGUMENTS = [
    # what reaches a unit file
    case(
        "schedule with [Service]", "add-job", "test", "--schedule", INJECTED, message="--schedule"
    ),
    case(
        "schedule with a % specifier",
        "add-job",
        "test",
        "--schedule",
        "0 2 * * %i",
        message="--schedule",
    ),
    case(
        "description with [Service]",
        "add-job",
        "test",
        "--description",
        INJECTED,
        message="--description",
    ),
    case(
        "description of 5000 characters",
        "add-job",
        "test",
        "--description",
        "d" * 5000,
        message="at most 4096",
    ),
    case(
        "schedule that never runs",
        "add-job",
        "test",
        "--schedule",
        "0 0 30 2 *",
        message="February",
    ),
    case(
        "schedule of 100000 characters",
        "add-job",
        "test",
        "--schedule",
        "1," * 50000 + "1 * * * *",
        message="at most 4096",
    ),
    # values
    case(
        "depth beyond 64 bits",
        "add-job",
        "test",
        "--depth",
        "9" * 30,
        message="--depth: expected an integer",
    ),
    case(
        "full_every of 10^17 days",
        "add-job",
        "test",
        "--full-every",
        "99999999999999999D",
        message="--full-every",
    ),
    case("retention 0", "add-job", "test", "--full-retention", "0", message="at least 1"),
    case(
        "backend starting with --",
        "add-job",
        "test",
        "--backend=--exclude-filelist=/etc",
        message="--backend",
    ),
    case(
        "encryption key that is an option",
        "add-job",
        "test",
        "--encryption-key=--homedir=/tmp",
        message="GPG key ids",
    ),
    # disks outside the domain
    case(
        "path outside the domain",
        "add-job",
        "test",
        "--path",
        "/etc/shadow",
        message="/etc/shadow is not a disk of domain test",
    ),
    case(
        "path with ..",
        "add-job",
        "test",
        "--path",
        "/var/lib/libvirt/images/../../../etc/shadow",
        message="is not a disk of domain test",
    ),
    case(
        "dev the domain does not have",
        "add-job",
        "test",
        "--dev",
        "vdz",
        message="domain test has no disk vdz",
    ),
    case("dev with [Service]", "add-job", "test", "--dev", INJECTED, message="has no disk"),
    # names and ids
    case("domain named like an option", "add-job", "--", "-x", message="no domain named '-x'"),
    case("domain that does not exist", "add-job", "../../etc/passwd", message="no domain named"),
    case("job id with ..", "run", "../../etc/cron.d/x", message="no job ../../etc/cron.d/x"),
    case("job id with a newline", "remove-job", JOB + "\nx", message="no job"),
    case(
        "unknown option", "add-job", "test", "--exec", "/bin/sh", message="unrecognized arguments"
    ),
    # backend URLs
    case(
        "restore --backend starting with --",
        "restore",
        "test",
        "--backend=--help",
        message="argument --backend",
    ),
    case(
        "verify --backend starting with -",
        "verify",
        JOB,
        "--backend=-x://y",
        message="argument --backend",
    ),
    case(
        "backups --backend with a blank",
        "backups",
        "--backend=file:///a b",
        message="argument --backend",
    ),
    case(
        "restore --backend that is no URL",
        "restore",
        "test",
        "--backend",
        "/srv/b",
        message="argument --backend",
    ),
    case(
        "schedule explain with a newline",
        "schedule",
        "explain",
        INJECTED,
        message="invalid schedule",
    ),
]


@pytest.fixture
def setting(tmp_path: Path) -> Iterator[tuple[Path, Hypervisor]]:
    config = tmp_path / "virt-dup.yml"
    config.write_text(
        "libvirt:\n  uri: test:///default\n"
        f"state_dir: {tmp_path / 'state'}\ncache_dir: {tmp_path / 'cache'}\n"
    )
    hypervisor = Hypervisor.open(parse_config(config.read_text(), config))
    yield config, hypervisor
    hypervisor.close()


@pytest.mark.parametrize(("argv", "message"), HOSTILE_ARGUMENTS)
def test_a_hostile_argument_is_one_line_and_changes_nothing(
    argv: list[str],
    message: str,
    setting: tuple[Path, Hypervisor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, hypervisor = setting
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    domain = hypervisor.find_domain("test")
    assert domain is not None
    before = hypervisor.domain_xml(domain), hypervisor.domain_xml(domain, inactive=True)

    code = cli.main(["--config", str(config), *argv], hypervisor=hypervisor)

    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert code == 2, line
    assert line.startswith("virt-dup: error: ") and message in line, line[:300]
    assert "Traceback" not in captured.err and "internal error" not in captured.err
    assert captured.out == ""
    assert (hypervisor.domain_xml(domain), hypervisor.domain_xml(domain, inactive=True)) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["virt-dup.yml"]
