"""units/ and install-units: what gets written, and that systemd accepts all of it.

``systemd-analyze verify`` (systemd 252, no manager needed) checks the
rendered static units together with what virt-dup-generator makes of a
sample domain, for the system and for a user manager.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from virt_dup.config.load import DEFAULT_PATH, Config, parse_config
from virt_dup.errors import UsageError, VirtDupError
from virt_dup.systemd import journal
from virt_dup.systemd import units as systemd_units
from virt_dup.systemd.generator import render_units, write_units

REPOSITORY = Path(__file__).parents[3]
SYSTEM_DROP_IN = "45-virt-dup-sandbox-system.conf"
JOB = "0e1f2a3b-1111-4222-8333-444455556666"
DOMAIN_UUID = "5e3c7d8a-9b0f-4c1d-a2e3-f40516273849"
SAMPLE_DOMAIN = f"""<domain type='kvm'>
  <name>vm01</name>
  <uuid>{DOMAIN_UUID}</uuid>
  <metadata>
    <virt-dup:instance xmlns:virt-dup="https://www.github.com/spencerharmon/virt-dup">
      <virt-dup:job uuid="{JOB}" schedule="0 2 * * 1-5" full_schedule="0 3 * * 0"
                    verify_schedule="0 5 1 * *"/>
    </virt-dup:instance>
  </metadata>
  <memory unit='KiB'>65536</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm01.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def settings(
    tmp_path: Path,
    scope: str = "system",
    config_path: Path = DEFAULT_PATH,
    command: tuple[str, ...] = ("/usr/bin/virt-dup",),
) -> systemd_units.InstallSettings:
    return systemd_units.InstallSettings(
        scope=scope,
        unit_directory=tmp_path / "units",
        generator_directory=tmp_path / "generators",
        command=command,
        python=sys.executable,
        config_path=config_path,
        config_explicit=config_path != DEFAULT_PATH,
        libvirt_config_directory=Path("/etc/libvirt/qemu"),
    )


def render(install_settings: systemd_units.InstallSettings) -> systemd_units.Installation:
    sources, generator = systemd_units.read_sources(
        systemd_units.data_directory("units"), systemd_units.data_directory("generator")
    )
    return systemd_units.render_installation(install_settings, sources, generator)


def text_of(installation: systemd_units.Installation, path: Path) -> str:
    return installation.files[path][0]


def settings_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


# -- rendering ------------------------------------------------------------------
def test_run_services_run_the_installed_virt_dup_and_alert_on_failure(tmp_path: Path) -> None:
    installation = render(settings(tmp_path))
    unit_dir = tmp_path / "units"

    run = settings_lines(text_of(installation, unit_dir / "virt-dup@.service"))
    full = settings_lines(text_of(installation, unit_dir / "virt-dup-full@.service"))

    assert "ExecStart=/usr/bin/virt-dup run %i" in run
    assert "ExecStart=/usr/bin/virt-dup run --full %i" in full
    for lines in (run, full):
        assert "OnFailure=virt-dup-alert@%n.service" in lines
        assert not any("VIRT_DUP_CONFIG" in line for line in lines)  # default config path
    reload_service = text_of(installation, unit_dir / "virt-dup-reload.service")
    assert "ExecStart=/usr/bin/virt-dup sync-timers" in settings_lines(reload_service)


SANDBOX_DROP_IN = "40-virt-dup-sandbox.conf"
KERNEL_DROP_IN = "44-virt-dup-system.conf"
RUN_DROP_IN = "50-virt-dup-run.conf"
SANDBOXED = (
    "virt-dup@.service",
    "virt-dup-full@.service",
    "virt-dup-verify@.service",
    "virt-dup-recover.service",
)


