"""``virt-dup migrate-backend JOB_UUID --to BACKEND [--keep-source]``.

Moves a job's whole collection to another backend and switches the job to it:

1. under the domain's lock (no backup of it runs meanwhile), copy every whole
   backup set the target lacks, byte for byte (:mod:`virt_dup.duplicity.copy`:
   any scheme to any scheme, resumable: a rerun copies only what is missing);
2. check it there: duplicity lists the same backups on the target as on the
   source, and a verification restores the latest one from the target alone
   and checks every file against the manifest's checksums;
3. record the migration in the state directory, switch the job (its first
   backend becomes the target; its other destinations stay), then delete the
   source's collection (unless ``--keep-source``) and clear the record.

The source is never touched before step 2 passed.  Interrupted anywhere, the
same command finishes it: before the switch it copies what is missing and
checks again; after it, the record names the source still to delete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from virt_dup.actions.verify import verify
from virt_dup.backup.plan import destination
from virt_dup.backup.state import StateStore
from virt_dup.config.load import Config, check_policy
from virt_dup.config.options import JobOptions, masked_url
from virt_dup.duplicity.copy import copy_collection, copy_plan, delete_collection, listing
from virt_dup.duplicity.runner import Duplicity
from virt_dup.duplicity.target import (
    CHANGES_DIRECTORY,
    Target,
    cache_name,
    changes_target,
    isolated,
    job_target,
)
from virt_dup.errors import ConfigError, VirtDupError
from virt_dup.files import write_atomically
from virt_dup.libvirt.connection import Hypervisor


class MigrationFailed(VirtDupError):
    """The copy could not be made or did not check out; the job is unchanged."""


@dataclass
class MigrateResult:
    job_uuid: str
    domain: str
    source: str
    target: str
    sets_copied: int = 0
    bytes_copied: int = 0
    backups: int = 0
    verified_backup: str | None = None
    source_deleted: bool = False
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kept = "deleted from" if self.source_deleted else "kept on"
        return (
            f"job {self.job_uuid} of domain {self.domain}: backs up to {self.target} now; "
            f"its backups are {kept} {self.source}"
        )

    def as_json(self) -> dict[str, object]:
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "lines"}


def migrate_backend(
    config: Config,
    hypervisor: Hypervisor,
    job_uuid: str,
    to: str,
    *,
    keep_source: bool = False,
    duplicity: Duplicity | None = None,
    report: Callable[[str], None] = lambda _line: None,
    lock_wait_seconds: float = 600.0,
) -> MigrateResult:
    """See the module; raises :class:`MigrationFailed` (nothing switched, nothing
    deleted) or :class:`ConfigError` for a bad request."""
    duplicity = duplicity or Duplicity()
    domain, job = hypervisor.find_job(job_uuid)
    options = job.options.over(config.defaults)
    backends = options.backends or ()
    if not backends:
        raise ConfigError(f"job {job.uuid}: no backend to migrate from")
    target_url = config.backend_url(to)
    store = StateStore.of(config)
    record_path = store.directory / "migrations" / f"{job.uuid}.json"
    with store.domain_lock(domain.UUIDString(), domain.name(), lock_wait_seconds):
        source_url = config.backend_url(backends[0])
        if source_url == target_url:
            return _finish(config, job.uuid, domain.name(), record_path, target_url, report)
        # The job as it will be: the target first, its other destinations kept.
        switched = (to, *(b for b in backends[1:] if config.backend_url(b) != target_url))
        check_policy(config, JobOptions(backends=(to,)), f"job {job.uuid}: --to")
        result = MigrateResult(
            job.uuid, domain.name(), masked_url(source_url), masked_url(target_url)
        )
        source = destination(config, job.uuid, options, source_url).target
        target = destination(config, job.uuid, options, target_url).target

        def say(line: str) -> None:
            result.lines.append(line)
            report(line)

        try:
            _copy_and_check(
                config,
                hypervisor,
                duplicity,
                job.uuid,
                source=source,
                target=target,
                target_url=target_url,
                result=result,
                say=say,
            )
        except VirtDupError as error:
            raise MigrationFailed(
                f"job {job.uuid}: migration to {result.target} stopped, the job still uses "
                f"{result.source} and nothing there was deleted: {error}"
            ) from None
        write_atomically(
            record_path,
            json.dumps({"source": source_url, "target": target_url, "keep_source": keep_source}),
            mode=0o600,
        )
        jobs = hypervisor.jobs(domain)
        edited = dataclasses.replace(
            job, options=dataclasses.replace(job.options, backends=switched), uuid_derived=False
        )
        hypervisor.write_jobs(
            domain, [edited if other.uuid == job.uuid else other for other in jobs]
        )
        say(f"job {job.uuid} now backs up to {result.target}")
        finished = _finish(config, job.uuid, domain.name(), record_path, target_url, report)
        result.source_deleted = finished.source_deleted
        result.lines += finished.lines
        return result


def _copy_and_check(
    config: Config,
    hypervisor: Hypervisor,
    duplicity: Duplicity,
    job_uuid: str,
    *,
    source: Target,
    target: Target,
    target_url: str,
    result: MigrateResult,
    say: Callable[[str], None],
) -> None:
    """Copy what ``target`` lacks of both collections, then check that duplicity
    lists the same backups there and that the latest restores from it alone."""
    copied = copy_collection(source, target, config.cache_directory / target.name)
    # The changed-block sets too (a collection below the job's), after the
    # sets they apply to.
    source_changes, target_changes = changes_target(source), changes_target(target)
    changes = copy_collection(
        source_changes, target_changes, config.cache_directory / target_changes.name
    )
    left = copy_plan(list(listing(source_changes)), list(listing(target_changes)))
    if left.copy or left.skipped:
        raise MigrationFailed(
            f"{result.target} lacks {len(left.copy) + len(left.skipped)} changed-block "
            "set(s) after the copy"
        )
    copied = dataclasses.replace(
        copied, sets=copied.sets + changes.sets, bytes=copied.bytes + changes.bytes
    )
    result.sets_copied, result.bytes_copied = copied.sets, copied.bytes
    say(f"copied {copied.sets} backup set(s) to {result.target}")
    with tempfile.TemporaryDirectory(prefix="virt-dup-migrate-") as scratch:
        expected = [s.id for s in duplicity.collection_status(source).backup_sets]
        found = [
            s.id for s in duplicity.collection_status(isolated(target, Path(scratch))).backup_sets
        ]
    if found != expected:
        missing = sorted(set(expected) - set(found))
        raise MigrationFailed(
            f"{result.target} does not list the backups {result.source} holds "
            f"(missing: {', '.join(missing) or 'none'}; there: {len(found)})"
        )
    result.backups = len(found)
    say(f"{result.target} lists the same {len(found)} backup(s)")
    if found:
        verified = verify(
            config,
            lambda: hypervisor,
            job_uuid,
            backend_url=target.url.rsplit("/", 1)[0],
            job_uuid=job_uuid,
        )
        result.verified_backup = verified.backup_id
        say(f"verified backup {verified.backup_id} restored from {result.target}")


def _finish(
    config: Config,
    job_uuid: str,
    domain: str,
    record_path: Path,
    target_url: str,
    report: Callable[[str], None],
) -> MigrateResult:
    """After the switch: delete the source as the record says, then clear it.  With
    no record the job simply is on ``target_url`` already."""
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"job {job_uuid} already backs up to {masked_url(target_url)}") from None
    except (OSError, ValueError) as error:
        raise VirtDupError(f"{record_path}: cannot read the migration record: {error}") from None
    if record.get("target") != target_url:
        raise VirtDupError(
            f"{record_path}: an unfinished migration to {masked_url(str(record.get('target')))}; "
            "finish that one first"
        )
    source_url = str(record["source"])
    result = MigrateResult(job_uuid, domain, masked_url(source_url), masked_url(target_url))
    # The job's cache (named by its uuid) now serves the target: it holds the same
    # files.  The caches the migration used under other names go.
    for url, other in ((source_url, target_url), (target_url, source_url)):
        name = cache_name(job_uuid, JobOptions(backends=(other,)), config, url)
        for cache in (name, f"{name}.{CHANGES_DIRECTORY}"):
            shutil.rmtree(config.cache_directory / cache, ignore_errors=True)
    if not record.get("keep_source"):
        options = JobOptions(backends=(target_url,))
        old = job_target(config, job_uuid, options, source_url, writing=False)
        # The changed-block sets first: their directory is inside the job's.
        deleted = delete_collection(changes_target(old)) + delete_collection(old)
        result.source_deleted = True
        result.lines.append(f"deleted {deleted} file(s) of the job from {result.source}")
        report(result.lines[-1])
    record_path.unlink()
    return result
