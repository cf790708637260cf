"""Secrets during a real run: in no child's argv, only in duplicity's environment.

``/proc/<pid>/cmdline`` is readable by every user of the host, ``environ``
only by the process's owner and root.  A background thread samples every
process below ``virt-dup run`` (every few milliseconds, so short-lived ones
may slip through; the long-lived duplicity and gpg are always seen) while a
job backs a domain up encrypted and signed with a passphrase from a file, and
while a job whose sftp backend URL carries a password tries its backend.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness.backups import BackupEnvironment, children

pytestmark = pytest.mark.integration

PASSPHRASE = "pp-never-in-argv-8d1f"
PASSWORD = "pw-never-in-argv-3c9a"


def descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        for child in children(pending.pop()):
            found.append(child)
            pending.append(child)
    return found


def read_process(pid: int) -> tuple[list[str], dict[str, str]] | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    variables = dict(item.decode(errors="replace").partition("=")[::2] for item in environ if item)
    return [word.decode(errors="replace") for word in argv if word], variables


@contextmanager
def watching(root_pid: int) -> Iterator[dict[int, tuple[list[str], dict[str, str]]]]:
    """Every process seen below ``root_pid`` until the block ends: pid -> (argv, environ)."""
    seen: dict[int, tuple[list[str], dict[str, str]]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in descendants(root_pid):
                process = read_process(pid)
                if process and process[0]:
                    seen[pid] = process
            done.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(5)


@pytest.fixture
def environment(tmp_path: Path, gpg_home) -> BackupEnvironment:
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PASSPHRASE + "\n")
    passphrase_file.chmod(0o600)
    environment = BackupEnvironment.create(tmp_path, gpg_home.path, gpg_home.fingerprint)
    # sign with the key, its passphrase from a root-only file
    environment.config.write_text(
        environment.config.read_text().replace(
            f"  gnupg_home: {gpg_home.path}\n",
            f"  gnupg_home: {gpg_home.path}\n  sign_key: {gpg_home.fingerprint}\n"
            f"  passphrase_file: {passphrase_file}\n",
        )
    )
    return environment


def test_the_passphrase_is_in_no_childs_argv_and_only_in_duplicitys_environment(
    make_domain, environment: BackupEnvironment
) -> None:
    vm = make_domain(chain=["base", "vm"])
    job = environment.virt_dup("add-job", vm.name).stdout.strip()

    run = environment.start_run(job)
    with watching(run.pid) as seen:
        stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr

    programs = {Path(argv[0]).name for argv, _environ in seen.values()}
    assert "gpg" in programs, programs  # duplicity's gpg, signing and encrypting
    assert any("duplicity" in " ".join(argv) for argv, _environ in seen.values()), programs
    for pid, (argv, environ) in seen.items():
        assert not any(PASSPHRASE in word for word in argv), (pid, argv)
        if PASSPHRASE in "\0".join(environ.values()):
            # duplicity reads it from its environment (its gpg inherits that)
            # and hands it to gpg through a pipe; qemu-img and the rest never see it.
            assert "duplicity" in " ".join(argv) or Path(argv[0]).name == "gpg", (pid, argv)
            assert {name for name, value in environ.items() if PASSPHRASE in value} <= {
                "PASSPHRASE",
                "SIGN_PASSPHRASE",
            }
    assert any(
        environ.get("PASSPHRASE") == PASSPHRASE or environ.get("SIGN_PASSPHRASE") == PASSPHRASE
        for _argv, environ in seen.values()
    ), "no duplicity seen with the passphrase: did the sampling see the environment at all?"
    assert PASSPHRASE not in stdout + stderr


def test_a_backend_password_is_in_no_childs_argv(make_domain, environment) -> None:
    vm = make_domain(chain=["base", "vm"])
    url = f"sftp://backup:{PASSWORD}@127.0.0.1:1/backups"  # a closed port
    job = environment.virt_dup("add-job", vm.name, "--backend", url).stdout.strip()

    run = environment.start_run(job)
    with watching(run.pid) as seen:
        stdout, stderr = run.communicate(timeout=300)
    assert run.returncode != 0  # the backend is unreachable

    assert seen, "no child seen"
    for pid, (argv, environ) in seen.items():
        assert not any(PASSWORD in word for word in argv), (pid, argv)
        holding = {name for name, value in environ.items() if PASSWORD in value}
        assert holding <= {"FTP_PASSWORD"}, (pid, argv, holding)
    assert PASSWORD not in stdout + stderr
