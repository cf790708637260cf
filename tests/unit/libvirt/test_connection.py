"""virt_dup.libvirt.connection, the parts that never reach libvirtd: libvirt errors
turned into one-line LibvirtError, which failures are the guest agent's, UUID
recognition and the credential callback of openAuth."""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from virt_dup.errors import LibvirtError, VirtDupError
from virt_dup.libvirt.connection import (
    Hypervisor,
    _credentials,
    _looks_like_uuid,
    is_agent_error,
)


def libvirt_error(message: str, code: int | None = None) -> libvirt.libvirtError:
    """A libvirtError as libvirt-python raises it: with its error tuple when ``code``
    is given (code, domain, message, level, ...), else hand-made (no tuple)."""
    error = libvirt.libvirtError(message)
    error.err = (
        None
        if code is None
        else (code, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    )
    return error


def raising(error: Exception) -> Any:
    def function(*_arguments: object) -> None:
        raise error

    return function


# -- Hypervisor.call ------------------------------------------------------------------
def test_a_hand_made_libvirt_error_has_no_code_or_message() -> None:
    error = libvirt_error("boom")
    assert error.get_error_code() is None
    assert error.get_error_message() is None
    assert str(error) == "boom"


def test_call_turns_a_hand_made_libvirt_error_into_one_line() -> None:
    hypervisor = Hypervisor(None)  # type: ignore[arg-type]  # call() never uses it
    with pytest.raises(LibvirtError) as raised:
        hypervisor.call("cannot read the state of domain vm01", raising(libvirt_error("boom")))
    assert str(raised.value) == "cannot read the state of domain vm01: boom"
    assert raised.value.reason == "boom"
    assert raised.value.code is None
    assert raised.value.__suppress_context__  # `from None`: one line, no libvirt traceback
    assert isinstance(raised.value, VirtDupError)


def test_call_keeps_libvirts_code_and_message() -> None:
    hypervisor = Hypervisor(None)  # type: ignore[arg-type]
    error = libvirt_error(
        "  Domain not found: no domain with matching name 'vm01'\n",
        libvirt.VIR_ERR_NO_DOMAIN,
    )
    with pytest.raises(LibvirtError) as raised:
        hypervisor.call("cannot look up vm01", raising(error))
    assert str(raised.value) == (
        "cannot look up vm01: Domain not found: no domain with matching name 'vm01'"
    )
    assert raised.value.code == libvirt.VIR_ERR_NO_DOMAIN
    assert raised.value.reason == "Domain not found: no domain with matching name 'vm01'"


def test_call_passes_arguments_and_returns_the_result() -> None:
    hypervisor = Hypervisor(None)  # type: ignore[arg-type]
    assert hypervisor.call("adding", lambda a, b: a + b, 2, 3) == 5


def test_call_lets_other_exceptions_through() -> None:
    hypervisor = Hypervisor(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        hypervisor.call("typo", raising(TypeError("not libvirt's")))


def test_call_makes_a_multi_line_libvirt_message_one_line() -> None:
    hypervisor = Hypervisor(None)  # type: ignore[arg-type]
    error = libvirt_error(
        "internal error: qemu unexpectedly closed the monitor: warning: x\nerror: y",
        libvirt.VIR_ERR_INTERNAL_ERROR,
    )
    with pytest.raises(LibvirtError) as raised:
        hypervisor.call("cannot start domain vm01", raising(error))
    assert "\n" not in str(raised.value)


def test_a_call_failure_of_the_agent_is_an_agent_error() -> None:
    hypervisor = Hypervisor(None)  # type: ignore[arg-type]
    error = libvirt_error(
        "Guest agent is not responding: QEMU guest agent is not connected",
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
    )
    with pytest.raises(LibvirtError) as raised:
        hypervisor.call("cannot create the virt-dup overlay of domain vm01", raising(error))
    assert is_agent_error(raised.value)


# -- is_agent_error -------------------------------------------------------------------
def test_an_unresponsive_agent_is_an_agent_error() -> None:
    error = LibvirtError(
        "cannot create the virt-dup overlay of domain vm01: Guest agent is not responding",
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        "Guest agent is not responding",
    )
    assert is_agent_error(error)


def test_an_unsynced_agent_is_an_agent_error() -> None:
    error = LibvirtError("x: y", libvirt.VIR_ERR_AGENT_UNSYNCED, "y")
    assert is_agent_error(error)


def test_operation_failed_naming_the_guest_agent_is_an_agent_error() -> None:
    reason = "operation failed: QEMU Guest Agent is not connected"
    error = LibvirtError(
        f"cannot create the overlay: {reason}", libvirt.VIR_ERR_OPERATION_FAILED, reason
    )
    assert is_agent_error(error)


@pytest.mark.parametrize(
    "code",
    [
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
        libvirt.VIR_ERR_OPERATION_TIMEOUT,
        libvirt.VIR_ERR_INTERNAL_ERROR,
    ],
)
def test_other_generic_codes_naming_the_agent_are_agent_errors(code: int) -> None:
    reason = "guest agent command failed: freeze timed out"
    assert is_agent_error(LibvirtError(f"x: {reason}", code, reason))


def test_operation_failed_without_the_agent_is_not_an_agent_error() -> None:
    reason = "operation failed: external snapshot file for disk vda already exists"
    error = LibvirtError(
        f"cannot create the overlay: {reason}", libvirt.VIR_ERR_OPERATION_FAILED, reason
    )
    assert not is_agent_error(error)


def test_agent_only_in_the_domain_name_is_not_an_agent_error() -> None:
    """The message names the domain ("agent-test"); only libvirt's reason counts."""
    reason = "operation failed: external snapshot file for disk vda already exists"
    error = LibvirtError(
        f"cannot create the virt-dup overlay of domain agent-test: {reason}",
        libvirt.VIR_ERR_OPERATION_FAILED,
        reason,
    )
    assert "agent" in str(error)
    assert not is_agent_error(error)


def test_agent_in_a_specific_non_agent_code_is_not_an_agent_error() -> None:
    reason = "Requested operation is not valid: domain agent-test is not running"
    assert not is_agent_error(
        LibvirtError(f"x: {reason}", libvirt.VIR_ERR_OPERATION_INVALID, reason)
    )


def test_an_error_without_a_code_is_not_an_agent_error() -> None:
    assert not is_agent_error(LibvirtError("guest agent trouble"))


# -- _looks_like_uuid -----------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "5f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61",
        "5F1C1B0E-2F5E-4C1A-9A53-1D2F0C8B7A61",
        "5f1c1b0e2f5e4c1a9a531d2f0c8b7a61",
        "{5f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a61}",
    ],
)
def test_uuids(text: str) -> None:
    assert _looks_like_uuid(text)


