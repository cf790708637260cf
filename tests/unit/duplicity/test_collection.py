"""When a run applies retention, and when it may start a backup set: pure rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from virt_dup.backup.plan import wait_past_last_backup
from virt_dup.config.options import JobOptions
from virt_dup.duplicity.collection import BackupSet, Chain, Collection, retention_due

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def collection(*chains: str, end: datetime = NOW) -> Collection:
    """``"FII", "F"``: a chain of a full and two incrementals, then a full alone;
    one set a day, the newest at ``end``."""
    count = sum(len(chain) for chain in chains)
    times = iter(end - timedelta(days=count - 1 - number) for number in range(count))
    return Collection(
        tuple(
            Chain(
                tuple(
                    BackupSet("full" if kind == "F" else "incremental", next(times), 1, True)
                    for kind in chain
                ),
                complete=True,
            )
            for chain in chains
        )
    )


def test_nothing_is_due_on_a_young_collection() -> None:
    options = JobOptions(full_retention=2, incremental_retention=1, max_age="30D")
    assert retention_due(collection(), options, NOW) == ()
    assert retention_due(collection("F"), options, NOW) == ()
    assert retention_due(collection("FIII"), options, NOW) == ()
    assert retention_due(collection("F", "FI"), options, NOW) == ()


def test_full_retention_counts_chains() -> None:
    options = JobOptions(full_retention=2)
    assert retention_due(collection("F", "F"), options, NOW) == ()
    assert retention_due(collection("F", "F", "F"), options, NOW) == ("full_retention",)


def test_incremental_retention_looks_at_older_chains_only() -> None:
    options = JobOptions(full_retention=3, incremental_retention=1)
    assert retention_due(collection("F", "FIII"), options, NOW) == ()
    assert retention_due(collection("FI", "F"), options, NOW) == ("incremental_retention",)
    # Not less than full_retention: there is nothing it could drop.
    same = JobOptions(full_retention=1, incremental_retention=1)
    assert "incremental_retention" not in retention_due(collection("FI", "F"), same, NOW)


def test_max_age_never_counts_the_newest_chain() -> None:
    options = JobOptions(max_age="2D")
    assert retention_due(collection("FIIII"), options, NOW) == ()
    assert retention_due(collection("FI", end=NOW - timedelta(days=10)), options, NOW) == ()
    assert retention_due(collection("FI", "FI"), options, NOW) == ()  # first ends 2 days ago
    assert retention_due(collection("FI", "FII"), options, NOW) == ("max_age",)


def test_a_new_set_extends_the_last_chain_or_starts_one() -> None:
    before = collection("FI")
    later = NOW + timedelta(hours=1)
    assert [len(chain.sets) for chain in before.with_backup("incremental", later).chains] == [3]
    assert [len(chain.sets) for chain in before.with_backup("full", later).chains] == [2, 1]
    assert Collection(()).with_backup("incremental", later).chains[0].end_time == later


def test_a_run_never_starts_a_backup_in_the_second_of_the_last_one() -> None:
    slept: list[float] = []
    last = collection("FI")  # the newest set at NOW
    assert wait_past_last_backup(last, clock=lambda: NOW.timestamp() + 0.25, sleep=slept.append)
    assert slept == [0.75]
    assert wait_past_last_backup(last, clock=lambda: NOW.timestamp() + 1.0, sleep=slept.append) == 0
    assert wait_past_last_backup(Collection(()), clock=lambda: 0.0, sleep=slept.append) == 0
    assert slept == [0.75]
