"""What an admin reads about a job under a real systemd manager and a real journald.

The user manager of harness.manager (private mount namespace, the session's
installation on /opt/virt-dup, the system sandbox on the units) with a
journald of its own (``UserManager.journald()``); the domain is a real one
on ``qemu:///system``.  What is asserted is what ``systemctl --user show``,
``list-timers``/``list-units`` and ``journalctl`` print there.

journald sees the harness cgroup as no user slice, so ``journalctl -u``
cannot match its units here: a service's own output is found by
``_SYSTEMD_CGROUP`` (ending in the unit's name), as test_quick_start.py does.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from harness.domains import DomainFactory
from harness.manager import UserManager, user_manager  # noqa: F401 - fixture
from test_systemd_e2e import Host

from virt_dup.systemd import journal

pytestmark = pytest.mark.integration


def journal_entries(manager: UserManager, *matches: str) -> list[dict[str, Any]]:
    """``journalctl -o json [MATCHES]`` in the namespace, parsed."""
    done = manager.run(["journalctl", "--no-pager", "-o", "json", *matches], check=False)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def service_messages(manager: UserManager, unit: str) -> list[str]:
    """Every MESSAGE the service logged, records and stdout/stderr alike."""
    return [
        str(entry.get("MESSAGE"))
        for entry in journal_entries(manager)
        if str(entry.get("_SYSTEMD_CGROUP", "")).endswith(f"/{unit}")
    ]


def test_a_run_under_systemd_names_its_domain_and_logs_one_filterable_record(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
) -> None:
    manager = user_manager
    job = str(uuid.uuid4())
    host = Host(manager, [job])
    host.install()
    vm = make_domain()
    service = f"virt-dup@{job}.service"
    with manager.journald():
        host.virt_dup(
            "add-job",
            vm.name,
            "--uuid",
            job,
            "--schedule",
            "0 2 * * *",
            "--full-schedule",
            "0 3 * * 0",
            "--verify-schedule",
            "0 4 1 * *",
            "--backend",
            "local",
            "--encryption",
            "none",
            "--description",
            "mail server",
        )

        # Names an admin can read: each service says which VM, like its timer.
        for prefix, what in (
            ("virt-dup", "backup"),
            ("virt-dup-full", "full backup"),
            ("virt-dup-verify", "verification"),
        ):
            for unit in (f"{prefix}@{job}.service", f"{prefix}@{job}.timer"):
                described = host.show(unit, "Description")["Description"]
                assert (
                    described == f"virt-dup {what} of {vm.name} (all qcow2 disks): mail server"
                ), unit
        # One pattern lists every timer of the job, full and verify ones too.
        listed = manager.systemctl("list-timers", "--all", "--no-legend", "virt-dup*").stdout
        for prefix in ("virt-dup", "virt-dup-full", "virt-dup-verify"):
            assert f"{prefix}@{job}.timer" in listed, listed
        units = manager.systemctl("list-units", "--all", "--no-legend", "virt-dup*").stdout
        assert f"virt-dup backup of {vm.name} (all qcow2 disks): mail server" in units, units

        # A run under systemd: one record, found by journalctl -t virt-dup JOB_UUID=...
        manager.systemctl("start", service)
        (done,) = journal_entries(manager, "-t", "virt-dup", f"JOB_UUID={job}")
        assert done["MESSAGE_ID"] == journal.MESSAGE_BACKUP_DONE
        assert done["ACTION"] == "backup"
        assert done["RESULT"] == "success"
        assert done["DOMAIN"] == vm.name
        assert done["BACKUP_TYPE"] == "full"
        assert done["PRIORITY"] == str(journal.PRIORITY_INFO)
        assert f"full backup of {', '.join(vm.images)} done" in done["MESSAGE"]
        assert journal_entries(manager, "-t", "virt-dup", f"DOMAIN={vm.name}") == [done]
        # The summary reaches the journal once: not again through the service's stdout.
        summaries = [m for m in service_messages(manager, service) if "backup of" in m]
        assert summaries == [done["MESSAGE"]], summaries

        # A failed run: its own MESSAGE_ID, an error priority, and its line once too.
        host.write_config()
        host.config.write_text(
            host.config.read_text().replace(f"backends:\n  local: file://{host.backend}\n", "")
        )
        manager.systemctl("start", service, check=False)
        (failed,) = journal_entries(
            manager,
            "-t",
            "virt-dup",
            f"JOB_UUID={job}",
            f"MESSAGE_ID={journal.MESSAGE_BACKUP_FAILED}",
        )
        assert failed["RESULT"] == "failed"
        assert failed["ACTION"] == "backup"
        assert failed["DOMAIN"] == vm.name
        assert failed["PRIORITY"] == str(journal.PRIORITY_ERR)
        assert journal_entries(manager, "-t", "virt-dup", f"DOMAIN={vm.name}", "RESULT=failed") == [
            failed
        ]
        cause = failed["MESSAGE"].rsplit(": failed: ", 1)[1]
        mentions = [m for m in service_messages(manager, service) if cause in m]
        assert mentions == [failed["MESSAGE"]], mentions
    host.virt_dup("remove-job", job)
