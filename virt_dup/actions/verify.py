"""``virt-dup verify``: is a backup restorable, and is it what was backed up?

A verification restores every chain file of one backup (default: the
latest) from the backend into a scratch directory, exactly as a restore
does, and checks each file: its SHA-256 against the one recorded at backup
time, and ``qemu-img check`` (the file alone).  duplicity checks every
volume it reads against the hash in its own manifest, so a volume changed
on the backend fails the verification too.  The scratch directory is
removed afterwards, whatever happened.

Everything is read from the backend: duplicity gets a cache of its own in
the scratch directory (so the backend alone must be enough, and a backup of
the job running meanwhile, which holds the job's cache, is no obstacle), and
the manifest is never taken from virt-dup's metadata cache.  No header is
rewritten, nothing is made sparse: the files are only read.

``virt-dup-verify@<job-uuid>.timer`` (from the job option
``verify_schedule``) runs this regularly through
``virt-dup-verify@.service``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from virt_dup.actions.status import refresh_metrics
from virt_dup.config.load import Config
from virt_dup.duplicity.target import isolated
from virt_dup.errors import VirtDupError
from virt_dup.files import human_size
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.restore.plan import bases_needed, plan_restore, target_dir_destinations
from virt_dup.restore.sources import (
    BackupSource,
    NoBackups,
    changes_sets,
    changes_source,
    choose_backup,
    collection,
    find_sources,
    one_source,
    point_of,
)
from virt_dup.restore.workspace import Workspace, apply_deltas, fetch_and_check
from virt_dup.systemd import journal

#: Where scratch directories go unless --scratch-dir says otherwise: on disk,
#: not in a RAM-backed /tmp (a scratch holds whole disk images).
DEFAULT_SCRATCH_PARENT = "/var/tmp"


class VerifyFailed(VirtDupError):
    """The backup did not verify (its result is recorded already)."""

    def __init__(self, result: VerifyResult) -> None:
        super().__init__(result.summary())
        self.result = result


@dataclass
class VerifyResult(journal.Outcome):
    """What a verification found."""

    ACTION = "verify"
    MESSAGE_ID = journal.MESSAGE_VERIFY

    backup_id: str = "?"
    files: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    def _what(self) -> str:
        return f"backup {self.backup_id} of job {self.job_uuid} (domain {self.domain})"

    def success_line(self) -> str:
        return (
            f"verified {self._what()}: {self.files} file(s), {human_size(self.bytes)}, "
            f"checksums equal, qemu-img check clean, in {self.duration_seconds:.1f} s"
        )

    def failure_line(self) -> str:
        return f"verification of {self._what()} FAILED: {self.message}"

    def details(self) -> dict[str, object]:
        return {"BACKUP_ID": self.backup_id, "BYTES_RESTORED": self.bytes}


def scratch_parent(explicit: str | None) -> str:
    """--scratch-dir, else $TMPDIR, else /var/tmp."""
    return explicit or os.environ.get("TMPDIR") or DEFAULT_SCRATCH_PARENT


def verify(
    config: Config,
    hypervisor: Callable[[], Hypervisor],
    job_or_domain: str,
    backup_id: str | None = None,
    *,
    backend_url: str | None = None,
    job_uuid: str | None = None,
    scratch: str | None = None,
    report: Callable[[str], None] = lambda _line: None,
) -> VerifyResult:
    """Verify one backup; returns the result, raises :class:`VerifyFailed` when it fails.

    Problems that stop a verification from starting (no such job, no
    backend) raise as they are and are not a verdict on the backup.
    """
    found = find_sources(
        config, hypervisor, job_or_domain, backend_url=backend_url, job_uuid=job_uuid, report=report
    )
    source, found_metadata = one_source(found, job_or_domain)
    result = VerifyResult(source.job_uuid, backup_id=backup_id or "latest")
    if source.job is not None:
        result.domain = source.job.domain_name
    elif found_metadata is not None:
        result.domain = found_metadata.manifest.domain_name
    parent = scratch_parent(scratch)
    Path(parent).mkdir(parents=True, exist_ok=True)
    directory = tempfile.mkdtemp(prefix=f"virt-dup-verify-{source.job_uuid}-", dir=parent)
    try:
        # The metrics file follows (its ages and freshness); a backend read on a
        # fresh host, without the job in libvirt, leaves it alone.
        also = () if source.job is None else (lambda _done: refresh_metrics(config, hypervisor()),)
        with journal.recorded(result, *also):
            # A duplicity cache of its own: the backend alone must be enough, and a
            # backup of the job running meanwhile holds the job's cache.
            alone = replace(source, target=isolated(source.target, Path(directory) / "cache"))
            _verify(config, alone, backup_id, Path(directory) / "files", result, report)
    except NoBackups:
        raise  # nothing to verify is not a verdict on a backup (exit 3)
    except VirtDupError:
        raise VerifyFailed(result) from None
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return result


def _verify(
    config: Config,
    source: BackupSource,
    backup_id: str | None,
    directory: Path,
    result: VerifyResult,
    report: Callable[[str], None],
) -> None:
    main, changes = collection(source), changes_sets(source)
    chosen = choose_backup(main, backup_id, extra=changes)
    result.backup_id = chosen.id
    point = point_of(config, source, chosen, main, changes, use_cache=False, report=report)
    metadata = point.metadata
    result.domain = metadata.manifest.domain_name
    disks = metadata.manifest.disks
    # Headers are not rewritten: a base the backup does not hold is not needed.
    bases = {
        target: (recorded.path, recorded.format) for target, recorded in bases_needed(disks).items()
    }
    plan = plan_restore(disks, target_dir_destinations(disks, str(directory)), bases)
    workspace = Workspace()
    restored = fetch_and_check(source, point.read_id, plan, workspace, rewrite=False, report=report)
    apply_deltas(changes_source(source), point.deltas, plan, restored, workspace, report)
    result.files = len(restored.staged)
    result.bytes = restored.bytes
    result.warnings = restored.warnings
