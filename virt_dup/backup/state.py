"""What virt-dup keeps in its state directory (``/var/lib/virt-dup``).

* ``runs/<domain-uuid>.json`` — the plan of a backup in flight, written
  *before* the first overlay exists and removed only after every overlay is
  merged.  Recovery reads it after a crash.
* ``<lock directory>/<domain-uuid>.lock`` — one run per domain at a time
  (flock), per *host*: ``/run/virt-dup/locks`` (a user's own,
  ``$XDG_RUNTIME_DIR/virt-dup/locks``), not in the state directory, so two
  configurations (two state directories, a hand-run ``--config``) never
  back up one domain at once, and recovery never merges the overlay of a
  run that is alive: that run holds the lock.
* ``status/<job-uuid>.json`` — the last run, the last success, the last error.
* ``metadata/<job-uuid>/`` — the metadata folder backed up with the disks.

Every file is written atomically (temporary file, fsync, rename) so a crash
never leaves a half-written plan.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from virt_dup.backup.plan import DiskPlan
from virt_dup.config.load import Config
from virt_dup.errors import VirtDupError
from virt_dup.files import make_directories, write_atomically


class LockTimeout(VirtDupError):
    """Another virt-dup run holds the domain's lock for longer than we wait."""


@dataclass
class RunRecord:
    """The plan of one run, as recovery needs it."""

    job_uuid: str
    domain_uuid: str
    domain_name: str
    started: str  # ISO 8601
    pid: int
    full: bool
    phase: str  # planned -> overlays -> backup -> merge
    disks: tuple[DiskPlan, ...] = ()
    #: Disks whose overlay is committed into the original top (the pivot or
    #: qemu-img commit is done): their overlays hold nothing the top lacks and
    #: may be deleted, once every definition names the top again, without a look.
    committed: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "disks": [disk.as_json() for disk in self.disks]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        disks = tuple(DiskPlan.from_json(disk) for disk in data.pop("disks", []))
        return cls(**data, disks=disks)


class StateStore:
    """The state directory; every path virt-dup keeps there is decided here."""

    def __init__(
        self,
        directory: Path,
        lock_directory: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.lock_directory = lock_directory
        self.clock = clock

    @classmethod
    def of(cls, config: Config) -> StateStore:
        """The state of ``config``'s scope, with the host's locks."""
        return cls(config.state_directory, config.lock_directory)

    # -- run records ------------------------------------------------------------
    def run_path(self, domain_uuid: str) -> Path:
        return self.directory / "runs" / f"{domain_uuid}.json"

    def save_run(self, record: RunRecord) -> None:
        write_atomically(self.run_path(record.domain_uuid), json.dumps(record.as_json(), indent=2))

    def load_run(self, domain_uuid: str) -> RunRecord | None:
        try:
            return RunRecord.from_json(json.loads(self.run_path(domain_uuid).read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise VirtDupError(
                f"cannot read the run record {self.run_path(domain_uuid)}: {error}"
            ) from None

    def unfinished_runs(self) -> list[RunRecord]:
        runs = self.directory / "runs"
        if not runs.is_dir():
            return []
        found = []
        for path in sorted(runs.glob("*.json")):
            record = self.load_run(path.stem)
            if record is not None:
                found.append(record)
        return found

    def clear_run(self, domain_uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.run_path(domain_uuid).unlink()

    # -- locks ------------------------------------------------------------------
    @contextlib.contextmanager
    def domain_lock(
        self, domain_uuid: str, domain_name: str, wait_seconds: float = 600.0
    ) -> Iterator[None]:
        """Hold the domain's lock; wait at most ``wait_seconds`` for another run.

        Raises :class:`LockTimeout` naming the domain and the holder's pid.
        """
        path = self.lock_directory / f"{domain_uuid}.lock"
        make_directories(path.parent, 0o700)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = self.clock() + wait_seconds
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self.clock() >= deadline:
                        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
                        raise LockTimeout(
                            f"domain {domain_name} is busy: another virt-dup run "
                            f"(pid {holder or 'unknown'}) holds {path}; gave up after "
                            f"{wait_seconds:.0f} s"
                        ) from None
                    time.sleep(0.2)
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(descriptor)  # closing releases the flock

    @contextlib.contextmanager
    def run_slot(
        self, slots: int, wait_seconds: float, waiting: Callable[[], None] = lambda: None
    ) -> Iterator[None]:
        """Hold one of the host's ``slots`` run slots (``max_parallel_runs``): a
        flock on ``slot-<n>.lock`` in the host's lock directory, released when the
        process ends however it ends.  ``waiting`` is called once when all are
        taken.  Raises :class:`LockTimeout` after ``wait_seconds``."""
        make_directories(self.lock_directory, 0o700)
        descriptors = []
        try:
            for number in range(slots):
                path = self.lock_directory / f"slot-{number}.lock"
                descriptors.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            deadline = self.clock() + wait_seconds
            told = False
            while True:
                for descriptor in descriptors:
                    try:
                        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    os.ftruncate(descriptor, 0)
                    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
                    yield
                    return
                if self.clock() >= deadline:
                    raise LockTimeout(
                        f"all {slots} run slots of this host stayed taken for {wait_seconds:.0f} s "
                        "(max_parallel_runs)"
                    )
                if not told:
                    waiting()
                    told = True
                time.sleep(0.5)
        finally:
            for descriptor in descriptors:
                os.close(descriptor)

    def lock_holder(self, domain_uuid: str) -> str | None:
        """Who holds the domain's lock now: the holder's pid (``"unknown"`` when it
        wrote none), or None when it is free.  Creates nothing and holds nothing
        (a dry run asks this).  Raises :class:`OSError` for an unreadable lock."""
        path = self.lock_directory / f"{domain_uuid}.lock"
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            return None  # closing the descriptor releases the shared lock at once
        finally:
            os.close(descriptor)

    # -- status -----------------------------------------------------------------
    def status_path(self, job_uuid: str) -> Path:
        return self.directory / "status" / f"{job_uuid}.json"

    def load_status(self, job_uuid: str) -> dict[str, Any]:
        try:
            loaded = json.loads(self.status_path(job_uuid).read_text())
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def record_result(self, job_uuid: str, result: dict[str, Any]) -> dict[str, Any]:
        """Merge one run's result into the job's status file; returns the new status.

        ``result`` has ``finished`` (ISO time) and ``result`` (success, failed,
        skipped); a success also sets ``last_success`` (and ``last_full`` for a
        full backup), a failure ``last_error``.
        """
        status = self.load_status(job_uuid)
        status["last_run"] = result
        if result.get("result") == "success":
            status["last_success"] = result
            if result.get("full") is True:
                status["last_full"] = result
        elif result.get("result") == "failed":
            status["last_error"] = result
        # Each destination's own freshness: a run that failed only to copy to one
        # still made a backup on the others.
        destinations = status.setdefault("destinations", {})
        for backend, outcome in (result.get("destinations") or {}).items():
            entry = destinations.setdefault(backend, {})
            entry["last_run"] = {**outcome, "finished": result.get("finished")}
            if outcome.get("result") == "success":
                entry["last_success"] = {
                    "finished": result.get("finished"),
                    "backup_time": result.get("backup_time"),
                }
        write_atomically(self.status_path(job_uuid), json.dumps(status, indent=2), mode=0o644)
        return status

    # -- metadata folder --------------------------------------------------------
    def metadata_dir(self, job_uuid: str) -> Path:
        return self.directory / "metadata" / job_uuid
