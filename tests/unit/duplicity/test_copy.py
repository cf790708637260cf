"""Which sets a copy to another destination makes, in which order (pure)."""

from __future__ import annotations

import pytest

from virt_dup.duplicity.copy import backup_sets, check_sizes, collection_of, copy_plan
from virt_dup.errors import CommandError

T1, T2, T3, T4 = "20261201T020000Z", "20261202T020000Z", "20261203T020000Z", "20261204T020000Z"


def full(time: str, volumes: int = 2) -> list[str]:
    return [
        *(f"duplicity-full.{time}.vol{n}.difftar.gpg" for n in range(1, volumes + 1)),
        f"duplicity-full-signatures.{time}.sigtar.gpg",
        f"duplicity-full.{time}.manifest.gpg",
    ]


def inc(start: str, end: str) -> list[str]:
    return [
        f"duplicity-inc.{start}.to.{end}.vol1.difftar.gpg",
        f"duplicity-new-signatures.{start}.to.{end}.sigtar.gpg",
        f"duplicity-inc.{start}.to.{end}.manifest.gpg",
    ]


def test_sets_are_copied_oldest_first_with_the_manifest_last() -> None:
    source = [*inc(T1, T2), *full(T1, volumes=11)]
    plan = copy_plan(source, [])
    assert [backup_set.end for backup_set in plan.copy] == [T1, T2]
    names = plan.files
    assert names[:11] == [f"duplicity-full.{T1}.vol{n}.difftar.gpg" for n in range(1, 12)]
    assert names[12] == f"duplicity-full.{T1}.manifest.gpg"
    assert names[-1] == f"duplicity-inc.{T1}.to.{T2}.manifest.gpg"
    assert plan.delete == ()


def test_what_the_target_has_whole_is_not_copied_again() -> None:
    plan = copy_plan([*full(T1), *inc(T1, T2), *inc(T2, T3)], [*full(T1), *inc(T1, T2)])
    assert [backup_set.key for backup_set in plan.copy] == [(T2, T3)]


def test_a_set_without_its_manifest_on_the_target_is_replaced() -> None:
    """An interrupted copy: volumes there, manifest not; its files go, then all come again."""
    part = full(T1)[:1]
    plan = copy_plan(full(T1), part)
    assert plan.delete == tuple(part)
    assert plan.files == full(T1)[:2] + full(T1)[2:]


def test_an_incremental_is_never_copied_onto_a_hole() -> None:
    """The target lacks the set T2 (and the source no longer has it): T2->T3 would
    continue nothing there; the new full T4 is copied."""
    plan = copy_plan([*inc(T2, T3), *full(T4)], [*full(T1), *inc(T1, T2)[:1]])
    assert [backup_set.key for backup_set in plan.copy] == [(None, T4)]
    assert [backup_set.key for backup_set in plan.skipped] == [(T2, T3)]


def test_sets_only_the_target_has_are_left_alone() -> None:
    """Each destination keeps as many as its own retention says."""
    plan = copy_plan([*full(T3)], [*full(T1), *inc(T1, T2)])
    assert plan.delete == ()
    assert [backup_set.key for backup_set in plan.copy] == [(None, T3)]


def test_a_set_the_source_is_still_writing_is_not_copied() -> None:
    plan = copy_plan([*full(T1), *inc(T1, T2)[:2]], [])
    assert [backup_set.key for backup_set in plan.copy] == [(None, T1)]


def test_other_files_are_not_sets() -> None:
    assert backup_sets(["lockfile", ".virt-dup-check-1", "duplicity-full.x.manifest"]) == {}


def test_the_collection_of_a_listing_is_its_whole_chains() -> None:
    """What a mirror's retention decides on, without a duplicity run."""
    names = [*full(T1), *inc(T1, T2), *inc(T2, T3)[:2], *full(T4)]
    collection = collection_of(names)
    assert [[s.id for s in chain.sets] for chain in collection.chains] == [[T1, T2], [T4]]
    assert [s.kind for s in collection.chains[0].sets] == ["full", "incremental"]


def test_an_incremental_never_forks_a_chain_on_the_target() -> None:
    """The target went on without the source meanwhile (T1->T3 made there while the
    source was unreachable): the source's T1->T2 would make two heads."""
    plan = copy_plan([*full(T1), *inc(T1, T2), *inc(T2, T4)], [*full(T1), *inc(T1, T3)])
    assert plan.copy == ()
    assert [backup_set.key for backup_set in plan.skipped] == [(T1, T2), (T2, T4)]


def test_catching_up_copies_only_what_is_newer_than_the_target_has() -> None:
    """A mirror keeps more chains than the first destination: catching the first one
    up brings back only the sets made while it was unreachable."""
    mirror = [*full(T1), *inc(T1, T2), *full(T3), *inc(T3, T4)]
    first = [*full(T3)]
    plan = copy_plan(mirror, first, newer_only=True)
    assert [backup_set.key for backup_set in plan.copy] == [(T3, T4)]


def test_a_copy_is_checked_by_the_sizes_the_backends_say() -> None:
    names = full(T1)
    sizes: dict[str, int | None] = dict.fromkeys(names, 10)
    check_sizes(sizes, {**sizes, names[0]: None}, names, "sftp://h//b")  # unknown: fine
    with pytest.raises(CommandError, match=r"has 9 bytes there, 10 here"):
        check_sizes(sizes, {**sizes, names[0]: 9}, names, "sftp://h//b")
    with pytest.raises(CommandError, match=r"is not there after the copy"):
        check_sizes(sizes, {name: 10 for name in names[1:]}, names, "sftp://h//b")