def test_every_unattended_service_shares_one_sandbox(tmp_path: Path) -> None:
    installation = render(settings(tmp_path, scope="system"))
    unit_dir = tmp_path / "units"

    for drop_in in (SANDBOX_DROP_IN, SYSTEM_DROP_IN):
        texts = {text_of(installation, unit_dir / f"{unit}.d" / drop_in) for unit in SANDBOXED}
        assert len(texts) == 1, drop_in
    shared = settings_lines(text_of(installation, unit_dir / f"{SANDBOXED[0]}.d" / SANDBOX_DROP_IN))
    for expected in (
        "UMask=0077",
        "StateDirectory=virt-dup",
        "CacheDirectory=virt-dup",
        "RuntimeDirectory=virt-dup",  # the domain locks, under ProtectSystem=strict
        "RuntimeDirectoryPreserve=yes",  # shared by every run and recovery
        "NoNewPrivileges=yes",
    ):
        assert expected in shared
    system = settings_lines(text_of(installation, unit_dir / f"{SANDBOXED[0]}.d" / SYSTEM_DROP_IN))
    for expected in (
        "ProtectSystem=strict",
        "ProtectHome=read-only",  # a venv, images, keys in /home or /root stay readable
        "SystemCallFilter=@system-service",
    ):
        assert expected in system
    for service in (*SANDBOXED, "virt-dup-reload.service", "virt-dup-alert@.service"):
        kernel = settings_lines(text_of(installation, unit_dir / f"{service}.d" / KERNEL_DROP_IN))
        assert "ProtectKernelModules=yes" in kernel and "PrivateDevices=yes" in kernel
    # A virt-dup (venv), images or a backend under /tmp must stay reachable.
    assert not any(line.startswith("PrivateTmp=") for line in [*shared, *system])
    assert any(line.startswith("CapabilityBoundingSet=CAP_DAC_OVERRIDE") for line in system)


def test_the_run_services_share_the_run_settings_and_recovery_keeps_its_own(
    tmp_path: Path,
) -> None:
    installation = render(settings(tmp_path, scope="system"))
    unit_dir = tmp_path / "units"

    texts = {text_of(installation, unit_dir / f"{unit}.d" / RUN_DROP_IN) for unit in SANDBOXED[:3]}
    assert len(texts) == 1
    lines = settings_lines(texts.pop())
    for expected in ("Type=oneshot", "TimeoutStartSec=12h", "Nice=10", "IOSchedulingClass=idle"):
        assert expected in lines
    # Recovery merges a domain that runs on an overlay: not at idle I/O priority.
    assert unit_dir / "virt-dup-recover.service.d" / RUN_DROP_IN not in installation.files
    recover = settings_lines(text_of(installation, unit_dir / "virt-dup-recover.service"))
    assert "TimeoutStartSec=2h" in recover


def test_every_virt_dup_service_alerts_on_failure_but_the_alert_itself(tmp_path: Path) -> None:
    installation = render(settings(tmp_path, scope="system"))
    unit_dir = tmp_path / "units"

    for service in systemd_units.SERVICES:
        lines = settings_lines(text_of(installation, unit_dir / service))
        on_failure = [line for line in lines if line.startswith("OnFailure=")]
        if service == "virt-dup-alert@.service":
            assert on_failure == []  # a failed alert never starts another
            assert "ExecStart=/usr/bin/virt-dup alert %i" in lines
            assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK" in lines
            assert not any(line.startswith("PrivateNetwork=") for line in lines)
        else:
            assert on_failure == ["OnFailure=virt-dup-alert@%n.service"], service
    drop_in = unit_dir / "virt-dup-alert@.service.d" / "46-virt-dup-alert-system.conf"
    assert "CapabilityBoundingSet=" in settings_lines(text_of(installation, drop_in))
    user = render(settings(tmp_path, scope="user"))
    assert drop_in not in user.files  # 218/CAPABILITIES in an unprivileged user manager


def test_the_verify_service_verifies(tmp_path: Path) -> None:
    installation = render(settings(tmp_path, scope="system"))

    verify = settings_lines(text_of(installation, tmp_path / "units" / "virt-dup-verify@.service"))

    assert "ExecStart=/usr/bin/virt-dup verify %i" in verify
    assert "OnFailure=virt-dup-alert@%n.service" in verify
    assert systemd_units.is_job_timer(f"virt-dup-verify@{JOB}.timer")


def test_a_user_manager_gets_no_system_only_hardening(tmp_path: Path) -> None:
    installation = render(settings(tmp_path, scope="user"))

    names = {path.name for path in installation.files}

    assert {SANDBOX_DROP_IN, RUN_DROP_IN} <= names
    assert SYSTEM_DROP_IN not in names and KERNEL_DROP_IN not in names


