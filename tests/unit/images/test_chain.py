"""Depth selection (the original virt-dup's semantics), and reading chains with qemu-img."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from virt_dup.errors import CommandError, ConfigError, NotFoundError
from virt_dup.images.chain import ChainFile, read_chain, select_chain

MIB = 1024 * 1024


def image(name: str, backing: str | None = None) -> ChainFile:
    return ChainFile(
        path=f"/var/lib/libvirt/images/{name}",
        format="qcow2",
        virtual_size=64 * MIB,
        backing_file=backing,
        backing_format="qcow2" if backing else None,
        actual_size=196_616,
    )


BASE = image("base.qcow2")
VM01 = image("vm01.qcow2", "base.qcow2")
SNAP = image("vm01.qcow2.snap", "vm01.qcow2")
#: The seed's example: [base.qcow2] -> [vm01.qcow2] -> [vm01.qcow2.snap], top first.
SEED_CHAIN = (SNAP, VM01, BASE)


# --- the seed README's examples ---------------------------------------------------


def test_depth_1_is_the_topmost_file_only() -> None:
    assert select_chain(SEED_CHAIN, 1, "vda") == (SNAP,)


def test_depth_0_is_the_whole_chain() -> None:
    assert select_chain(SEED_CHAIN, 0, "vda") == (SNAP, VM01, BASE)


def test_depth_minus_1_leaves_out_the_base() -> None:
    assert select_chain(SEED_CHAIN, -1, "vda") == (SNAP, VM01)


def test_depth_2_is_the_top_and_its_backing_store() -> None:
    assert select_chain(SEED_CHAIN, 2, "vda") == (SNAP, VM01)


def test_depth_minus_1_on_a_single_image_selects_nothing_and_says_so() -> None:
    with pytest.raises(ConfigError) as raised:
        select_chain((image("vm.qcow2"),), -1, "vda")
    assert str(raised.value) == "depth -1 selects no file of disk vda (chain: vm.qcow2)"


# --- every other case ----------------------------------------------------------------


def test_depth_equal_to_the_chain_length_is_the_whole_chain() -> None:
    assert select_chain(SEED_CHAIN, 3, "vda") == SEED_CHAIN


def test_depth_longer_than_the_chain_is_the_whole_chain() -> None:
    assert select_chain(SEED_CHAIN, 10, "vda") == SEED_CHAIN


def test_depth_minus_2_keeps_the_top_only() -> None:
    assert select_chain(SEED_CHAIN, -2, "vda") == (SNAP,)


@pytest.mark.parametrize("depth", [-3, -4])
def test_negative_depth_as_long_as_the_chain_selects_nothing(depth: int) -> None:
    with pytest.raises(ConfigError) as raised:
        select_chain(SEED_CHAIN, depth, "vdb")
    assert str(raised.value) == (
        f"depth {depth} selects no file of disk vdb "
        "(chain: base.qcow2 <- vm01.qcow2 <- vm01.qcow2.snap)"
    )


@pytest.mark.parametrize(("depth", "expected"), [(0, (BASE,)), (1, (BASE,)), (5, (BASE,))])
def test_single_image(depth: int, expected: tuple[ChainFile, ...]) -> None:
    assert select_chain((BASE,), depth, "vda") == expected


def test_two_image_chain_depth_minus_1_is_the_domain_image() -> None:
    # The shared-base case the option exists for: base.qcow2 <- vm01.qcow2.
    assert select_chain((VM01, BASE), -1, "vda") == (VM01,)


def test_selection_is_a_tuple_even_from_a_list() -> None:
    assert select_chain([VM01, BASE], 0, "vda") == (VM01, BASE)


def test_empty_chain_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"depth 0 selects no file of disk vda \(chain: empty\)"):
        select_chain((), 0, "vda")


# --- read_chain: real qemu-img on scratch images ------------------------------------


@pytest.fixture
def needs_qemu_img(require: Callable[[bool, str], None]) -> None:
    require(shutil.which("qemu-img") is not None, "qemu-img not installed (package qemu-utils)")


def qemu_img_create(path: Path, backing: str | None = None, *, unsafe: bool = False) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2"]
    if unsafe:
        argv.append("-u")  # do not open the backing file (it does not exist)
    argv += [str(path), str(64 * MIB)]
    subprocess.run(argv, check=True, capture_output=True)


@pytest.mark.usefixtures("needs_qemu_img")
def test_read_chain_top_first_with_relative_backing_names(tmp_path: Path) -> None:
    (tmp_path / "vm").mkdir()
    qemu_img_create(tmp_path / "base.qcow2")
    qemu_img_create(tmp_path / "vm" / "vm.qcow2", "../base.qcow2")
    qemu_img_create(tmp_path / "vm" / "vm.snap.qcow2", "vm.qcow2")

    chain = read_chain(str(tmp_path / "vm" / "vm.snap.qcow2"))

    assert [file.path for file in chain] == [
        str(tmp_path / "vm" / "vm.snap.qcow2"),
        str(tmp_path / "vm" / "vm.qcow2"),
        str(tmp_path / "base.qcow2"),
    ]
    assert [file.backing_file for file in chain] == ["vm.qcow2", "../base.qcow2", None]
    assert [file.backing_format for file in chain] == ["qcow2", "qcow2", None]
    assert {file.format for file in chain} == {"qcow2"}
    assert {file.virtual_size for file in chain} == {64 * MIB}
    assert all(file.actual_size > 0 for file in chain)


@pytest.mark.usefixtures("needs_qemu_img")
def test_read_chain_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"disk image .*/gone\.qcow2 does not exist"):
        read_chain(str(tmp_path / "gone.qcow2"))


@pytest.mark.usefixtures("needs_qemu_img")
def test_read_chain_of_a_file_that_is_not_a_qcow2_image(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image\n")
    with pytest.raises(CommandError, match=r"notes\.txt.*not in qcow2 format"):
        read_chain(str(tmp_path / "notes.txt"))


@pytest.mark.usefixtures("needs_qemu_img")
def test_read_chain_with_a_missing_backing_file(tmp_path: Path) -> None:
    qemu_img_create(tmp_path / "orphan.qcow2", "gone.qcow2", unsafe=True)
    with pytest.raises(CommandError, match=r"gone\.qcow2.*No such file"):
        read_chain(str(tmp_path / "orphan.qcow2"))
