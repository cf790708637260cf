"""Alerts of real failed runs, under a real systemd manager, to real receivers.

A ``systemd --user`` in a private mount namespace (harness.manager) runs the
installed virt-dup with the system manager's sandbox; a job whose backend is
unreachable (sftp to a closed port on 127.0.0.1) fails its
``virt-dup@JOB.service``, whose ``OnFailure=`` starts
``virt-dup-alert@...``: what an admin would get arrives at a local SMTP
server (aiosmtpd) and a local HTTP server (a webhook, ``json://``, and the
healthchecks-style pings) on 127.0.0.1.  The manager shares the host's
network namespace, so loopback reaches the receivers.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message

import pytest
from harness.domains import DomainFactory
from harness.manager import UserManager, user_manager  # noqa: F401 - fixture
from test_systemd_e2e import Host

pytestmark = pytest.mark.integration

#: How long OnFailure= -> alert unit -> receiver may take.
ALERT_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Received:
    emails: list[Message] = field(default_factory=list)
    #: (path, body) of every POST.
    posts: list[tuple[str, bytes]] = field(default_factory=list)


class _SMTPHandler:
    def __init__(self, received: Received) -> None:
        self.received = received

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.received.emails.append(message_from_bytes(envelope.content))  # type: ignore[attr-defined]
        return "250 OK"


@pytest.fixture
def receivers() -> Iterator[tuple[Received, int, int]]:
    """A local SMTP server and HTTP server; (what they got, smtp port, http port)."""
    from aiosmtpd.controller import Controller

    received = Received()

    class Webhook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.posts.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    smtp = Controller(_SMTPHandler(received), hostname="127.0.0.1", port=free_port())
    smtp.start()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        yield received, smtp.port, web.server_address[1]
    finally:
        web.shutdown()
        web.server_close()
        smtp.stop()


def alert_config(smtp_port: int, http_port: int, job_dead_port: int) -> str:
    return (
        "alerts:\n"
        "  urls:\n"
        f"    - mailto://127.0.0.1:{smtp_port}?from=virt-dup@example.com&to=admin@example.com\n"
        f"    - json://127.0.0.1:{http_port}/alert\n"
        f"  ping_url: http://127.0.0.1:{http_port}/ping/{{job}}\n"
        f"  events: [failure]\n"
    )


def test_a_failed_run_reaches_email_and_webhook_with_job_domain_error_and_journal_command(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
    receivers: tuple[Received, int, int],
) -> None:
    received, smtp_port, http_port = receivers
    job = str(uuid.uuid4())
    host = Host(user_manager, [job])
    dead_port = free_port()  # nothing listens: the backend is unreachable
    host.write_config(alert_config(smtp_port, http_port, dead_port))
    host.install()
    vm = make_domain(running=False)
    host.virt_dup(
        "add-job",
        vm.name,
        "--uuid",
        job,
        "--backend",
        f"sftp://virt-dup@127.0.0.1:{dead_port}/backups",
        "--encryption",
        "none",
    )
    service = f"virt-dup@{job}.service"

    host.manager.systemctl("start", service, check=False)

    failed = host.show(service, "Result")
    assert failed["Result"] == "exit-code"
    alert_unit = f"virt-dup-alert@{service}.service"
    user_manager.wait_for(
        "the alert at both receivers",
        lambda: bool(received.emails) and any(path == "/alert" for path, _ in received.posts),
        timeout=ALERT_TIMEOUT,
    )
    status = json.loads((host.state / "status" / f"{job}.json").read_text())
    error_line = status["last_run"]["message"]
    assert "127.0.0.1" in error_line  # the backend that could not be reached
    journal_command = f"journalctl --user -u {service}"

    email = received.emails[0]
    assert vm.name in email["Subject"]
    text = next(
        part.get_payload(decode=True).decode()
        for part in email.walk()
        if part.get_content_type() == "text/plain"
    )
    webhook = json.loads(next(body for path, body in received.posts if path == "/alert"))
    for body in (text, webhook["message"]):
        assert f"job {job} (domain {vm.name})" in body
        assert f"error: {' '.join(error_line.split())}" in body
        assert f"more: {journal_command}" in body
    assert webhook["type"] == "failure"
    # The pings: /start, then /fail with the error line.
    pings = [(path, body) for path, body in received.posts if path.startswith("/ping/")]
    assert [path for path, _ in pings] == [f"/ping/{job}/start", f"/ping/{job}/fail"]
    assert vm.name.encode() in pings[1][1]
    user_manager.wait_for(
        f"{alert_unit} succeeded",
        lambda: (
            host.show(alert_unit, "Result", "ActiveState")
            == {"Result": "success", "ActiveState": "inactive"}
        ),
        timeout=ALERT_TIMEOUT,
    )


def test_a_failed_alert_is_logged_and_changes_nothing_else(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
    receivers: tuple[Received, int, int],
) -> None:
    received, _smtp_port, _http_port = receivers
    job = str(uuid.uuid4())
    host = Host(user_manager, [job])
    down = free_port()  # the receivers are down
    host.write_config(
        "alerts:\n"
        "  urls:\n"
        f"    - json://user:s3cr3t-word@127.0.0.1:{down}/alert\n"
        f"  ping_url: http://127.0.0.1:{down}/ping/{{job}}\n"
    )
    host.install()
    with user_manager.journald():
        vm = make_domain(running=False)
        host.virt_dup(
            "add-job", vm.name, "--uuid", job, "--backend", "local", "--encryption", "none"
        )
        service = f"virt-dup@{job}.service"
        alert_unit = f"virt-dup-alert@{service}.service"

        # A run that succeeds though its pings go nowhere.
        host.manager.systemctl("start", service)
        assert host.show(service, "Result")["Result"] == "success"
        assert list((host.backend / job).glob("duplicity-full.*.manifest"))

        # A failing run: its alert cannot be sent; the alert unit still succeeds.
        host.config.write_text(
            host.config.read_text().replace(f"backends:\n  local: file://{host.backend}\n", "")
        )
        host.manager.systemctl("start", service, check=False)
        user_manager.wait_for(
            f"{alert_unit} ran",
            lambda: (
                host.show(alert_unit, "Result", "ActiveState", "ExecMainStatus")
                == {"Result": "success", "ActiveState": "inactive", "ExecMainStatus": "0"}
            ),
            timeout=ALERT_TIMEOUT,
        )
        log = user_manager.run(
            ["journalctl", "--no-pager", "-o", "cat", "-t", "virt-dup", "-p", "warning"]
        ).stdout
        assert f"alert for {service} not sent: json://user:***@127.0.0.1:{down}/alert" in log
        assert "s3cr3t-word" not in log
        assert f"could not ping for the start of job {job}" in log
        # Nothing else: no alert of the alert, the backup is still there.
        listed = host.manager.systemctl(
            "list-units", "--all", "--plain", "--no-legend", "virt-dup-alert@virt-dup-alert*"
        ).stdout
        assert listed.strip() == ""
        assert list((host.backend / job).glob("duplicity-full.*.manifest"))
    assert received.posts == [] and received.emails == []


def test_the_daily_check_alerts_a_stale_job_once_and_does_not_fail(
    user_manager: UserManager,  # noqa: F811
    make_domain: DomainFactory,
    receivers: tuple[Received, int, int],
) -> None:
    """virt-dup-check.service (what virt-dup-check.timer starts daily) runs
    ``status --check --alert``: a scheduled job that never succeeded is not
    fresh, the webhook hears of it once, and the unit's own result is success
    (a failed unit would alert a second time)."""
    received, _smtp_port, http_port = receivers
    job = str(uuid.uuid4())
    host = Host(user_manager, [job])
    host.write_config(f"alerts:\n  urls: [json://127.0.0.1:{http_port}/stale]\n  events: [stale]\n")
    host.install()
    vm = make_domain(running=False)
    host.virt_dup(
        "add-job", vm.name, "--uuid", job, "--schedule", "0 3 * * *", "--encryption", "none"
    )
    assert (
        "virt-dup-check.timer"
        in host.manager.systemctl("list-timers", "--all", "virt-dup-check.timer").stdout
    )

    host.manager.systemctl("start", "virt-dup-check.service")

    assert host.show("virt-dup-check.service", "Result")["Result"] == "success"
    stale = [json.loads(body) for path, body in received.posts if path == "/stale"]
    assert len(stale) == 1
    assert job in stale[0]["message"] and "not fresh" in stale[0]["title"]
    assert not any(path == "/alert" for path, _ in received.posts)  # no failure alert
    # Without "stale" in alerts.events the check sends nothing.
    host.write_config(
        f"alerts:\n  urls: [json://127.0.0.1:{http_port}/stale]\n  events: [failure]\n"
    )
    checked = host.virt_dup("status", "--check", "--alert", check=False)
    assert checked.returncode == 1 and job in checked.stdout
    assert len([path for path, _ in received.posts if path == "/stale"]) == 1