def test_install_units_deletes_the_drop_in_an_earlier_version_installed(tmp_path: Path) -> None:
    old = tmp_path / "units" / "virt-dup@.service.d" / "60-virt-dup-run-system.conf"
    old.parent.mkdir(parents=True)
    old.write_text("[Service]\nProtectSystem=full\n")

    systemd_units.write_installation(render(settings(tmp_path, scope="system")))

    assert not old.exists()
    assert (old.parent / SYSTEM_DROP_IN).is_file()


def test_a_config_file_elsewhere_reaches_services_watcher_and_generator(tmp_path: Path) -> None:
    config = Path("/srv/virt-dup/conf.yml")
    installation = render(settings(tmp_path, config_path=config))
    unit_dir = tmp_path / "units"

    environment = 'Environment="VIRT_DUP_CONFIG=/srv/virt-dup/conf.yml"'
    for service in ("virt-dup@.service", "virt-dup-full@.service", "virt-dup-reload.service"):
        assert environment in settings_lines(text_of(installation, unit_dir / service))
    path_unit = settings_lines(text_of(installation, unit_dir / "virt-dup-reload.path"))
    assert "PathChanged=/srv/virt-dup/conf.yml" in path_unit
    assert "PathChanged=/etc/libvirt/qemu" in path_unit
    generator = text_of(installation, tmp_path / "generators" / "virt-dup-generator")
    assert generator.startswith(f"#!{sys.executable}\n")
    assert "os.environ.setdefault('VIRT_DUP_CONFIG', '/srv/virt-dup/conf.yml')" in generator
    compile(generator, "virt-dup-generator", "exec")
    assert installation.files[tmp_path / "generators" / "virt-dup-generator"][1] == 0o755


def test_the_default_config_is_not_baked_in(tmp_path: Path) -> None:
    installation = render(settings(tmp_path))

    generator = text_of(installation, tmp_path / "generators" / "virt-dup-generator")

    assert "VIRT_DUP_CONFIG" not in generator
    assert generator.startswith(f"#!{sys.executable}\n")


def test_no_placeholder_survives_rendering(tmp_path: Path) -> None:
    for scope in ("system", "user"):
        installation = render(settings(tmp_path, scope=scope, config_path=Path("/x/v.yml")))
        for path, (text, _mode) in installation.files.items():
            for line in settings_lines(text):
                assert not re.search(r"@[A-Z_]+@", line), f"{path}: {line}"


def test_awkward_paths_are_quoted_and_escaped(tmp_path: Path) -> None:
    command = ("/opt/my tools/virt-dup%1$x",)
    installation = render(
        settings(tmp_path, command=command, config_path=Path('/etc/my "vd"/100%.yml'))
    )
    unit_dir = tmp_path / "units"

    run = settings_lines(text_of(installation, unit_dir / "virt-dup@.service"))

    assert 'ExecStart="/opt/my tools/virt-dup%%1$$x" run %i' in run
    assert 'Environment="VIRT_DUP_CONFIG=/etc/my \\"vd\\"/100%%.yml"' in run


def test_a_newline_in_a_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="control characters"):
        render(settings(tmp_path, config_path=Path("/etc/a\nExecStartPre=/bin/evil")))


def test_an_unknown_placeholder_is_an_error() -> None:
    with pytest.raises(VirtDupError, match="@NOPE@"):
        systemd_units.fill_placeholders("[Service]\nExecStart=@NOPE@\n", {}, "x.service")


def test_the_target_and_boot_recovery_are_enabled(tmp_path: Path) -> None:
    installation = render(settings(tmp_path))
    unit_dir = tmp_path / "units"

    assert installation.symlinks == {
        unit_dir / "timers.target.wants" / "virt-dup.target": unit_dir / "virt-dup.target",
        unit_dir / "multi-user.target.wants" / "virt-dup-recover.service": unit_dir
        / "virt-dup-recover.service",
        # the daily freshness check comes and goes with every job's timer
        unit_dir / "virt-dup.target.wants" / "virt-dup-check.timer": unit_dir
        / "virt-dup-check.timer",
    }