@pytest.mark.parametrize(
    "text",
    ["vm01", "", "5f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a6", "5f1c1b0e-2f5e-4c1a-9a53-1d2f0c8b7a6z"],
)
def test_domain_names_are_not_uuids(text: str) -> None:
    assert not _looks_like_uuid(text)


# -- _credentials ---------------------------------------------------------------------
def credential(kind: int) -> list[Any]:
    """One credential request as libvirt hands it: type, prompt, challenge, default, result."""
    return [kind, "prompt", "challenge", None, None]


def test_credentials_ask_for_authname_and_passphrase() -> None:
    kinds, _callback, data = _credentials("backup", "secret")
    assert sorted(kinds) == sorted([libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE])
    assert data is None


def test_credentials_answer_authname_and_passphrase() -> None:
    _kinds, callback, _data = _credentials("backup", "s3cret")
    requests = [credential(libvirt.VIR_CRED_AUTHNAME), credential(libvirt.VIR_CRED_PASSPHRASE)]
    assert callback(requests, None) == 0
    assert requests[0][4] == "backup"
    assert requests[1][4] == "s3cret"


def test_credentials_answer_empty_strings_for_what_is_not_configured() -> None:
    _kinds, callback, _data = _credentials(None, None)
    requests = [credential(libvirt.VIR_CRED_PASSPHRASE), credential(libvirt.VIR_CRED_AUTHNAME)]
    assert callback(requests, None) == 0
    assert [request[4] for request in requests] == ["", ""]


@pytest.mark.parametrize(
    "kind",
    [libvirt.VIR_CRED_NOECHOPROMPT, libvirt.VIR_CRED_ECHOPROMPT, libvirt.VIR_CRED_REALM],
)
def test_credentials_refuse_other_types(kind: int) -> None:
    _kinds, callback, _data = _credentials("backup", "secret")
    requests = [credential(libvirt.VIR_CRED_AUTHNAME), credential(kind)]
    assert callback(requests, None) == -1
    assert requests[1][4] is None  # nothing was answered to what it does not know


