"""virt-dup end to end on a throw-away domain (run by scripts/demo, as root).

1. a domain with the chain base.qcow2 <- demo.qcow2 (data in both), running;
2. a virt-dup.yml with a file:// backend, a throw-away GPG key;
3. virt-dup installed as on a host: `scripts/install --root` into a scratch
   tree, whose /opt/virt-dup is mounted on /opt/virt-dup for the manager
   only; a real systemd manager (a user manager in a private mount
   namespace, the same recipe the tests use: this machine does not boot with
   systemd), the installed copy's units and generator put into it with its
   own `install-units`, the system manager's sandbox (ProtectSystem=strict...)
   on top;
4. `virt-dup add-job` with a schedule of every minute: the timer appears at
   once (named after the domain), fires, and its service backs the domain
   up (encrypted, full); a journald of the manager's own records it, once;
5. the guest writes (QEMU's HMP `qemu-io` through its own virtio disk), and
   the timer's next firing makes an incremental that holds the write, reading
   only the clusters written (changed blocks: `READ=changes` in the journal);
6. what an admin sees: `virt-dup status` (next run, last success and its
   age, freshness), every virt-dup timer, the journal records by `JOB_UUID=`;
7. a forced failure (the job's backend taken out of virt-dup.yml): the
   failure record, the service failed under its domain's name, the alert unit started by
   `OnFailure=`, and the alert it sends through apprise reaching a local
   webhook on 127.0.0.1 with the domain, the job and the error line;
8. `virt-dup backups` lists both backups; `virt-dup restore --target-dir`
   rebuilds the chain, which must equal the domain's disk in guest view
   (`qemu-img compare`, with the guest's write) — the demo fails loudly
   otherwise;
9. everything made is removed, also when a step fails.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import libvirt

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests" / "integration"))

from harness.domains import ScratchDomain  # noqa: E402
from harness.install import VIRT_DUP, install_tree  # noqa: E402
from harness.manager import (  # noqa: E402
    UserManager,
    install_system_sandbox,
    start_user_manager,
)

NAMESPACE = "https://www.github.com/spencerharmon/virt-dup"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    print("$ " + " ".join(str(a) for a in argv), flush=True)
    result = subprocess.run(argv, text=True, capture_output=True, **kwargs)
    print(result.stdout + result.stderr, end="", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"demo: {argv[0]} failed with exit code {result.returncode}")
    return result


def virsh(*args: str) -> str:
    return subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], check=True, capture_output=True, text=True
    ).stdout


def make_domain(name: str, images: Path) -> Path:
    images.mkdir(mode=0o755)
    base, top = images / "base.qcow2", images / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "128M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x2a 0 16M", base],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top], check=True
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 8M 16M", top],
        check=True,
        capture_output=True,
    )
    domain_type = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
    xml = images / "domain.xml"
    xml.write_text(
        f"""<domain type='{domain_type}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{top}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""
    )
    virsh("define", str(xml))
    virsh("start", name)
    return top


def make_gpg_key(home: Path) -> str:
    gpg = ["gpg", "--homedir", str(home), "--batch"]
    subprocess.run(
        [
            *gpg,
            "--passphrase",
            "",
            "--quick-gen-key",
            "demo <demo@example.invalid>",
            "default",
            "default",
            "never",
        ],
        check=True,
        capture_output=True,
    )
    listing = subprocess.run(
        [*gpg, "--with-colons", "--list-secret-keys"], check=True, capture_output=True, text=True
    ).stdout
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


def start_webhook(cleanup: ExitStack) -> tuple[list[bytes], int]:
    """A local HTTP receiver on 127.0.0.1 for the alerts: (the bodies it got, its port)."""
    received: list[bytes] = []

    class Webhook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cleanup.callback(server.server_close)
    cleanup.callback(server.shutdown)
    return received, server.server_address[1]


def show_alert(webhook: list[bytes], name: str, job: str) -> None:
    """The alert the webhook got; exits the demo when none came in 30 s or it
    does not name the domain and the job."""
    deadline = time.monotonic() + 30
    while not webhook and time.monotonic() < deadline:
        time.sleep(0.5)
    if not webhook:
        raise SystemExit("demo: the alert did not reach the local webhook")
    message = json.loads(webhook[0])
    print(f"the webhook on 127.0.0.1 got: {message['title']}")
    print(message["message"], end="")
    if name not in message["message"] or job not in message["message"]:
        raise SystemExit("demo: the alert does not name the domain and the job")