def test_boot_recovery_runs_after_libvirt_without_pulling_it_in(tmp_path: Path) -> None:
    config = Path("/srv/virt-dup/conf.yml")
    installation = render(settings(tmp_path, config_path=config))

    lines = settings_lines(text_of(installation, tmp_path / "units" / "virt-dup-recover.service"))

    assert "ExecStart=/usr/bin/virt-dup recover" in lines
    assert 'Environment="VIRT_DUP_CONFIG=/srv/virt-dup/conf.yml"' in lines
    assert "Type=oneshot" in lines
    assert "RemainAfterExit=no" in lines
    (after,) = (line for line in lines if line.startswith("After="))
    assert {"libvirtd.service", "virtqemud.service"} <= set(after.removeprefix("After=").split())
    assert not any(line.startswith(("Wants=", "Requires=", "BindsTo=")) for line in lines)
    assert "WantedBy=multi-user.target" in lines
    # Images may live in /home or on block devices: the merge writes them.
    assert not any(line.startswith(("ProtectHome=", "PrivateDevices=")) for line in lines)


def test_install_writes_files_modes_and_links_and_can_run_twice(tmp_path: Path) -> None:
    installation = render(settings(tmp_path))

    systemd_units.write_installation(installation)
    systemd_units.write_installation(installation)

    for path, (text, mode) in installation.files.items():
        assert path.read_text() == text
        assert path.stat().st_mode & 0o777 == mode
    link = tmp_path / "units" / "timers.target.wants" / "virt-dup.target"
    assert link.resolve() == tmp_path / "units" / "virt-dup.target"
    assert not [path for path in tmp_path.rglob(".*") if path.is_file()]  # no temporaries


def test_templates_are_found_in_the_checkout() -> None:
    assert systemd_units.data_directory("units") == REPOSITORY / "units"
    assert systemd_units.data_directory("generator") == REPOSITORY / "generator"


def test_templates_are_found_where_an_installed_wheel_puts_them(tmp_path: Path) -> None:
    share = Path(sys.prefix) / "share" / "virt-dup" / "units"
    if (share / "virt-dup@.service").exists():
        assert systemd_units.data_directory("units", source_root=tmp_path) == share
    else:
        with pytest.raises(VirtDupError, match="cannot find virt-dup's units/"):
            systemd_units.data_directory("units", source_root=tmp_path)


def test_setup_cfg_ships_every_template() -> None:
    setup = (REPOSITORY / "setup.cfg").read_text()
    assert "share/virt-dup/units = units/*" in setup
    assert "share/virt-dup/generator = generator/virt-dup-generator" in setup


def test_the_virt_dup_command_is_the_one_in_use(tmp_path: Path) -> None:
    executable = tmp_path / "virt-dup"
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)

    assert systemd_units.virt_dup_command(str(executable), which="/usr/bin/virt-dup") == (
        str(executable),
    )
    assert systemd_units.virt_dup_command(
        "/usr/lib/python3/x/__main__.py", which="/usr/bin/virt-dup"
    ) == ("/usr/bin/virt-dup",)


def test_job_timers_are_told_apart_from_other_units() -> None:
    assert systemd_units.is_job_timer(f"virt-dup@{JOB}.timer")
    assert systemd_units.is_job_timer(f"virt-dup-full@{JOB}.timer")
    assert not systemd_units.is_job_timer("virt-dup@.timer")
    assert not systemd_units.is_job_timer("virt-dup@not-a-uuid.timer")
    assert not systemd_units.is_job_timer(f"virt-dup@{JOB}.service")
    assert not systemd_units.is_job_timer("virt-dup-reload.path")


# -- systemd-analyze verify -------------------------------------------------------
def generated_timers(tmp_path: Path, config: Config) -> Path:
    """What virt-dup-generator writes for SAMPLE_DOMAIN, in a directory of its own."""
    output = tmp_path / "generator.out"
    output.mkdir()
    generated = render_units(config, [("vm01.xml", SAMPLE_DOMAIN.encode())])
    assert not generated.warnings
    write_units(generated, output)
    return output