# -- opening: the bound, the retry, the warning ---------------------------------------
def config_of(tmp_path: Any, uri: str) -> Any:
    from virt_dup.config.load import parse_config

    return parse_config(f"libvirt:\n  uri: '{uri}'\n", tmp_path / "virt-dup.yml")


def test_a_peer_that_never_answers_is_given_up_at_the_timeout(tmp_path: Any) -> None:
    """A real libvirt client against a socket on 127.0.0.1 that accepts and says
    nothing: libvirt itself would wait for ever."""
    import socket
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"qemu+tcp://admin:s3cret@127.0.0.1:{silent.getsockname()[1]}/system"
        started = time.monotonic()
        with pytest.raises(LibvirtError) as raised:
            Hypervisor.open(config_of(tmp_path, uri), timeout_s=1.0)
        elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0
    port = uri.rsplit(":", 1)[1].split("/")[0]
    assert str(raised.value) == (
        f"cannot connect to libvirt at qemu+tcp://admin:***@127.0.0.1:{port}/system: "
        "no answer within 1 s"
    )


def test_a_refused_connect_is_tried_again_for_the_retry_time(tmp_path: Any) -> None:
    import socket
    import time

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        port = closed.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(LibvirtError) as raised:
            Hypervisor.open(config_of(tmp_path, f"qemu+tcp://127.0.0.1:{port}/system"), retry_s=1.0)
        elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0
    assert str(raised.value) == (
        f"cannot connect to libvirt at qemu+tcp://127.0.0.1:{port}/system: unable to connect "
        f"to server at '127.0.0.1:{port}': Connection refused (tried for 1 s)"
    )
    assert raised.value.code == libvirt.VIR_ERR_SYSTEM_ERROR


def test_a_refusal_that_is_not_transient_is_not_tried_again(tmp_path: Any) -> None:
    import time

    started = time.monotonic()
    with pytest.raises(LibvirtError) as raised:
        Hypervisor.open(config_of(tmp_path, "nosuchdriver:///system"), retry_s=5.0)
    assert time.monotonic() - started < 1.0
    assert str(raised.value).startswith("cannot connect to libvirt at nosuchdriver:///system: ")


def test_a_connect_that_succeeds_on_a_retry_is_used(tmp_path: Any, monkeypatch: Any) -> None:
    """Fake: libvirt.open refuses twice as a restarting libvirtd does, then the
    in-process test driver answers."""
    import errno

    calls = []
    real_open = libvirt.open

    def flaky_open(uri: str) -> libvirt.virConnect:
        calls.append(uri)
        if len(calls) < 3:
            error = libvirt.libvirtError("Failed to connect socket: Connection refused")
            error.err = (
                libvirt.VIR_ERR_SYSTEM_ERROR,
                7,
                "refused",
                2,
                "",
                "",
                "",
                errno.ECONNREFUSED,
                0,
            )
            raise error
        return real_open("test:///default")

    monkeypatch.setattr(libvirt, "open", flaky_open)
    hypervisor = Hypervisor.open(config_of(tmp_path, "qemu:///system"), retry_s=5.0)
    try:
        assert hypervisor.uri == "test:///default" and len(calls) == 3
    finally:
        hypervisor.close()


def test_tcp_to_a_host_that_is_not_loopback_warns_in_one_line(
    tmp_path: Any, monkeypatch: Any, caplog: Any
) -> None:
    """Fake: the connection itself is the in-process test driver (no network)."""
    real_open = libvirt.open
    monkeypatch.setattr(libvirt, "open", lambda _uri: real_open("test:///default"))
    with caplog.at_level("WARNING"):
        Hypervisor.open(config_of(tmp_path, "qemu+tcp://kvm02.example.org/system")).close()
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: libvirt URI qemu+tcp://kvm02.example.org/system is unencrypted qemu+tcp"
    )
    caplog.clear()
    with caplog.at_level("WARNING"):
        Hypervisor.open(config_of(tmp_path, "qemu+tcp://127.0.0.1/system")).close()
    assert not [record for record in caplog.records if record.levelname == "WARNING"]
