"""Shell completion (argcomplete): domain names and job uuids from libvirt.

A completer never fails the shell: when virt-dup.yml or libvirt is not
usable it completes nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from argcomplete.completers import FilesCompleter

from virt_dup.config.load import load_config
from virt_dup.errors import VirtDupError
from virt_dup.libvirt.connection import Hypervisor


def _completion_hypervisor(parsed_args: argparse.Namespace) -> Hypervisor | None:
    try:
        return Hypervisor.open(load_config(getattr(parsed_args, "config", None)))
    except VirtDupError:
        return None


def complete_domains(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    hypervisor = _completion_hypervisor(parsed_args)
    if hypervisor is None:
        return []
    with hypervisor:
        return [name for name in hypervisor.domain_names() if name.startswith(prefix)]


def complete_jobs(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    hypervisor = _completion_hypervisor(parsed_args)
    if hypervisor is None:
        return []
    with hypervisor:
        return [
            job.uuid
            for _domain, jobs in hypervisor.all_jobs()
            if isinstance(jobs, list)
            for job in jobs
            if job.uuid.startswith(prefix)
        ]


def complete_key_files(prefix: str, **_: Any) -> list[str]:
    """Key files (``*.asc``, ``*.gpg``, ``*.key``, ``*.pgp``) and directories."""
    completer = FilesCompleter(allowednames=("asc", "gpg", "key", "pgp"))
    return list(completer(prefix))


def complete_domains_or_jobs(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """Domain names and job uuids (``status DOMAIN|JOB_UUID``)."""
    return [
        *complete_domains(prefix, parsed_args),
        *complete_jobs(prefix, parsed_args),
    ]
