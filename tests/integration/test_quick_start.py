"""The README's quick start, line by line, on the installed layout in a real systemd manager.

The stand-in host: root's user manager in a private mount namespace with
the session's installation on /opt/virt-dup (harness.install), a journald
of its own, and the real libvirtd with a scratch domain for ``vm01``.  Each
README line runs there, in the README's order, with these translations:

* ``./scripts/install``: the session's ``scripts/install --root`` tree
  (``test_install.py`` checks that install itself, files and modes);
* ``editor /etc/virt-dup/virt-dup.yml``: the installed example with its
  backend pointed at a scratch directory and what the stand-in needs
  (``scope: user``: a user manager plays PID 1; state and cache in the
  manager's directory: the host's /var/lib is not the test's);
* ``virt-dup init``: on a terminal (a pty), the passphrase typed twice;
* ``systemctl``: ``systemctl --user``;
* ``journalctl -u UNIT``: the entries whose ``_SYSTEMD_CGROUP`` ends in the
  unit (the harness cgroup is no user slice, so journald sets no unit field);
* ``vm01``: the scratch domain; ``JOB_UUID``: what ``add-job`` printed;
  ``/var/lib/libvirt/images/vm01-restored``: a directory of the test.

A README line that no step here knows fails the test: the quick start
cannot grow a command no test runs.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from harness.domains import DomainFactory
from harness.install import VIRT_DUP, Installation
from harness.manager import UserManager, user_manager  # noqa: F401 - fixture
from harness.terminal import on_terminal
from ruamel.yaml import YAML

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
GENERATOR_DIR = Path("/run/systemd/user-generators")
PASSPHRASE = "quick start passphrase"


def quick_start_lines() -> list[str]:
    """The commands of the README's quick start block, comments dropped."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    block = section[section.index("```sh\n") + len("```sh\n") : section.index("```\n", 6)]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_quick_start_works_on_the_installed_layout(
    user_manager: UserManager,  # noqa: F811
    installation: Installation,
    make_domain: DomainFactory,
    tmp_path: Path,
) -> None:
    manager = user_manager
    vm = make_domain()
    config = manager.root / "virt-dup.yml"
    backend = manager.root / "backups"
    restored = tmp_path / "vm01-restored"
    environment = {"VIRT_DUP_CONFIG": str(config)}
    job = ""

    def virt_dup(*args: str) -> subprocess.CompletedProcess[str]:
        return manager.run([VIRT_DUP, *args], env=environment, check=False)

    def words(line: str) -> list[str]:
        text = line.replace("vm01-restored", "VM01RESTORED").replace("vm01", vm.name)
        text = text.replace("JOB_UUID", job)
        text = text.replace("/var/lib/libvirt/images/VM01RESTORED", str(restored))
        return [word.strip("'") for word in re.findall(r"'[^']*'|\S+", text)]

    lines = quick_start_lines()
    assert lines[0] == "./scripts/install"
    with manager.journald():
        for line in lines:
            argv = words(line)
            print(f"$ {line}")
            if line == "./scripts/install":
                assert manager.run(["test", "-x", VIRT_DUP], check=False).returncode == 0
                example = installation.path("/etc/virt-dup/virt-dup.yml").read_text()
                config.write_text(example)
                # install-units as scripts/install runs it on a host (there: --scope system)
                done = virt_dup(
                    "install-units",
                    "--scope",
                    "user",
                    "--unit-dir",
                    str(manager.config_home / "systemd" / "user"),
                    "--generator-dir",
                    str(GENERATOR_DIR),
                )
                assert done.returncode == 0, done.stderr
            elif argv[0] == "editor":
                yaml = YAML()  # round trip: what an editor leaves alone stays
                document = yaml.load(config.read_text())
                document["backends"]["local"] = f"file://{backend}"
                document["scope"] = "user"
                document["libvirt"]["uri"] = "qemu:///system"
                document["state_dir"] = str(manager.root / "state")
                document["cache_dir"] = str(manager.root / "cache")
                with config.open("w") as stream:
                    yaml.dump(document, stream)
            elif argv[:2] == ["virt-dup", "init"]:
                status, output = on_terminal(
                    [
                        "nsenter",
                        f"--target={manager.pid}",
                        "--mount",
                        "--",
                        str(VIRT_DUP),
                        *argv[1:],
                    ],
                    {**manager.env, **environment},
                    [PASSPHRASE, PASSPHRASE],
                )
                assert status == 0, output
                assert "export-key" in output  # told, once, to get the key off the host
                assert PASSPHRASE not in output
            elif argv[:2] == ["virt-dup", "export-key"]:
                exported = tmp_path / "virt-dup-key.asc"
                done = virt_dup("export-key", "--output", str(exported))
                assert done.returncode == 0, done.stderr
                assert "PRIVATE KEY BLOCK" in exported.read_text()
                assert exported.stat().st_mode & 0o777 == 0o600
            elif argv[:2] == ["virt-dup", "add-job"]:
                done = virt_dup(*argv[1:])
                assert done.returncode == 0, done.stderr
                job = done.stdout.strip()
                assert re.fullmatch(r"[0-9a-f-]{36}", job)
            elif argv[:2] == ["virt-dup", "doctor"]:
                done = virt_dup("doctor", "--json")
                findings = json.loads(done.stdout)["findings"]
                mine = [
                    f
                    for f in findings
                    if job in f["subject"]
                    or f["subject"] in ("configuration", "cache", "systemd", "libvirt")
                ]
                assert not [f for f in mine if f["severity"] == "problem"], done.stdout
            elif argv[0] == "systemctl":
                done = manager.run(["systemctl", "--user", "--no-pager", *argv[1:]], check=False)
                assert done.returncode == 0, done.stdout + done.stderr + manager.log()
                if argv[1] == "list-timers":
                    assert f"virt-dup@{job}.timer" in done.stdout
            elif argv[0] == "journalctl":
                unit = argv[argv.index("-u") + 1]
                done = manager.run(["journalctl", "--no-pager", "-o", "json"], check=False)
                entries = [json.loads(entry) for entry in done.stdout.splitlines() if entry]
                messages = [
                    str(entry.get("MESSAGE"))
                    for entry in entries
                    if str(entry.get("_SYSTEMD_CGROUP", "")).endswith(f"/{unit}")
                ]
                assert any("full backup of vda done" in message for message in messages), messages
                records = [entry for entry in entries if entry.get("JOB_UUID") == job]
                assert records and records[-1]["RESULT"] == "success"
            elif argv[0] == "virt-dup":
                done = virt_dup(*argv[1:])
                assert done.returncode == 0, done.stdout + done.stderr
                if argv[1] == "backups":
                    assert "full" in done.stdout
            else:
                pytest.fail(f"the README's quick start has a line no test step runs: {line}")

    top = vm.images["vda"][-1]
    compared = subprocess.run(
        ["qemu-img", "compare", "-U", str(top), str(restored / "vda" / top.name)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert vm.disk_source("vda") == top  # the domain runs on its own disk again
