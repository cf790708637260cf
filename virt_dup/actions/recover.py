"""``virt-dup recover``: finish or roll back, on every domain, what interrupted runs left.

What the boot-time unit (``virt-dup-recover.service``) runs; per domain,
under its lock, :func:`virt_dup.backup.recovery.recover_domain` does the work.
"""

from __future__ import annotations

import logging

from virt_dup.backup.recovery import recover_domain
from virt_dup.backup.state import RunRecord, StateStore
from virt_dup.errors import NotFoundError, VirtDupError
from virt_dup.files import Interrupted
from virt_dup.libvirt.connection import Hypervisor

log = logging.getLogger(__name__)


def recover_all(hypervisor: Hypervisor, store: StateStore) -> tuple[list[str], list[str]]:
    """Recover every domain with a record or an overlay; returns (done, errors).

    One domain's failure does not stop the others (the boot unit must do
    what it can).
    """
    done: list[str] = []
    errors: list[str] = []
    records: dict[str, RunRecord] = {r.domain_uuid: r for r in store.unfinished_runs()}
    domains = {domain.UUIDString(): domain for domain in hypervisor.domains()}
    for domain_uuid, record in records.items():
        if domain_uuid not in domains:
            errors.append(
                f"run record of job {record.job_uuid}: domain {record.domain_name} "
                f"({domain_uuid}) no longer exists; overlays named in "
                f"{store.run_path(domain_uuid)} need a look"
            )
    for domain_uuid, domain in domains.items():
        try:
            with store.domain_lock(domain_uuid, domain.name()):
                done.extend(recover_domain(hypervisor, store, domain))
        except Interrupted:
            raise  # stopped (the domain in hand was merged first): leave the others
        except (VirtDupError, NotFoundError) as error:
            # A domain undefined (or a transient one stopped) since the listing
            # left nothing to recover, unless a run record names it.
            if domain_uuid in records or _still_defined(hypervisor, domain_uuid):
                errors.append(str(error))
            else:
                log.info("domain %s went away while being checked: %s", domain.name(), error)
    return done, errors


def _still_defined(hypervisor: Hypervisor, domain_uuid: str) -> bool:
    try:
        return hypervisor.find_domain(domain_uuid) is not None
    except VirtDupError:
        return True  # cannot tell: report the original error
