"""A job's duplicity collection as ``collection-status`` reports it, and the
rules that decide full or incremental and what retention deletes.  Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from virt_dup.config.options import JobOptions, interval_length
from virt_dup.duplicity.times import format_time, parse_time
from virt_dup.errors import CommandError


@dataclass(frozen=True)
class BackupSet:
    """A full or incremental backup in a chain.

    ``time``: aware UTC datetime (an incremental's end time); ``id``: the same
    as duplicity writes it, usable with ``--time``.
    """

    kind: str  # "full" or "incremental"
    time: datetime
    volumes: int
    encrypted: bool

    @property
    def id(self) -> str:
        return format_time(self.time)


@dataclass(frozen=True)
class Chain:
    """A full backup and the incrementals that build on it, oldest first.

    ``complete``: duplicity found its signatures (the primary chain an
    incremental would extend); older chains are "secondary".
    """

    sets: tuple[BackupSet, ...]
    complete: bool

    @property
    def full(self) -> BackupSet:
        return self.sets[0]

    @property
    def incrementals(self) -> tuple[BackupSet, ...]:
        return self.sets[1:]

    @property
    def start_time(self) -> datetime:
        return self.sets[0].time

    @property
    def end_time(self) -> datetime:
        return self.sets[-1].time


@dataclass(frozen=True)
class Collection:
    """Every chain of a job's collection (oldest first) and the leftovers
    duplicity found (sets without a chain, unfinished sets)."""

    chains: tuple[Chain, ...]
    orphaned_sets: int = 0
    incomplete_sets: int = 0

    @property
    def backup_sets(self) -> tuple[BackupSet, ...]:
        return tuple(backup_set for chain in self.chains for backup_set in chain.sets)

    @property
    def last_full_time(self) -> datetime | None:
        return self.chains[-1].full.time if self.chains else None

    @property
    def last_backup_time(self) -> datetime | None:
        return self.chains[-1].end_time if self.chains else None

    def with_backup(self, kind: str, time: datetime) -> Collection:
        """This collection after a new ``full`` or ``incremental`` set made at ``time``."""
        new_set = BackupSet(kind=kind, time=time, volumes=0, encrypted=False)
        if kind == "full" or not self.chains:
            chains = (*self.chains, Chain((new_set,), complete=True))
        else:
            last = self.chains[-1]
            chains = (*self.chains[:-1], Chain((*last.sets, new_set), last.complete))
        return Collection(chains, self.orphaned_sets, self.incomplete_sets)


def parse_collection_status(control: Sequence[str]) -> Collection:
    """A :class:`Collection` from the control lines of the ``INFO 3`` record.

    Raises :class:`CommandError` on a line it does not understand (a
    duplicity version that changed the format must not be misread).
    """
    chains: list[tuple[bool, list[BackupSet]]] = []
    counts = {"orphaned-sets-num": 0, "incomplete-sets-num": 0}
    for line in control:
        words = line.split()
        if not words or words[0] in ("backend", "archive-dir"):
            continue
        if words[0] in ("chain-complete", "chain-no-sig"):
            chains.append((words[0] == "chain-complete", []))
        elif words[0] in ("full", "inc") and len(words) == 4 and chains:
            try:
                backup_set = BackupSet(
                    kind="full" if words[0] == "full" else "incremental",
                    time=parse_time(words[1]),
                    volumes=int(words[2]),
                    encrypted=words[3] == "enc",
                )
            except ValueError:
                raise CommandError(f"duplicity collection status: bad line {line!r}") from None
            chains[-1][1].append(backup_set)
        elif words[0] in counts and len(words) == 2 and words[1].isdigit():
            counts[words[0]] = int(words[1])
        else:
            raise CommandError(f"duplicity collection status: unexpected line {line!r}")
    parsed = []
    for complete, sets in chains:
        if not sets or sets[0].kind != "full":
            raise CommandError("duplicity collection status: a chain without a full backup")
        parsed.append(Chain(tuple(sets), complete))
    parsed.sort(key=lambda chain: chain.start_time)
    return Collection(
        tuple(parsed),
        orphaned_sets=counts["orphaned-sets-num"],
        incomplete_sets=counts["incomplete-sets-num"],
    )


def full_is_due(
    collection: Collection, full_every: str | None, *, now: datetime | None = None
) -> bool:
    """Whether the next backup of ``collection`` is a full one: there is no chain
    yet, or its full backup is at least ``full_every`` (an interval) old."""
    last_full = collection.last_full_time
    if last_full is None:
        return True
    if full_every is None:
        return False
    return (now or datetime.now(UTC)) - last_full >= interval_length(full_every)


def retention_due(
    collection: Collection | None, options: JobOptions, now: datetime
) -> tuple[str, ...]:
    """The retention options that would delete something from ``collection``
    (``max_age``, ``full_retention``, ``incremental_retention``, in that order);
    with no ``collection`` (unknown), every option that is set.

    Pure; it mirrors duplicity's own rules, which never delete the newest
    chain: ``remove-older-than`` deletes the other chains whose newest set
    is older than the age, ``remove-all-but-n-full N`` every chain but the N
    newest, ``remove-all-inc-of-but-n-full N`` the incrementals of every
    chain but the N newest (only meaningful below ``full_retention``).  Each
    verdict is taken before any deletion, which can only make a later rule
    have less to do, never more.
    """
    keep_incrementals = options.incremental_retention
    if keep_incrementals and options.full_retention and keep_incrementals >= options.full_retention:
        keep_incrementals = None
    if collection is None:
        rules = {
            "max_age": bool(options.max_age),
            "full_retention": bool(options.full_retention),
            "incremental_retention": bool(keep_incrementals),
        }
    else:
        older = collection.chains[:-1]
        rules = {
            "max_age": bool(options.max_age)
            and any(
                chain.end_time < now - interval_length(options.max_age or "") for chain in older
            ),
            "full_retention": bool(options.full_retention)
            and len(collection.chains) > (options.full_retention or 0),
            "incremental_retention": bool(keep_incrementals)
            and any(chain.incrementals for chain in collection.chains[: -(keep_incrementals or 1)]),
        }
    return tuple(name for name, due in rules.items() if due)
