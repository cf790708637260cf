"""Backends that are down, slow or refuse us: what virt-dup passes and says."""

from __future__ import annotations

from pathlib import Path

import pytest

from virt_dup.duplicity import runner
from virt_dup.duplicity.arguments import backup_arguments, collection_status_arguments
from virt_dup.duplicity.protocol import LogRecord
from virt_dup.duplicity.runner import backend_reason
from virt_dup.duplicity.target import Target, local_directory_problem
from virt_dup.errors import ConfigError
from virt_dup.execute import CommandFailed

UUID = "0b5e3c9e-1f0a-4e43-9d55-3a1f3f4a2c11"


def target(**changes: object) -> Target:
    values: dict[str, object] = {
        "url": "sftp://backup@nas.example//srv/virt-dup",
        "archive_dir": Path("/var/cache/virt-dup"),
        "name": UUID,
        "encryption": "none",
    }
    values.update(changes)
    return Target(**values)  # type: ignore[arg-type]


def test_retries_delay_and_timeout_reach_every_action() -> None:
    quick = target(num_retries=2, retry_delay=1, network_timeout=5)
    for argv in (
        backup_arguments(quick, True, "/", ["/var/lib/x.qcow2"]),
        collection_status_arguments(quick),
    ):
        assert argv[argv.index("--num-retries") + 1] == "2"
        assert argv[argv.index("--backend-retry-delay") + 1] == "1"
        assert argv[argv.index("--timeout") + 1] == "5"


def test_unset_means_duplicitys_own_defaults() -> None:
    argv = collection_status_arguments(target())
    assert not {"--num-retries", "--backend-retry-delay", "--timeout"} & set(argv)


def test_nothing_that_weakens_the_host_key_check_is_passed() -> None:
    """duplicity's paramiko backend reads known_hosts locations from --ssh-options;
    virt-dup passes none, so ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts rule."""
    argv = backup_arguments(target(num_retries=2), False, "/", ["/var/lib/x.qcow2"])
    assert not [word for word in argv if "ssh" in word.lower()]


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"num_retries": 0}, "backend_retries"),
        ({"retry_delay": -1}, "backend_retry_delay"),
        ({"network_timeout": 0}, "backend_timeout"),
    ],
)
def test_nonsense_limits_are_refused(changes: dict[str, int], said: str) -> None:
    with pytest.raises(ConfigError, match=said):
        target(**changes)


def test_an_unknown_host_key_in_words() -> None:
    said = "ssh connection to root@127.0.0.1:2222 failed: EOF when reading a line"
    assert backend_reason(said, Path("/root")) == (
        "ssh connection to root@127.0.0.1:2222 failed: the server's host key is not in "
        "/root/.ssh/known_hosts nor /etc/ssh/ssh_known_hosts (add it after checking its "
        "fingerprint, e.g. ssh-keyscan -p PORT HOST)"
    )


def test_a_changed_host_key_in_words_without_the_keys() -> None:
    said = (
        "ssh connection to root@127.0.0.1:2222 failed: Host key for server '127.0.0.1' "
        "does not match: got 'AAAAC3Nza', expected 'AAAAC3Nzb'"
    )
    reason = backend_reason(said, Path("/root"))
    assert reason.startswith("ssh connection to root@127.0.0.1:2222 failed: the server's host key")
    assert "/root/.ssh/known_hosts" in reason and "AAAA" not in reason


def test_a_silent_server_in_words() -> None:
    said = "ssh connection to root@127.0.0.1:2222 failed: Error reading SSH protocol banner"
    assert backend_reason(said).endswith(
        "sent no SSH banner within 15 s (a hung or overloaded sshd, or not an SSH server)"
    )


def test_other_reasons_pass_through() -> None:
    assert backend_reason("[Errno 28] No space left on device") == (
        "[Errno 28] No space left on device"
    )


def test_a_file_backend_through_a_regular_file_is_refused_before_duplicity(
    tmp_path: Path,
) -> None:
    regular = tmp_path / "backup.img"
    regular.write_text("")
    assert local_directory_problem(f"file://{regular}/{UUID}") == f"{regular} is not a directory"
    assert local_directory_problem(f"file://{regular}") == f"{regular} is not a directory"
    assert local_directory_problem(f"file://{tmp_path}/missing/{UUID}") is None  # made by duplicity
    assert local_directory_problem(f"file://{tmp_path}") is None
    assert local_directory_problem("sftp://nas//srv") is None


def test_a_full_backend_is_named_full_not_unreachable() -> None:
    failure = CommandFailed(
        "duplicity full ... exited 53", command="duplicity full", returncode=53, stderr_tail=()
    )
    record = LogRecord(
        "ERROR", 53, (), "Giving up after 2 attempts. OSError: [Errno 28] No space left on device"
    )
    message = runner._failure_message(
        target(url="file:///mnt/full"), "backup to", failure, [record]
    )
    assert message.startswith(
        "duplicity backup to file:///mnt/full failed: the backend is full (ENOSPC): "
    )
    assert message.endswith("No space left on device")
