"""What a libvirt URI says before anything connects to it.

virt-dup reads disk images where it runs (qemu-img, duplicity): the domains
of a URI are only its to back up when their disks are files on this host.

* :func:`parse_uri`: transport, host, user of a URI; :func:`masked`: the URI
  as messages show it (a password in it replaced by ``***``);
* :func:`disks_are_local` / :func:`require_local_disks`: whether the URI's
  host is this one (no host, loopback, ``localhost``, this host's names or
  addresses);
* :func:`require_sources_exist`: every selected disk's source file is here;
* :func:`transport_warning`: the one-line warning for ``qemu+tcp://`` to a
  host that is not loopback (no encryption, and no authentication in the
  original virt-dup's ``auth_tcp = "none"`` mode).

Pure except for what this host's names and addresses are (injectable).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from virt_dup.config.options import masked_url
from virt_dup.errors import NotFoundError, UsageError

#: Transports whose connection is a plain socket to a libvirtd on this host's
#: file system (no host part is meaningful).
LOCAL_TRANSPORTS = frozenset({"unix"})
#: libvirt's default TCP ports.
TCP_PORT = 16509
TLS_PORT = 16514


@dataclass(frozen=True)
class LibvirtURI:
    """A libvirt URI, split: ``driver[+transport]://[user[:password]@][host][:port]/path?query``."""

    text: str
    driver: str
    #: ``tcp``, ``tls``, ``ssh``, ``libssh``, ``libssh2``, ``unix``, ``ext``; None when
    #: the URI names none (libvirt then uses the local socket, or TLS when a host is given).
    transport: str | None
    #: The host as written (lower case, IPv6 without brackets); None when the URI has none.
    host: str | None
    port: int | None
    user: str | None
    password: str | None

    @property
    def effective_transport(self) -> str:
        """The transport libvirt uses: ``unix`` without a host, ``tls`` with one."""
        if self.transport:
            return self.transport
        return "tls" if self.host else "unix"


def parse_uri(text: str) -> LibvirtURI:
    """``text`` split into its parts (UsageError when it is no URI at all)."""
    parts = urllib.parse.urlsplit(text)
    if not parts.scheme:
        raise UsageError(f"libvirt URI {masked(text)}: expected driver[+transport]://...")
    driver, _plus, transport = parts.scheme.partition("+")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"libvirt URI {masked(text)}: the port is not a number") from None
    return LibvirtURI(
        text=text,
        driver=driver,
        transport=transport or None,
        host=parts.hostname or None,
        port=port,
        user=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password is not None else None,
    )


def masked(text: str) -> str:
    """The URI as errors and logs show it: a password in its user part is ``***``."""
    return masked_url(text)


def is_loopback(host: str) -> bool:
    """``localhost`` (and ``*.localhost``, RFC 6761), 127.0.0.0/8 or ::1."""
    name = host.lower().rstrip(".")
    if name in ("localhost", "localhost.localdomain", "localhost6", "ip6-localhost"):
        return True
    if name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@functools.cache
def this_host_names() -> frozenset[str]:
    """This host's names: its hostname, the hostname's first label and its
    fully qualified name (from /etc/hosts or the resolver, asked once)."""
    hostname = socket.gethostname().lower()
    names = {hostname, hostname.split(".")[0]}
    fqdn = socket.getfqdn(hostname).lower()
    names.add(fqdn)
    return frozenset(name for name in names if name)


def is_this_host_address(address: str) -> bool:
    """Whether an IP address is one of this host's (binding to it succeeds: no
    packet is sent)."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    family = socket.AF_INET6 if parsed.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def disks_are_local(
    uri: str,
    host_names: Callable[[], Iterable[str]] = this_host_names,
    is_local_address: Callable[[str], bool] = is_this_host_address,
) -> bool:
    """Whether the domains of ``uri`` have their disks on this host: the URI
    names no host, or loopback, ``localhost``, one of this host's names or one
    of its addresses.  A name is never resolved (no DNS lookup): a name that is
    not this host's is another host, whatever it resolves to."""
    parsed = parse_uri(uri)
    if parsed.host is None or parsed.effective_transport in LOCAL_TRANSPORTS:
        return True
    if is_loopback(parsed.host):
        return True
    if parsed.host.rstrip(".") in host_names():
        return True
    return is_local_address(parsed.host)


def require_local_disks(
    uri: str,
    host_names: Callable[[], Iterable[str]] = this_host_names,
    is_local_address: Callable[[str], bool] = is_this_host_address,
) -> None:
    """Raises :class:`UsageError` when ``uri`` names another host: virt-dup would
    read (and overlay) disk files that are not here.  Asks nothing of libvirt."""
    if disks_are_local(uri, host_names, is_local_address):
        return
    host = parse_uri(uri).host
    raise UsageError(
        f"libvirt URI {masked(uri)} names host {host}, which is not this host: virt-dup "
        "reads disk images where it runs, so run it on that host (with qemu:///system)"
    )


def require_sources_exist(sources: Iterable[tuple[str, str]], domain_name: str) -> None:
    """Raises :class:`NotFoundError` for the first ``(target, source file)`` whose
    file does not exist on this host (a domain defined on shared storage that
    is not mounted here, or a URI whose daemon sees another file system)."""
    for target, source in sources:
        if not os.path.lexists(source):
            raise NotFoundError(
                f"disk {target} of domain {domain_name}: its source file {source} does not "
                "exist on this host (virt-dup reads disk images where it runs)"
            )


def transport_warning(uri: str) -> str | None:
    """The warning for ``qemu+tcp://`` to a host that is not loopback, else None."""
    parsed = parse_uri(uri)
    if parsed.transport != "tcp" or parsed.host is None or is_loopback(parsed.host):
        return None
    port = parsed.port or TCP_PORT
    return (
        f"warning: libvirt URI {masked(uri)} is unencrypted qemu+tcp, and with libvirtd's "
        f'auth_tcp = "none" unauthenticated: whoever reaches {parsed.host}:{port} controls '
        "its domains; prefer qemu+tls:// or qemu+ssh://"
    )
