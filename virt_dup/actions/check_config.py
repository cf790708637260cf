"""``virt-dup check-config``: virt-dup.yml as virt-dup reads it.

Loading the file already validated it (:mod:`virt_dup.config.load`); this
says what it means, and with a connection, that libvirt answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from virt_dup.config.load import Config
from virt_dup.config.options import masked_url
from virt_dup.libvirt.connection import Hypervisor


def check_config(config: Config, hypervisor: Callable[[], Hypervisor] | None = None) -> list[str]:
    """Lines that say what ``config`` sets; with ``hypervisor``, connects to libvirt
    too (raises :class:`~virt_dup.errors.LibvirtError` when it does not answer)."""
    backends = ", ".join(f"{name}={url}" for name, url in config.backends.items())
    lines = [
        f"{config.path}: "
        + ("ok" if config.path.exists() else "not present, using built-in defaults"),
        f"scope: {config.scope}, libvirt: {config.libvirt_uri}",
        f"backends: {backends or '(none)'}",
        f"encryption keys: {', '.join(config.encryption.keys) or '(none)'}",
    ]
    if hypervisor is not None:
        major, minor = hypervisor().library_version()
        lines.append(f"libvirt reachable (library {major}.{minor})")
    return lines


def config_report(
    config: Config, hypervisor: Callable[[], Hypervisor] | None = None
) -> dict[str, Any]:
    """What :func:`check_config` says, as ``check-config --json`` prints it.

    Backend URLs are masked; with ``hypervisor``, libvirt's library version
    (raises like :func:`check_config` when libvirt does not answer).
    """
    report: dict[str, Any] = {
        "config": str(config.path),
        "config_exists": config.path.exists(),
        "notices": list(config.notices),
        "scope": config.scope,
        "libvirt_uri": config.libvirt_uri,
        "backends": {name: masked_url(url) for name, url in config.backends.items()},
        "encryption_keys": list(config.encryption.keys),
        "libvirt": None,
    }
    if hypervisor is not None:
        major, minor = hypervisor().library_version()
        report["libvirt"] = {"reachable": True, "library_version": f"{major}.{minor}"}
    return report
