"""virt_dup.libvirt.locality: which libvirt URIs have their disks on this host,
the qemu+tcp warning, masked URIs and the source-file check.  No libvirt."""

from __future__ import annotations

from pathlib import Path

import pytest

from virt_dup.errors import NotFoundError, UsageError
from virt_dup.libvirt.locality import (
    disks_are_local,
    is_loopback,
    masked,
    parse_uri,
    require_local_disks,
    require_sources_exist,
    transport_warning,
)


def names() -> frozenset[str]:
    """This host, as the tests pretend it is called."""
    return frozenset({"kvm01", "kvm01.example.org"})


def no_address(_address: str) -> bool:
    return False


def local(uri: str) -> bool:
    return disks_are_local(uri, names, no_address)


@pytest.mark.parametrize(
    "uri",
    [
        "qemu:///system",
        "qemu:///session",
        "qemu+unix:///system",
        "qemu+unix:///system?socket=/nonexistent",
        "test:///default",
        "qemu+tcp://127.0.0.1/system",
        "qemu+tcp://127.0.0.1:16600/system",
        "qemu+tls://localhost/system?pkipath=/tmp/pki",
        "qemu+tls://LOCALHOST:16514/system",
        "qemu+ssh://root@127.0.0.1/system",
        "qemu+ssh://root@127.0.0.1:2222/system?keyfile=/k&no_verify=1",
        "qemu+libssh://root@[::1]:2222/system?known_hosts=/kh",
        "qemu+ssh://root@127.1.2.3/system",
        "qemu+ssh://root@vm.localhost/system",
        "qemu+ssh://root@kvm01/system",
        "qemu+ssh://root@KVM01.example.org./system",
    ],
)
def test_uris_of_this_host_are_local(uri: str) -> None:
    assert local(uri)
    require_local_disks(uri, names, no_address)


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+ssh://root@backup.example.invalid/system",
        "qemu+tcp://10.0.0.5/system",
        "qemu+tls://kvm02.example.org/system",
        "qemu://kvm02/system",  # a host and no transport: libvirt uses TLS to it
        "qemu+libssh2://root@kvm01.example.com/system",  # a different domain
        "qemu+ssh://root@[2001:db8::1]/system",
    ],
)
def test_uris_of_another_host_are_refused(uri: str) -> None:
    assert not local(uri)
    with pytest.raises(UsageError) as raised:
        require_local_disks(uri, names, no_address)
    message = str(raised.value)
    assert message.startswith(f"libvirt URI {uri} names host ")
    assert "not this host" in message and "\n" not in message


def test_an_address_of_this_host_is_local() -> None:
    assert disks_are_local("qemu+tcp://192.0.2.7/system", names, lambda a: a == "192.0.2.7")
    assert not disks_are_local("qemu+tcp://192.0.2.8/system", names, lambda a: a == "192.0.2.7")


def test_a_name_is_never_resolved() -> None:
    """Only IP literals are checked against this host's addresses: a name that
    is not this host's is another host, without a DNS lookup."""
    from virt_dup.libvirt.locality import is_this_host_address

    assert is_this_host_address("127.0.0.1")
    assert not is_this_host_address("localhost")
    assert not disks_are_local("qemu+ssh://root@kvm02/system", names)


def test_the_refusal_masks_a_password() -> None:
    with pytest.raises(UsageError) as raised:
        require_local_disks("qemu+tcp://admin:s3cret@kvm02/system", names, no_address)
    assert "s3cret" not in str(raised.value)
    assert "qemu+tcp://admin:***@kvm02/system" in str(raised.value)


def test_this_hosts_real_name_and_addresses_are_local() -> None:
    """The default lookups: this host's hostname and 127.0.0.1 bound locally."""
    import socket

    assert disks_are_local(f"qemu+ssh://root@{socket.gethostname()}/system")
    assert disks_are_local("qemu+tcp://127.0.0.1/system")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("a.localhost", True),
        ("localhost.example.org", False),
        ("128.0.0.1", False),
        ("10.0.0.1", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_parse_uri() -> None:
    parsed = parse_uri("qemu+ssh://root:pw@Host.Example:2222/system?keyfile=/k")
    assert (parsed.driver, parsed.transport, parsed.host, parsed.port) == (
        "qemu",
        "ssh",
        "host.example",
        2222,
    )
    assert (parsed.user, parsed.password) == ("root", "pw")
    assert parse_uri("qemu:///system").effective_transport == "unix"
    assert parse_uri("qemu://h/system").effective_transport == "tls"
    with pytest.raises(UsageError, match="the port is not a number"):
        parse_uri("qemu+tcp://h:x/system")


def test_masked() -> None:
    assert masked("qemu+tcp://admin:s3cret@h/system?x=1") == "qemu+tcp://admin:***@h/system?x=1"
    assert masked("qemu+ssh://root@h/system") == "qemu+ssh://root@h/system"
    assert masked("qemu:///system") == "qemu:///system"


# -- the qemu+tcp warning -------------------------------------------------------------
def test_tcp_to_a_host_that_is_not_loopback_is_warned_about() -> None:
    warning = transport_warning("qemu+tcp://kvm02.example.org/system")
    assert warning is not None and "\n" not in warning
    assert warning.startswith("warning: libvirt URI qemu+tcp://kvm02.example.org/system ")
    assert 'auth_tcp = "none"' in warning and "unencrypted" in warning
    assert "kvm02.example.org:16509" in warning
    assert "qemu+tls://" in warning
    assert "kvm02:16600" in (transport_warning("qemu+tcp://kvm02:16600/system") or "")


def test_the_warning_masks_a_password() -> None:
    warning = transport_warning("qemu+tcp://admin:s3cret@kvm02/system") or ""
    assert "s3cret" not in warning and "admin:***@kvm02" in warning


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+tcp://127.0.0.1/system",
        "qemu+tcp://localhost:16600/system",
        "qemu+tcp://[::1]/system",
        "qemu+tls://kvm02/system",
        "qemu+ssh://root@kvm02/system",
        "qemu:///system",
        "qemu+unix:///system",
    ],
)
def test_no_warning_for_loopback_tcp_or_other_transports(uri: str) -> None:
    assert transport_warning(uri) is None


# -- source files ---------------------------------------------------------------------
def test_a_missing_source_file_is_refused(tmp_path: Path) -> None:
    present = tmp_path / "vm.qcow2"
    present.write_bytes(b"")
    require_sources_exist([("vda", str(present))], "vm01")
    missing = tmp_path / "gone.qcow2"
    with pytest.raises(NotFoundError) as raised:
        require_sources_exist([("vda", str(present)), ("vdb", str(missing))], "vm01")
    assert str(raised.value) == (
        f"disk vdb of domain vm01: its source file {missing} does not exist on this host "
        "(virt-dup reads disk images where it runs)"
    )
