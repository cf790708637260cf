"""virt-dup under a real systemd manager: install, timers appear, fire, follow every change.

A ``systemd --user`` in a private mount namespace (harness.manager) plays
the service manager; the domains are real ones on ``qemu:///system`` (that
is where libvirtd runs here), so virt-dup.yml says ``scope: user`` (which
manager) and ``libvirt.uri: qemu:///system`` (which hypervisor): two
independent settings.

Every command a user would type runs inside the namespace with the
manager's environment; nothing here reloads the manager by hand.  What the
tests observe is what systemd reports (``systemctl --user show``/
``list-timers``) and the record ``virt-dup run`` leaves in the state dir.

Two test-only drop-ins, written as an admin would (no test branches in
virt-dup):

* ``virt-dup@.timer.d``: ``AccuracySec=1s``.  systemd's default of one
  minute may delay a ``* * * * *`` timer by up to a minute more.
* ``virt-dup@.service.d``/``virt-dup-full@.service.d``: ``ExecCondition=``
  lets only this test's job ids run.  The generator reads every domain in
  /etc/libvirt/qemu, including other tests' domains and their jobs; their
  runs are not this manager's business.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from harness.domains import DomainFactory
from harness.manager import (  # noqa: F401 - fixtures
    UserManager,
    install_system_sandbox,
    unprivileged_user_manager,
    user_manager,
)

from virt_dup import NAMESPACE
from virt_dup.systemd.manager import ServiceManager

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
GENERATOR_DIR = Path("/run/systemd/user-generators")  # inside the namespace
LIBVIRT_CONFIG_DIR = Path("/etc/libvirt/qemu")
#: virt-dup-reload.path -> sync-timers: how long a change may take to reach the timers.
PICKUP_TIMEOUT = 20.0


class Host:
    """The test's host: a user manager with virt-dup installed, and its virt-dup.yml."""

    def __init__(self, manager: UserManager, allowed_jobs: list[str]) -> None:
        self.manager = manager
        self.config = manager.root / "virt-dup.yml"
        self.state = manager.root / "state"
        self.backend = manager.root / "backend"
        self.write_config()
        self.unit_dir = manager.config_home / "systemd" / "user"
        self._write_test_drop_ins(allowed_jobs)

    def write_config(self, extra: str = "") -> None:
        self.config.write_text(
            "scope: user\n"
            "libvirt:\n"
            "  uri: qemu:///system\n"
            f"  config_dir: {LIBVIRT_CONFIG_DIR}\n"
            f"backends:\n  local: file://{self.backend}\n"
            f"state_dir: {self.state}\n"
            f"cache_dir: {self.manager.root / 'cache'}\n" + extra
        )

    def _write_test_drop_ins(self, allowed_jobs: list[str]) -> None:
        accuracy = self.unit_dir / "virt-dup@.timer.d" / "90-test-accuracy.conf"
        accuracy.parent.mkdir(parents=True)
        accuracy.write_text("[Timer]\nAccuracySec=1s\n")
        condition = "case %i in {}) exit 0;; *) exit 1;; esac".format("|".join(allowed_jobs))
        for service in ("virt-dup@.service", "virt-dup-full@.service"):
            drop_in = self.unit_dir / f"{service}.d" / "90-test-only-our-jobs.conf"
            drop_in.parent.mkdir(parents=True)
            drop_in.write_text(f"[Service]\nExecCondition=/bin/sh -c '{condition}'\n")

    def virt_dup(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The installed virt-dup (/opt/virt-dup/bin/virt-dup), inside the namespace."""
        return self.manager.run(
            [self.manager.virt_dup, *args], env={"VIRT_DUP_CONFIG": str(self.config)}, check=check
        )

    def install(self) -> subprocess.CompletedProcess[str]:
        """``install-units --scope user``, then the system manager's sandbox on top
        (harness.manager.install_system_sandbox): the services run as on a host."""
        installed = self.virt_dup(
            "install-units",
            "--scope",
            "user",
            "--unit-dir",
            str(self.unit_dir),
            "--generator-dir",
            str(GENERATOR_DIR),
        )
        install_system_sandbox(self.unit_dir)
        self.manager.systemctl("daemon-reload")
        return installed

    def active_timers(self) -> set[str]:
        """Names of the virt-dup timers ``systemctl --user list-timers`` shows."""
        listing = self.manager.systemctl(
            "list-timers", "--plain", "--no-legend", "virt-dup@*", "virt-dup-full@*"
        ).stdout
        return set(re.findall(r"virt-dup(?:-full)?@[0-9a-f-]{36}\.timer", listing))

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        output = self.manager.systemctl(
            "show", unit, *(f"--property={name}" for name in properties)
        ).stdout
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def has_run(self, unit: str) -> bool:
        started = self.show(unit, "ExecMainStartTimestampMonotonic")
        return started.get("ExecMainStartTimestampMonotonic", "0") not in ("", "0")

    def wait_for_timer(self, timer: str, present: bool = True) -> None:
        what = f"{timer} {'listed' if present else 'gone'} by list-timers"
        self.manager.wait_for(
            what, lambda: (timer in self.active_timers()) == present, PICKUP_TIMEOUT
        )


def virsh(*args: str) -> str:
    argv = ["virsh", "--quiet", "-c", "qemu:///system", *args]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
    return result.stdout


def test_added_job_gets_a_timer_at_once_it_fires_and_runs_the_job(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
) -> None:
    started = time.monotonic()
    job = str(uuid.uuid4())
    host = Host(user_manager, [job])
    installed = host.install()
    assert "started virt-dup.target, virt-dup-reload.path" in installed.stdout
    # The host's layout: units and generator run the copy scripts/install made.
    assert (
        "path=/opt/virt-dup/bin/virt-dup ;"
        in host.show("virt-dup@x.service", "ExecStart")["ExecStart"]
    )
    generator = (GENERATOR_DIR / "virt-dup-generator").as_posix()
    shebang = user_manager.run(["head", "-n", "1", generator]).stdout
    assert shebang == "#!/opt/virt-dup/bin/python\n"
    vm = make_domain()

    added = host.virt_dup(
        "add-job",
        vm.name,
        "--uuid",
        job,
        "--schedule",
        "* * * * *",
        "--backend",
        "local",
        "--encryption",
        "none",
    )

    # At once: no daemon-reload by hand, no waiting.  (add-job's own sync and
    # the one virt-dup-reload.path starts race; either may start the timer.)
    assert added.stdout.strip() == job
    timer = f"virt-dup@{job}.timer"
    assert timer in host.active_timers()
    assert host.show(timer, "PartOf")["PartOf"] == "virt-dup.target"
    with ServiceManager.connect("user", environ=user_manager.env) as manager:
        next_run = manager.next_elapse(timer)
        assert next_run is not None
        assert timedelta(0) < next_run - datetime.now(UTC) <= timedelta(seconds=61)
        assert [unit.active_state for unit in manager.list_units([timer])] == ["active"]

    # It fires at the next minute and the run it starts backs the domain up.
    service = f"virt-dup@{job}.service"
    user_manager.wait_for(
        f"{service} started by its timer",
        lambda: host.has_run(service),
        timeout=75,
    )
    user_manager.wait_for(
        f"{service} finished",
        lambda: host.show(service, "ActiveState")["ActiveState"] in ("failed", "inactive"),
        timeout=120,
    )
    ran = host.show(service, "Result", "ExecMainStatus", "InvocationID")
    assert ran == {"Result": "success", "ExecMainStatus": "0", "InvocationID": ran["InvocationID"]}
    status = json.loads((host.state / "status" / f"{job}.json").read_text())
    assert status["last_success"]["invocation_id"] == ran["InvocationID"]
    assert status["last_success"]["domain"] == vm.name
    assert status["last_success"]["full"] is True
    assert list((host.backend / job).glob("duplicity-full.*.manifest"))
    assert vm.disk_source("vda") == vm.images["vda"][-1]  # merged back
    assert host.show(timer, "LastTriggerUSecMonotonic")["LastTriggerUSecMonotonic"] != "0"

    # A run that fails (its backend is gone from virt-dup.yml) starts the alert unit.
    host.config.write_text(
        host.config.read_text().replace(f"backends:\n  local: file://{host.backend}\n", "")
    )
    host.manager.systemctl("start", service, check=False)
    failed = host.show(service, "Result", "ExecMainStatus")
    assert failed["Result"] == "exit-code" and failed["ExecMainStatus"] != "0"
    alert = f"virt-dup-alert@{service}.service"
    user_manager.wait_for(
        f"{alert} ran",
        lambda: (
            host.show(alert, "Result", "ExecMainStatus", "ActiveState")
            == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}
        ),
        timeout=15,
    )

    host.virt_dup("remove-job", job)

    assert timer not in host.active_timers()
    print(f"end to end in {time.monotonic() - started:.1f}s")


def test_jobs_edited_outside_virt_dup_and_config_changes_reach_the_timers(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
) -> None:
    scheduled, unscheduled = str(uuid.uuid4()), str(uuid.uuid4())
    host = Host(user_manager, [scheduled, unscheduled])
    host.install()
    vm = make_domain(running=False)

    # A job written with virsh alone, into the persistent definition:
    # libvirt rewrites /etc/libvirt/qemu/<vm>.xml, virt-dup-reload.path sees it.
    virsh(
        "metadata",
        vm.name,
        NAMESPACE,
        "--config",
        "--key",
        "virt-dup",
        "--set",
        f'<instance><job uuid="{scheduled}" schedule="0 3 * * *"/>'
        f'<job uuid="{unscheduled}"/></instance>',
    )
    host.wait_for_timer(f"virt-dup@{scheduled}.timer")
    assert f"virt-dup@{unscheduled}.timer" not in host.active_timers()
    timer = f"virt-dup@{scheduled}.timer"
    calendar = host.show(timer, "TimersCalendar")["TimersCalendar"]
    assert "OnCalendar=*-*-* 03:00:00" in calendar

    # Pause: stopping virt-dup.target stops every timer (PartOf=) and the
    # watcher; sync-timers leaves them stopped until the target starts again.
    user_manager.systemctl("stop", "virt-dup.target")
    assert timer not in host.active_timers()
    assert host.show("virt-dup-reload.path", "ActiveState")["ActiveState"] == "inactive"
    synced = host.virt_dup("sync-timers")
    assert "virt-dup.target is not active" in synced.stdout
    assert timer not in host.active_timers()
    user_manager.systemctl("start", "virt-dup.target")
    assert timer in host.active_timers()
    assert host.show("virt-dup-reload.path", "ActiveState")["ActiveState"] == "active"

    # virt-dup.yml gains a default schedule: the job without one gets a timer.
    host.write_config('defaults:\n  schedule: "30 4 * * *"\n')
    host.wait_for_timer(f"virt-dup@{unscheduled}.timer")

    # The jobs go (virsh again): their timers stop.
    virsh("metadata", vm.name, NAMESPACE, "--config", "--remove")
    host.wait_for_timer(f"virt-dup@{scheduled}.timer", present=False)
    host.wait_for_timer(f"virt-dup@{unscheduled}.timer", present=False)

    # Each of those changes went through the watcher: no virt-dup command ran.
    assert host.has_run("virt-dup-reload.service")


def test_the_run_services_sandboxing_works_in_an_unprivileged_user_manager(
    unprivileged_user_manager: UserManager,  # noqa: F811
) -> None:
    """A desktop user's manager has no capabilities: the shared drop-in must
    still start a service; the system-only one must not be installed there."""
    manager = unprivileged_user_manager
    unit_dir = manager.config_home / "systemd" / "user"
    manager.run(
        [
            manager.virt_dup,
            "install-units",
            "--scope",
            "user",
            "--unit-dir",
            str(unit_dir),
            "--generator-dir",
            str(GENERATOR_DIR),
        ],
        as_root=True,  # /run/systemd/user-generators is root's
    )
    assert not list(unit_dir.rglob("45-virt-dup-sandbox-system.conf"))
    # This user cannot run the venv's Python (it is under /root): run a
    # stand-in with exactly the installed unit and drop-ins around it.
    stand_in_text = "[Service]\nExecStart=\nExecStart=/bin/true\n"
    for service in ("virt-dup@.service", "virt-dup-full@.service", "virt-dup-reload.service"):
        stand_in = unit_dir / f"{service}.d" / "90-test-stand-in.conf"
        stand_in.parent.mkdir(exist_ok=True)
        stand_in.write_text(stand_in_text)
        os.chown(stand_in.parent, manager.uid, manager.gid)
        os.chown(stand_in, manager.uid, manager.gid)
    # The system manager's sandbox on one of them only.
    for path in install_system_sandbox(unit_dir, owner=(manager.uid, manager.gid)):
        if not path.parent.name.startswith("virt-dup-full@"):
            path.unlink()
    manager.systemctl("daemon-reload")
    job = str(uuid.uuid4())

    started = manager.systemctl("start", f"virt-dup@{job}.service", check=False)
    full = manager.systemctl("start", f"virt-dup-full@{job}.service", check=False)
    # The watcher's and the alert's sandboxes work there too.
    for unit in ("virt-dup-reload.service", f"virt-dup-alert@virt-dup@{job}.service.service"):
        other = manager.systemctl("start", unit, check=False)
        assert other.returncode == 0, other.stderr + manager.log()

    def show(unit: str) -> dict[str, str]:
        output = manager.systemctl("show", unit, "-p", "Result", "-p", "ExecMainStatus").stdout
        return dict(line.split("=", 1) for line in output.splitlines())

    assert started.returncode == 0, started.stderr + manager.log()
    assert show(f"virt-dup@{job}.service") == {"Result": "success", "ExecMainStatus": "0"}
    # The split is needed: with the system-only settings the start fails
    # (218/CAPABILITIES) before anything runs.
    assert full.returncode != 0
    assert show(f"virt-dup-full@{job}.service") == {
        "Result": "exit-code",
        "ExecMainStatus": "218",
    }


def test_a_run_record_reaches_journald_as_structured_fields(
    user_manager: UserManager,  # noqa: F811
) -> None:
    """virt_dup.journal speaks journald's native protocol when its socket exists.

    No journald runs here; inside the namespace (its own /run/systemd) a
    datagram socket at journald's path receives exactly what journald would.
    """
    script = (
        "import os, socket\n"
        "from virt_dup.systemd import journal\n"
        "os.makedirs('/run/systemd/journal', exist_ok=True)\n"
        "server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "server.bind('/run/systemd/journal/socket')\n"
        "server.settimeout(10)\n"
        "journal.record('backup not implemented yet', priority=journal.PRIORITY_ERR,\n"
        "               JOB_UUID='0e1f2a3b-1111-4222-8333-444455556666', DOMAIN='vm01',\n"
        "               RESULT='not-implemented')\n"
        "print(server.recv(65536).decode())\n"
    )

    received = user_manager.run([sys.executable, "-c", script], as_root=True)

    fields = dict(line.split("=", 1) for line in received.stdout.splitlines() if "=" in line)
    assert fields["MESSAGE"] == "backup not implemented yet"
    assert fields["PRIORITY"] == "3"
    assert fields["JOB_UUID"] == "0e1f2a3b-1111-4222-8333-444455556666"
    assert fields["DOMAIN"] == "vm01"
    assert fields["RESULT"] == "not-implemented"
    assert fields["SYSLOG_IDENTIFIER"] == "virt-dup"
    assert received.stderr == ""  # nothing fell back to stderr


def test_backup_and_verify_decrypt_under_the_system_sandbox_with_keys_under_etc(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
    gpg_home,
    tmp_path: Path,
) -> None:
    """The documented GnuPG home under /etc: read-only under ProtectSystem=
    (gpg-agent cannot make its socket there) unless the job's generated
    drop-in makes it writable.  A backup and a verification started by systemd
    encrypt, sign and decrypt with it; the restore equals the disk."""
    job = str(uuid.uuid4())
    host = Host(user_manager, [job])
    keys = Path("/etc") / f"vdt-gnupg-{job[:8]}"
    shutil.copytree(gpg_home.path, keys, ignore=shutil.ignore_patterns("S.*", "*.lock"))
    try:
        keys.chmod(0o700)
        host.write_config(
            f"encryption:\n  keys: [{gpg_home.fingerprint}]\n"
            f"  sign_key: {gpg_home.fingerprint}\n  gnupg_home: {keys}\n"
        )
        host.install()
        vm = make_domain()
        vm.write_pattern("vda", 0x5A, 3 * 1024 * 1024, 256 * 1024)
        host.virt_dup("add-job", vm.name, "--uuid", job, "--backend", "local")

        for service in (f"virt-dup@{job}.service", f"virt-dup-verify@{job}.service"):
            started = host.manager.systemctl("start", service, check=False)
            assert started.returncode == 0, started.stderr + host.manager.log(80)
            assert host.show(service, "Result", "ExecMainStatus") == {
                "Result": "success",
                "ExecMainStatus": "0",
            }
        sandbox = host.show(f"virt-dup@{job}.service", "ProtectSystem", "ReadWritePaths")
        assert sandbox["ProtectSystem"] == "strict"
        writable = sandbox["ReadWritePaths"].split()
        assert f"-{keys}" in writable and f"-{vm.images['vda'][-1].parent}" in writable
        status = json.loads((host.state / "status" / f"{job}.json").read_text())
        assert status["last_success"]["full"] is True
        assert vm.disk_source("vda") == vm.images["vda"][-1]  # merged back
        volumes = list((host.backend / job).glob("duplicity-full.*.vol1.difftar.gpg"))
        assert volumes, "the backup is encrypted"

        restored = tmp_path / "restored"
        host.virt_dup("restore", vm.name, "--target-dir", str(restored))
        compared = subprocess.run(
            [
                "qemu-img",
                "compare",
                "-U",
                str(vm.images["vda"][-1]),
                str(restored / "vda" / vm.images["vda"][-1].name),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert compared.returncode == 0, compared.stdout + compared.stderr
    finally:
        subprocess.run(["gpgconf", "--homedir", str(keys), "--kill", "all"], check=False)
        shutil.rmtree(keys, ignore_errors=True)
