"""The generator: golden output trees, robustness, no injection into unit files.

Golden files live in tests/unit/golden/generator/: ``input/`` holds domain
XML files as libvirt keeps them (plus broken ones), ``expected/`` the tree
the generator must write.  Regenerate after an intended change with
``UPDATE_GOLDEN=1 pytest tests/unit/test_generator.py`` and review the diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from virt_dup.config.load import parse_config
from virt_dup.systemd.generator import GeneratedUnits, escape_unit_text, render_units

GOLDEN = Path(__file__).parent / "golden" / "generator"
REPOSITORY = Path(__file__).parents[3]
EXECUTABLE = REPOSITORY / "generator" / "virt-dup-generator"


def read_tree(root: Path, placeholder_for: Path) -> dict[str, str]:
    """Every file (text) and symlink ('-> target') below root, by relative path."""
    tree: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            tree[relative] = "-> " + os.readlink(path)
        elif path.is_file():
            tree[relative] = path.read_text().replace(str(placeholder_for), "@INPUT@")
    return tree


def run_generator(tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Run the real executable, as systemd would, on the golden input."""
    config = tmp_path / "virt-dup.yml"
    config.write_text(
        (GOLDEN / "virt-dup.yml").read_text() + f"libvirt:\n  config_dir: {GOLDEN / 'input'}\n"
    )
    output = tmp_path / "normal"
    for name in ("normal", "early", "late"):
        (tmp_path / name).mkdir()
    environment = {"PATH": os.environ["PATH"], "VIRT_DUP_CONFIG": str(config)}
    finished = subprocess.run(
        [
            sys.executable,
            str(EXECUTABLE),
            str(output),
            str(tmp_path / "early"),
            str(tmp_path / "late"),
        ],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    return output, finished


def timers(generated: GeneratedUnits) -> dict[str, str]:
    return {name: text for name, text in generated.files.items() if name.endswith(".timer")}


def test_golden_tree(tmp_path: Path) -> None:
    output, finished = run_generator(tmp_path)
    assert finished.returncode == 0
    produced = read_tree(output, GOLDEN / "input")
    expected_dir = GOLDEN / "expected"
    if os.environ.get("UPDATE_GOLDEN"):
        shutil.rmtree(expected_dir, ignore_errors=True)
        shutil.copytree(output, expected_dir, symlinks=True)
        for path in (p for p in expected_dir.rglob("*") if p.is_file()):
            if not path.is_symlink():
                path.write_text(path.read_text().replace(str(GOLDEN / "input"), "@INPUT@"))
    assert produced == read_tree(expected_dir, GOLDEN / "input")


def test_broken_files_and_jobs_are_skipped_with_a_warning(tmp_path: Path) -> None:
    output, finished = run_generator(tmp_path)
    assert finished.returncode == 0
    warnings = finished.stderr.splitlines()
    assert any("truncated.xml" in line and "not well-formed" in line for line in warnings)
    assert any("broken-job.xml" in line and "never runs" in line for line in warnings)
    assert all(line.startswith("virt-dup-generator: ") for line in warnings)
    # the healthy domains still got their timers
    assert (output / "virt-dup@11111111-2222-4333-8444-555555555555.timer").exists()


def test_hostile_name_cannot_inject_a_directive(tmp_path: Path) -> None:
    output, _finished = run_generator(tmp_path)
    for unit in output.glob("*.timer"):
        for line in unit.read_text().splitlines():
            assert not line.startswith("ExecStartPre"), unit
        description = next(
            line for line in unit.read_text().splitlines() if line.startswith("Description=")
        )
        assert "%i" not in description.replace("%%", "")


def test_default_schedule_applies_and_no_schedule_means_no_timer() -> None:
    domain = b"""<domain><name>vm</name><uuid>5f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61</uuid>
    <metadata><virt-dup:instance xmlns:virt-dup="https://www.github.com/spencerharmon/virt-dup">
    <virt-dup:job/></virt-dup:instance></metadata></domain>"""
    with_default = render_units(
        parse_config('defaults:\n  schedule: "15 4 * * *"\n', Path("c.yml")),
        [("vm.xml", domain)],
    )
    (text,) = timers(with_default).values()
    assert "OnCalendar=*-*-* 04:15:00" in text
    without = render_units(parse_config("", Path("c.yml")), [("vm.xml", domain)])
    assert timers(without) == {} and without.warnings == []


def test_duplicate_job_id_across_domains_is_generated_once() -> None:
    def domain(name: str, domain_uuid: str) -> bytes:
        return f"""<domain><name>{name}</name><uuid>{domain_uuid}</uuid>
        <metadata><virt-dup:instance xmlns:virt-dup="https://www.github.com/spencerharmon/virt-dup">
        <virt-dup:job uuid="11111111-2222-4333-8444-555555555555" schedule="@daily"/>
        </virt-dup:instance></metadata></domain>""".encode()

    generated = render_units(
        parse_config("", Path("c.yml")),
        [
            ("a.xml", domain("a", "5f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61")),
            ("b.xml", domain("b", "6f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61")),
        ],
    )
    assert len(timers(generated)) == 1
    (warning,) = generated.warnings
    assert warning.startswith("a.xml, b.xml: job 11111111-2222-4333-8444-555555555555 is in ")
    assert "domains a, b" in warning and "virt-dup add-job b" in warning


@pytest.mark.parametrize(
    ("text", "escaped"),
    [("vm 100%", "vm 100%%"), ("a\nExecStart=x", "a?ExecStart=x"), ("trail\\", "trail")],
)
def test_escape_unit_text(text: str, escaped: str) -> None:
    assert escape_unit_text(text) == escaped


def test_generated_timers_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    output, _finished = run_generator(tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    for timer in output.glob("*.timer"):
        shutil.copy(timer, units / timer.name)
        service = timer.name.rsplit("@", 1)[0] + "@.service"
        (units / service).write_text("[Service]\nType=oneshot\nExecStart=/bin/true %i\n")
    finished = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(str(t) for t in units.glob("*.timer"))],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stderr == "", finished.stderr


def test_a_manager_of_the_other_scope_gets_no_timers(tmp_path: Path) -> None:
    """User generators run in every user's manager; system jobs are not theirs."""
    config = tmp_path / "virt-dup.yml"
    config.write_text(f"scope: system\nlibvirt:\n  config_dir: {GOLDEN / 'input'}\n")
    output = tmp_path / "normal"
    output.mkdir()
    finished = subprocess.run(
        [sys.executable, str(EXECUTABLE), str(output)],
        env={"PATH": os.environ["PATH"], "VIRT_DUP_CONFIG": str(config), "SYSTEMD_SCOPE": "user"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0
    assert list(output.iterdir()) == []


def test_a_job_beyond_the_policy_gets_no_timer_but_a_warning() -> None:
    def domain(name: str, domain_uuid: str, backend: str) -> bytes:
        return f"""<domain><name>{name}</name><uuid>{domain_uuid}</uuid>
        <metadata><virt-dup:instance xmlns:virt-dup="https://www.github.com/spencerharmon/virt-dup">
        <virt-dup:job schedule="@daily" backends="{backend}"/>
        </virt-dup:instance></metadata></domain>""".encode()

    config = parse_config(
        "backends:\n  local: file:///b\npolicy:\n  allow_job_backend_urls: false\n",
        Path("c.yml"),
    )
    generated = render_units(
        config,
        [
            ("a.xml", domain("a", "5f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61", "local")),
            ("b.xml", domain("b", "6f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61", "file:///elsewhere")),
        ],
    )
    assert len([name for name in generated.files if name.endswith(".timer")]) == 1
    (warning,) = generated.warnings
    assert "b.xml" in warning and "names the backend URL file:///elsewhere" in warning


JOB_ID = "11111111-2222-4333-8444-555555555555"


def domain_with_disks(*disks: str, job: bool = True, name: str = "vm") -> bytes:
    """A domain whose ``disks`` are ``<disk>`` elements' inner XML (source, target...)."""
    devices = "".join(f"<disk type='file' device='disk'>{disk}</disk>" for disk in disks)
    instance = (
        '<metadata><virt-dup:instance xmlns:virt-dup="https://www.github.com/spencerharmon/virt-dup">'
        f'<virt-dup:job uuid="{JOB_ID}" schedule="@daily"/></virt-dup:instance></metadata>'
        if job
        else ""
    )
    return (
        f"<domain><name>{name}</name><uuid>{uuid.uuid4()}</uuid>{instance}"
        f"<devices>{devices}</devices></domain>"
    ).encode()


def writable(generated: GeneratedUnits, unit: str) -> list[str]:
    text = generated.files[f"{unit}.d/50-virt-dup-paths.conf"]
    prefix = "ReadWritePaths="
    return [line.removeprefix(prefix) for line in text.splitlines() if line.startswith(prefix)]


def test_each_jobs_services_may_write_its_disks_backend_keys_and_nothing_else() -> None:
    config = parse_config(
        "backends:\n  here: file:///srv/back%20ups\n  there: sftp://b@h/x\n"
        "defaults:\n  backends: [here]\n"
        "encryption:\n  keys: [ABCD1234]\n  gnupg_home: /etc/virt-dup/gnupg\n"
        "state_dir: /srv/state\n",
        Path("c.yml"),
    )
    domain = domain_with_disks(
        "<driver type='qcow2'/><source file='/srv/vm images/a.qcow2'/><target dev='vda'/>",
        "<driver type='qcow2'/><source file='/var/lib/libvirt/images/b.qcow2'/><target dev='vdb'/>",
        "<driver type='qcow2'/><source file='/var/lib/libvirt/images/c.qcow2'/><target dev='vdc'/>",
    ).replace(
        b"</devices>",
        b"<disk type='file' device='cdrom'><source file='/isos/x.iso'/></disk></devices>",
    )

    generated = render_units(config, [("vm.xml", domain)])

    expected = [
        '"-/srv/vm images"',
        '"-/var/lib/libvirt/images"',
        '"-/srv/state"',
        '"-/etc/virt-dup/gnupg"',
        '"-/srv/back ups"',
    ]
    assert writable(generated, f"virt-dup@{JOB_ID}.service") == expected
    assert writable(generated, f"virt-dup-full@{JOB_ID}.service") == expected
    assert writable(generated, f"virt-dup-verify@{JOB_ID}.service") == [*expected, '"-/var/tmp"']
    # Boot recovery merges disks: their directories and the state, no backend, no keys.
    assert writable(generated, "virt-dup-recover.service") == [*expected[:3]]
    assert generated.warnings == []

    remote = parse_config("defaults:\n  backends: [sftp://b@h/x]\n", Path("c.yml"))
    generated = render_units(remote, [("vm.xml", domain)])
    assert writable(generated, f"virt-dup@{JOB_ID}.service") == [
        '"-/srv/vm images"',
        '"-/var/lib/libvirt/images"',
        f'"-{Path.home()}/.gnupg"',  # GnuPG's own home, of the manager's user
    ]


def test_every_file_destination_of_a_job_is_writable() -> None:
    """A run writes its backup to the first destination and copies it to the others."""
    config = parse_config(
        "backends:\n  here: file:///srv/a\n  there: sftp://b@h/x\n"
        "  also:\n    url: file:///mnt/usb\n    full_retention: 4\n"
        "defaults:\n  backends: [here, there, also]\n",
        Path("c.yml"),
    )
    domain = domain_with_disks("<source file='/srv/vm/a.qcow2'/>")
    generated = render_units(config, [("vm.xml", domain)])
    assert writable(generated, f"virt-dup@{JOB_ID}.service")[-2:] == ['"-/srv/a"', '"-/mnt/usb"']


def test_recovery_may_write_the_disks_of_every_domain_also_those_without_jobs() -> None:
    generated = render_units(
        parse_config("", Path("c.yml")),
        [
            ("a.xml", domain_with_disks("<source file='/a/one.qcow2'/>", name="a")),
            ("b.xml", domain_with_disks("<source file='/b/two.qcow2'/>", job=False, name="b")),
        ],
    )
    assert writable(generated, "virt-dup-recover.service") == ['"-/a"', '"-/b"']


@pytest.mark.parametrize(
    "source",
    [
        "/srv/x&#10;[Service]&#10;ExecStart=/bin/evil/x.qcow2",
        '/srv/a"b/x.qcow2',
        "/srv/a\\\\b/x.qcow2",
        "/x.qcow2",  # its directory is / itself
        "relative/x.qcow2",
    ],
    ids=["newline-directive", "quote", "backslash", "root", "relative"],
)
def test_a_disk_path_that_cannot_be_made_writable_safely_is_left_out_with_a_warning(
    source: str,
) -> None:
    domain = domain_with_disks(
        f"<source file='{source.replace(chr(39), '&apos;')}'/>",
        "<source file='/var/lib/libvirt/images/ok.qcow2'/>",
    )
    generated = render_units(parse_config("", Path("c.yml")), [("vm.xml", domain)])

    for name, text in generated.files.items():
        assert "ExecStart" not in text and "evil" not in text, name
        for line in text.splitlines():
            assert (
                line.startswith(
                    (
                        "#",
                        "[",
                        "ReadWritePaths=",
                        "Description=",
                        "Documentation=",
                        "PartOf=",
                        "OnCalendar=",
                        "Persistent=",
                        "AccuracySec=",
                        "Unit=",
                    )
                )
                or not line
            ), line
    assert writable(generated, f"virt-dup@{JOB_ID}.service") == [
        '"-/var/lib/libvirt/images"',
        f'"-{Path.home()}/.gnupg"',
    ]
    assert f"virt-dup@{JOB_ID}.timer" in generated.files  # the job keeps its timer
    assert any("cannot" in warning for warning in generated.warnings)


def test_a_percent_in_a_disk_path_is_no_specifier() -> None:
    domain = domain_with_disks("<source file='/srv/%h/x.qcow2'/>")
    generated = render_units(parse_config("", Path("c.yml")), [("vm.xml", domain)])
    assert writable(generated, f"virt-dup@{JOB_ID}.service")[0] == '"-/srv/%%h"'


def test_a_fifo_or_a_huge_file_among_the_definitions_is_skipped_not_waited_for(
    tmp_path: Path,
) -> None:
    """A FIFO named *.xml would hang the boot; a link to /dev/zero fill the memory."""
    from virt_dup.systemd.generator import read_domain_files

    directory = tmp_path / "qemu"
    directory.mkdir()
    os.mkfifo(directory / "fifo.xml")
    (directory / "zero.xml").symlink_to("/dev/zero")
    with open(directory / "huge.xml", "wb") as huge:
        huge.truncate(17 * 1024 * 1024)
    (directory / "vm.xml").write_bytes(domain_with_disks("<source file='/a/b.qcow2'/>"))

    files, warnings = read_domain_files(directory)

    assert [name for name, _data in files] == [str(directory / "vm.xml")]
    assert sorted(warnings) == [
        f"skipped {directory / 'fifo.xml'}: not a regular file",
        f"skipped {directory / 'huge.xml'}: larger than 16777216 bytes",
        f"skipped {directory / 'zero.xml'}: not a regular file",
    ]


def test_every_service_of_a_job_names_its_domain_like_its_timer() -> None:
    config = parse_config("", Path("c.yml"))
    xml = (
        b"<domain type='kvm'><name>vm01</name><uuid>5f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61</uuid>"
        b"<metadata><virt-dup:instance xmlns:virt-dup='https://www.github.com/spencerharmon/virt-dup'>"
        b"<virt-dup:job uuid='11111111-2222-4333-8444-555555555555' schedule='0 2 * * *' "
        b"full_schedule='0 3 * * 0' description='mail 50%'><virt-dup:dev>vda</virt-dup:dev>"
        b"</virt-dup:job></virt-dup:instance></metadata></domain>"
    )
    generated = render_units(config, [("vm01.xml", xml)])
    job = "11111111-2222-4333-8444-555555555555"
    descriptions = {
        prefix: generated.files[f"{prefix}@{job}.service.d/40-virt-dup-description.conf"]
        for prefix in ("virt-dup", "virt-dup-full", "virt-dup-verify")
    }
    assert descriptions["virt-dup"].splitlines()[1:] == [
        "[Unit]",
        "Description=virt-dup backup of vm01 (vda): mail 50%%",
    ]
    assert (
        "Description=virt-dup full backup of vm01 (vda): mail 50%%"
        in descriptions["virt-dup-full"].splitlines()
    )
    assert (
        "Description=virt-dup verification of vm01 (vda): mail 50%%"
        in descriptions["virt-dup-verify"].splitlines()
    )
    timer = generated.files[f"virt-dup@{job}.timer"]
    assert "Description=virt-dup backup of vm01 (vda): mail 50%%" in timer.splitlines()
