"""``virt-dup doctor`` on a real host: libvirtd, scratch domains, a systemd user manager.

Each test makes the one thing wrong that it looks for and checks the doctor
names it in one line with a fix, and the exit status a script can use (1:
problems; 0: at most warnings).  The generator and the CLI read every domain
on qemu:///system, other tests' too: findings are picked by what they are
about (this test's job, the cache, systemd), never counted wholesale.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from harness.domains import DomainFactory, ScratchDomain
from harness.manager import UserManager, user_manager  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

VIRT_DUP = Path(sys.executable).parent / "virt-dup"
GENERATOR_DIR = Path("/run/systemd/user-generators")  # inside the namespace


class Host:
    """A user manager (maybe with virt-dup's units) and a virt-dup.yml."""

    def __init__(self, manager: UserManager, extra: str = "") -> None:
        self.manager = manager
        self.config = manager.root / "virt-dup.yml"
        self.backend = manager.root / "backend"
        self.cache = manager.root / "cache"
        self.backend.mkdir()
        self.config.write_text(
            "scope: user\nlibvirt:\n  uri: qemu:///system\n  config_dir: /etc/libvirt/qemu\n"
            f"backends:\n  local: file://{self.backend}\n"
            f"state_dir: {manager.root / 'state'}\ncache_dir: {self.cache}\n"
            "defaults:\n  backends: [local]\n  encryption: none\n" + extra
        )

    def virt_dup(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.manager.run(
            [VIRT_DUP, *args], env={"VIRT_DUP_CONFIG": str(self.config)}, check=check
        )

    def install(self) -> None:
        self.virt_dup(
            "install-units",
            "--scope",
            "user",
            "--unit-dir",
            str(self.manager.config_home / "systemd" / "user"),
            "--generator-dir",
            str(GENERATOR_DIR),
        )

    def doctor(self) -> tuple[int, list[dict[str, str]], str]:
        """(exit status, findings, the text output)."""
        text = self.virt_dup("doctor", check=False)
        document = self.virt_dup("doctor", "--json", check=False)
        assert document.returncode == text.returncode, document.stderr
        parsed = json.loads(document.stdout)
        assert parsed["schema"] == "virt-dup/doctor/1"
        lines = text.stdout.splitlines()
        assert len(lines) == len(parsed["findings"]), text.stdout  # one line each
        return text.returncode, parsed["findings"], text.stdout


def about(findings: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    return [finding for finding in findings if text in finding["subject"]]


def problems(findings: list[dict[str, str]]) -> list[dict[str, str]]:
    return [finding for finding in findings if finding["severity"] == "problem"]


def add_raw_disk(vm: ScratchDomain, target: str) -> Path:
    """A raw image as a second disk of the (shut off) domain's definition."""
    image = vm.directory / f"{target}.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "16M"], check=True)
    import libvirt

    vm.domain.attachDeviceFlags(
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{image}'/><target dev='{target}' bus='virtio'/></disk>",
        libvirt.VIR_DOMAIN_AFFECT_CONFIG,
    )
    return image


def test_a_healthy_job_has_no_problem_and_units_not_installed_are_one(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
) -> None:
    host = Host(user_manager)
    vm = make_domain()
    job = host.virt_dup("add-job", vm.name, "--schedule", "0 3 * * *").stdout.strip()

    status, findings, text = host.doctor()

    # Nothing installed yet: one problem, with the command that fixes it.
    (units,) = [f for f in problems(findings) if "not installed" in f["message"]]
    assert units["subject"] == "systemd" and units["fix"] == "virt-dup install-units --scope user"
    assert status == 1
    assert "problem: systemd: virt-dup's units are not installed" in text

    host.install()
    host.virt_dup("sync-timers")
    status, findings, text = host.doctor()

    mine = about(findings, job)
    assert problems(mine) == [], text
    # no guest agent in the scratch domain: a warning, and what it means
    (agent,) = mine
    assert agent["severity"] == "warning" and "crash-consistent" in agent["message"]
    assert not problems(about(findings, "systemd")) and not problems(about(findings, "cache"))


def test_a_raw_disk_is_named_skipped_or_refused(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
) -> None:
    host = Host(user_manager)
    vm = make_domain(running=False)
    raw = add_raw_disk(vm, "vdb")
    every_disk = host.virt_dup("add-job", vm.name).stdout.strip()
    only_raw = host.virt_dup("add-job", vm.name, "--dev", "vdb", check=False)

    _status, findings, _text = host.doctor()

    (skipped,) = about(findings, every_disk)
    assert skipped["severity"] == "warning"
    assert "disk vdb (raw) is not backed up" in skipped["message"]
    assert str(raw) in skipped["fix"]
    if only_raw.returncode == 0:  # add-job may already refuse it; then the doctor never sees it
        (refused,) = about(findings, only_raw.stdout.strip())
        assert refused["severity"] == "problem" and "not a qcow2 file (raw)" in refused["message"]


def test_a_full_cache_file_system_is_a_problem(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
) -> None:
    host = Host(user_manager)
    host.cache.mkdir()
    # inside the manager's namespace, where the doctor runs (and the mount dies with it)
    host.manager.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", host.cache], as_root=True)
    try:
        status, findings, text = host.doctor()
    finally:
        host.manager.run(["umount", host.cache], as_root=True)

    (cache,) = about(findings, "cache")
    assert cache["severity"] == "problem", text
    assert str(host.cache) in cache["message"] and "free" in cache["message"]
    assert status == 1


def test_a_scheduled_job_without_an_active_timer_and_one_only_in_the_live_xml(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
) -> None:
    host = Host(user_manager)
    host.install()
    vm = make_domain()
    job = host.virt_dup("add-job", vm.name, "--schedule", "0 3 * * *").stdout.strip()
    # The watcher would start the timer again (it syncs after every XML change).
    host.manager.systemctl("stop", "virt-dup-reload.path")
    host.manager.wait_for(
        "virt-dup-reload.service finished",
        lambda: (
            "ActiveState=inactive"
            in host.manager.systemctl("show", "-p", "ActiveState", "virt-dup-reload.service").stdout
        ),
        timeout=30,
    )
    host.manager.systemctl("stop", f"virt-dup@{job}.timer")

    _status, findings, _text = host.doctor()

    (stopped,) = [f for f in problems(about(findings, job)) if "is not active" in f["message"]]
    assert stopped["fix"] == "virt-dup sync-timers"

    # A job written into the live definition only: the CLI sees it, the generator cannot.
    live_only = str(uuid.uuid4())
    subprocess.run(
        [
            "virsh",
            "-q",
            "-c",
            "qemu:///system",
            "metadata",
            vm.name,
            "--live",
            "--uri",
            "https://www.github.com/spencerharmon/virt-dup",
            "--key",
            "virt-dup",
            "--set",
            f'<instance><job uuid="{job}" schedule="0 3 * * *"/>'
            f'<job uuid="{live_only}" schedule="0 4 * * *"/></instance>',
        ],
        check=True,
        capture_output=True,
    )
    _status, findings, _text = host.doctor()

    (unseen,) = [
        f for f in problems(about(findings, live_only)) if "persistent definition" in f["message"]
    ]
    assert "the generator" in unseen["message"]


def test_a_missing_key_and_an_unreachable_backend_are_problems(
    user_manager: UserManager,  # noqa: F811
) -> None:
    """check-config's own proofs, as the doctor's first findings."""
    host = Host(user_manager, "encryption:\n  keys: [0123456789ABCDEF0123456789ABCDEF01234567]\n")
    host.config.write_text(
        host.config.read_text()
        .replace("  encryption: none\n", "")
        .replace("backends:\n", "backends:\n  away: sftp://backup:pw-3f9@127.0.0.1:1/x\n")
    )

    status, findings, text = host.doctor()

    configuration = [f["message"] for f in problems(about(findings, "configuration"))]
    assert any(
        "0123456789ABCDEF0123456789ABCDEF01234567" in message and "virt-dup init" in message
        for message in configuration
    ), text
    assert any("sftp://backup:***@127.0.0.1:1/x" in message for message in configuration), text
    assert "pw-3f9" not in text
    assert status == 1