@pytest.mark.parametrize("scope", ["system", "user"])
def test_systemd_analyze_verify_is_clean(tmp_path: Path, scope: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    config = parse_config(f"scope: {scope}\n", tmp_path / "virt-dup.yml")
    install_settings = settings(
        tmp_path, scope=scope, config_path=tmp_path / "virt-dup.yml", command=(sys.executable,)
    )
    systemd_units.write_installation(render(install_settings))
    timers = generated_timers(tmp_path, config)
    assert sorted(path.name for path in timers.glob("*.timer")) == [
        f"virt-dup-full@{JOB}.timer",
        f"virt-dup-verify@{JOB}.timer",
        f"virt-dup@{JOB}.timer",
    ]
    unit_dir = tmp_path / "units"
    # The generated timers, the instances they start (with both drop-ins),
    # the alert the services start on failure, and the static units (boot
    # recovery included).
    to_verify = [
        str(timers / f"virt-dup@{JOB}.timer"),
        str(timers / f"virt-dup-full@{JOB}.timer"),
        str(timers / f"virt-dup-verify@{JOB}.timer"),
        f"virt-dup@{JOB}.service",
        f"virt-dup-full@{JOB}.service",
        f"virt-dup-verify@{JOB}.service",
        f"virt-dup-alert@virt-dup@{JOB}.service.service",
        *(str(unit_dir / name) for name in ("virt-dup.target", "virt-dup-reload.path")),
        str(unit_dir / "virt-dup-reload.service"),
        str(unit_dir / "virt-dup-recover.service"),
    ]
    environment = {
        **os.environ,
        # Ours first, then systemd's own (the trailing colon): timers.target etc.
        "SYSTEMD_UNIT_PATH": f"{unit_dir}:{timers}:",
        # A user-mode verify needs these; nothing is written there.
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "XDG_RUNTIME_DIR": str(tmp_path),
    }
    command = [analyze, "verify", "--man=no", *(["--user"] if scope == "user" else [])]
    result = subprocess.run(
        [*command, *to_verify], capture_output=True, text=True, env=environment, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == ""


def test_systemd_analyze_would_report_a_broken_drop_in(tmp_path: Path) -> None:
    """The clean result above means something: the same check sees a bad setting."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    systemd_units.write_installation(render(settings(tmp_path, command=(sys.executable,))))
    unit_dir = tmp_path / "units"
    drop_in = unit_dir / "virt-dup@.service.d" / "50-virt-dup-run.conf"
    drop_in.write_text(drop_in.read_text() + "NoSuchSetting=1\n")

    result = subprocess.run(
        [analyze, "verify", "--man=no", f"virt-dup@{JOB}.service"],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"},
        check=False,
    )

    assert "NoSuchSetting" in result.stderr


# -- journal ----------------------------------------------------------------------
def test_a_record_without_journald_is_one_line_on_stderr(tmp_path: Path) -> None:
    stream = io.StringIO()

    journal.record(
        "backup not implemented yet\nreally",
        socket=tmp_path / "no-journal-socket",
        stream=stream,
        JOB_UUID=JOB,
        DOMAIN="vm01",
        BYTES=None,
    )

    assert stream.getvalue() == (
        f"virt-dup: backup not implemented yet\\nreally [JOB_UUID={JOB} DOMAIN=vm01]\n"
    )


def test_a_record_refuses_field_names_the_journal_rejects(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="_PID"):
        journal.record("x", socket=tmp_path / "none", stream=io.StringIO(), _PID="1")
    with pytest.raises(ValueError, match="job"):
        journal.record("x", socket=tmp_path / "none", stream=io.StringIO(), job="1")


@pytest.mark.parametrize("unit", ["virt-dup-run.conf", "virt-dup-recover.service"])
def test_stopping_a_unit_never_cuts_a_merge_short(unit: str) -> None:
    """SIGTERM to virt-dup alone (it stops duplicity and merges), and SIGKILL only
    after the merge's own bound."""
    from virt_dup.backup.overlay import MERGE_TIMEOUT_SECONDS

    settings = dict(
        line.split("=", 1)
        for line in (REPOSITORY / "units" / unit).read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert settings["KillMode"] == "mixed"
    minutes = int(settings["TimeoutStopSec"].removesuffix("min"))
    assert minutes * 60 > MERGE_TIMEOUT_SECONDS


# -- systemd-analyze security --------------------------------------------------------
#: The most exposure each installed service may have (systemd-analyze security,
#: system manager); docs/security.md has the figures before and after.  The
#: run services and recovery keep root, the network and the host's users
#: (images of every owner, remote backends); reload keeps root and its
#: capabilities (a daemon-reload needs them); the alert keeps the network.
EXPOSURE_LIMITS = {
    "virt-dup@.service": 3.0,
    "virt-dup-full@.service": 3.0,
    "virt-dup-verify@.service": 3.0,
    "virt-dup-recover.service": 3.0,
    "virt-dup-reload.service": 3.5,
    # It sends over the network now (apprise), but holds no capability.
    "virt-dup-alert@.service": 3.0,
}


def exposure(unit: Path) -> float:
    """The overall exposure ``systemd-analyze security --offline`` gives a unit
    file, with the drop-ins next to it."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@pytest.mark.parametrize("unit", sorted(EXPOSURE_LIMITS))
def test_every_service_is_locked_down(tmp_path: Path, unit: str) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    systemd_units.write_installation(render(settings(tmp_path, command=(sys.executable,))))

    assert exposure(tmp_path / "units" / unit) <= EXPOSURE_LIMITS[unit]


def test_the_exposure_figure_sees_the_sandbox_drop_ins(tmp_path: Path) -> None:
    """The limits above mean something: without the system sandbox the same
    service is far more exposed."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    systemd_units.write_installation(render(settings(tmp_path, command=(sys.executable,))))
    service = tmp_path / "units" / "virt-dup@.service"
    (service.parent / "virt-dup@.service.d" / SYSTEM_DROP_IN).unlink()

    assert exposure(service) > 5.0


def test_install_units_creates_the_state_cache_and_backend_dirs_virt_dup_yml_names(
    tmp_path: Path,
) -> None:
    """systemd creates only StateDirectory=/CacheDirectory=; under
    ProtectSystem=strict a run cannot create another one itself."""
    state, cache = tmp_path / "srv" / "state", tmp_path / "srv" / "cache"
    backend = tmp_path / "srv" / "back ups"
    config = parse_config(
        f"state_dir: {state}\ncache_dir: {cache}\n"
        f"backends:\n  here: file://{str(backend).replace(' ', '%20')}\n  there: sftp://h/x\n",
        tmp_path / "v.yml",
    )
    install_settings = systemd_units.InstallSettings.from_config(
        config,
        scope="system",
        unit_directory=tmp_path / "units",
        generator_directory=tmp_path / "generators",
        command=("/usr/bin/virt-dup",),
    )

    systemd_units.write_installation(render(install_settings))

    assert install_settings.own_directories == (state, cache, backend)
    for directory in (state, cache, backend):
        assert directory.is_dir() and directory.stat().st_mode & 0o777 == 0o700
    defaults = systemd_units.InstallSettings.from_config(parse_config("", tmp_path / "v.yml"))
    assert defaults.own_directories == ()  # systemd makes /var/lib/virt-dup...


def test_install_units_into_a_scratch_root_names_the_hosts_paths(tmp_path: Path) -> None:
    """``install-units --root``: the files land in the tree, and what they say
    (ExecStart=, the generator's interpreter, the config, the wants-links) is
    what the host the tree becomes will see."""
    root = tmp_path / "root"
    config = parse_config(
        "state_dir: /var/lib/vd-state\n", root / "etc" / "virt-dup" / "virt-dup.yml"
    )
    install_settings = systemd_units.InstallSettings.from_config(
        config,
        scope="system",
        command=(str(root / "opt" / "virt-dup" / "bin" / "virt-dup"),),
        python=str(root / "opt" / "virt-dup" / "bin" / "python"),
        root=root,
    )

    systemd_units.write_installation(render(install_settings).under(root))

    service = (root / "etc/systemd/system/virt-dup@.service").read_text()
    assert "ExecStart=/opt/virt-dup/bin/virt-dup run %i" in service
    assert str(root) not in service and 'Environment="VIRT_DUP_CONFIG' not in service
    generator = root / "etc/systemd/system-generators/virt-dup-generator"
    assert generator.read_text().startswith("#!/opt/virt-dup/bin/python\n")
    assert generator.stat().st_mode & 0o777 == 0o755
    link = root / "etc/systemd/system/timers.target.wants/virt-dup.target"
    assert os.readlink(link) == "/etc/systemd/system/virt-dup.target"
    wants = [path for path in root.rglob("*.wants/*") if path.is_symlink()]
    assert wants and all(os.readlink(path).startswith("/etc/systemd/system/") for path in wants)
    assert (root / "var/lib/vd-state").is_dir()
    assert not Path("/var/lib/vd-state").exists()  # nothing outside the tree
    # A word outside the tree (an interpreter on the host) is kept as it is.
    assert systemd_units.inside_root(Path("/usr/bin/python3"), root) == Path("/usr/bin/python3")
    assert systemd_units.inside_root(Path("-m"), root) == Path("-m")