def unit_state(manager: UserManager, unit: str) -> dict[str, str]:
    output = manager.systemctl(
        "show", unit, "-p", "ActiveState", "-p", "Result", "-p", "ExecMainStartTimestampMonotonic"
    ).stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def wait_for_run(manager: UserManager, unit: str, after: str = "0") -> dict[str, str]:
    """The unit's state once a run that started after ``after`` (a monotonic
    start timestamp) has finished; exits the demo when none does in 200 s."""
    deadline = time.monotonic() + 200
    while True:
        state = unit_state(manager, unit)
        started = state.get("ExecMainStartTimestampMonotonic", "0")
        if started not in ("", "0", after) and state.get("ActiveState") in ("inactive", "failed"):
            return state
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: {unit} did not run within 200 s: {state}")
        time.sleep(1)


def main() -> int:
    name = f"virt-dup-demo-{secrets.token_hex(4)}"
    images = Path("/var/lib/libvirt/images") / name
    with ExitStack() as cleanup:
        # Beside the images, where a real host keeps its state.
        work = Path(tempfile.mkdtemp(prefix="virt-dup-demo-", dir="/var/lib"))
        cleanup.callback(shutil.rmtree, work, True)
        # a short path: gpg-agent puts its socket in the home
        gnupg = Path(tempfile.mkdtemp(prefix="vd-demo-gpg-", dir="/run"))
        cleanup.callback(shutil.rmtree, gnupg, True)
        cleanup.callback(
            subprocess.run, ["gpgconf", "--homedir", str(gnupg), "--kill", "all"], check=False
        )

        webhook, webhook_port = start_webhook(cleanup)

        step(f"A throw-away domain {name}: base.qcow2 <- {name}.qcow2, running")
        cleanup.callback(shutil.rmtree, images, True)
        cleanup.callback(
            subprocess.run,
            ["virsh", "-q", "undefine", "--checkpoints-metadata", name],
            capture_output=True,
        )
        cleanup.callback(subprocess.run, ["virsh", "-q", "destroy", name], capture_output=True)
        top = make_domain(name, images)
        print(virsh("domblklist", name), end="")

        step("virt-dup.yml: a file:// backend, a GPG key (throw-away), state and cache")
        fingerprint = make_gpg_key(gnupg)
        config = work / "virt-dup.yml"
        config.write_text(
            "scope: user  # this demo's systemd is a user manager; libvirt is the system's\n"
            "libvirt:\n  uri: qemu:///system\n"
            f"backends:\n  local: file://{work}/backend\n"
            f"encryption:\n  keys: [{fingerprint}]\n  gnupg_home: {gnupg}\n"
            f"state_dir: {work}/state\ncache_dir: {work}/cache\n"
            f"alerts:\n  urls: [json://127.0.0.1:{webhook_port}/alert]\n  events: [failure]\n"
        )
        print(config.read_text(), end="")

        step("Install virt-dup as on a host: scripts/install --root (into a scratch tree)")
        tree = Path(tempfile.mkdtemp(prefix="virt-dup-demo-root-"))
        cleanup.callback(shutil.rmtree, tree, True)
        print(f"$ scripts/install --root {tree}", flush=True)
        installation = install_tree(tree)
        print(installation.output, end="", flush=True)

        step("A systemd manager (user manager, private mount namespace) with /opt/virt-dup")
        manager: UserManager = start_user_manager(Path("/run"), installation=installation)
        cleanup.callback(manager.stop)
        environment = {"VIRT_DUP_CONFIG": str(config)}

        def on_host(
            *argv: str, ok_codes: tuple[int, ...] = (0,)
        ) -> subprocess.CompletedProcess[str]:
            print("$ " + " ".join(argv), flush=True)
            result = manager.run(list(argv), env=environment, check=False)
            print(result.stdout + result.stderr, end="", flush=True)
            if result.returncode not in ok_codes:
                raise SystemExit(f"demo: {argv[0]} failed with exit code {result.returncode}")
            return result

        unit_dir = manager.config_home / "systemd" / "user"
        on_host(
            str(VIRT_DUP),
            "install-units",
            "--scope",
            "user",
            "--unit-dir",
            str(unit_dir),
            "--generator-dir",
            "/run/systemd/user-generators",
        )
        # What --scope system adds (ProtectSystem=strict, capabilities, system
        # call filter): root's user manager applies it as PID 1 would.
        for path in install_system_sandbox(unit_dir):
            print(f"(the system manager's sandbox) {path}")
        on_host("systemctl", "--user", "daemon-reload")

        # The manager's own journald: what `journalctl` shows on a host.
        cleanup.enter_context(manager.journald())

        step("Add a job that runs every minute; its timer exists at once, named after the VM")
        job = on_host(
            str(VIRT_DUP),
            "add-job",
            name,
            "--schedule",
            "* * * * *",
            "--backend",
            "local",
            "--description",
            "demo",
        ).stdout.strip()
        service = f"virt-dup@{job}.service"
        on_host("systemctl", "--user", "list-timers", "virt-dup*")
        on_host("systemctl", "--user", "show", "-p", "Description", service)

        def journal_records(*matches: str) -> list[str]:
            shown = on_host(
                "journalctl", "--no-pager", "-t", "virt-dup", f"JOB_UUID={job}", *matches
            )
            return [line for line in shown.stdout.splitlines() if "virt-dup" in line]

        step("Wait for the timer to fire: a full backup")
        first = wait_for_run(manager, service)
        if first.get("Result") != "success":
            print(manager.log(400))
            raise SystemExit(f"demo: {service} failed: {first}")
        # status exits 3 for a unit that is not running: a finished oneshot
        on_host("systemctl", "--user", "status", "--no-pager", "-n", "0", service, ok_codes=(0, 3))
        if len(journal_records("BACKUP_TYPE=full")) != 1:
            raise SystemExit("demo: the full backup is not in the journal exactly once")

        step("The guest writes 4 MiB (through its own virtio disk, as a guest would)")
        connection = libvirt.open("qemu:///system")
        cleanup.callback(connection.close)
        guest = ScratchDomain(name, "", connection.lookupByName(name), images, {"vda": (top,)})
        print("qemu-io: write -P 0x77 64M 4M on vda", flush=True)
        guest.write_pattern("vda", 0x77, 64 * 2**20, 4 * 2**20)

        step("Wait for the timer's next firing: an incremental backup")
        second = wait_for_run(manager, service, first["ExecMainStartTimestampMonotonic"])
        if second.get("Result") != "success":
            print(manager.log(400))
            raise SystemExit(f"demo: {service} failed: {second}")
        # Changed blocks (the default): it read only what the guest wrote.
        if len(journal_records("BACKUP_TYPE=incremental", "READ=changes")) < 1:
            raise SystemExit("demo: no changed-block incremental backup in the journal")
        # Nothing more by timer: what follows must see these two backups.
        on_host("systemctl", "--user", "stop", f"virt-dup@{job}.timer")

        step("What an admin sees: the jobs, every virt-dup timer, the journal")
        on_host(str(VIRT_DUP), "status", name)
        on_host("systemctl", "--user", "list-timers", "--all", "virt-dup*")
        journal_records("-o", "verbose", "--output-fields=MESSAGE_ID,ACTION,RESULT,DOMAIN")

        step("A forced failure: the job's backend is gone from virt-dup.yml, the run fails")
        configured = config.read_text()
        config.write_text(configured.replace(f"backends:\n  local: file://{work}/backend\n", ""))
        try:
            on_host("systemctl", "--user", "start", service, ok_codes=(1,))
        finally:
            config.write_text(configured)
        on_host("systemctl", "--user", "list-units", "--failed", "--no-pager", "virt-dup*")
        if len(journal_records("RESULT=failed")) != 1:
            raise SystemExit("demo: the failed run is not in the journal exactly once")
        alert = f"virt-dup-alert@{service}.service"
        wait_for_run(manager, alert)
        on_host("systemctl", "--user", "status", "--no-pager", "-n", "3", alert, ok_codes=(0, 3))
        show_alert(webhook, name, job)
        manager.systemctl("reset-failed", service, check=False)

        step("What exists on the backend: the full and the incremental")
        on_host(str(VIRT_DUP), "backups", name)

        step("Restore the latest backup into a new directory and compare it with the live disk")
        target = work / "restored"
        on_host(str(VIRT_DUP), "restore", name, "--target-dir", str(target))
        restored_top = target / "vda" / top.name
        show(["qemu-img", "info", "--backing-chain", str(restored_top)])
        show(["qemu-img", "compare", "-U", str(top), str(restored_top)])
        show(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x77 64M 4M", str(restored_top)])
        print("\ndemo: the restored chain equals the domain's disk, with the guest's write;")
        print("demo: cleaning up", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
