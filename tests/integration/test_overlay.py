"""virt-dup's temporary overlays on real domains (libvirtd + QEMU): made, written
through by the guest, merged back with every write kept, whatever the domain's
power state did in between.  Every test ends with no overlay file left.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from harness.domains import MIB, DomainFactory, ScratchDomain, read_pattern_ok

from virt_dup.backup.overlay import (
    QuiesceResult,
    create_overlays,
    is_virt_dup_overlay,
    merge_overlay,
    overlay_path,
)
from virt_dup.errors import LibvirtError, VirtDupError
from virt_dup.libvirt.connection import Hypervisor

pytestmark = pytest.mark.integration

JOB = "0b9f6c1e-6f43-4c1e-9d1a-2b8f3c4d5e6f"
OTHER_JOB = "7a3e2b10-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
MERGE_TIMEOUT_S = 60.0


@pytest.fixture
def hypervisor(libvirt_conn: libvirt.virConnect) -> Hypervisor:
    return Hypervisor(libvirt_conn)


@pytest.fixture(autouse=True)
def no_overlay_left(make_domain: DomainFactory) -> Iterator[None]:
    """Every test must merge (and so delete) every overlay it made."""
    yield
    left = [
        path
        for path in make_domain.directory.rglob("*.qcow2")
        if is_virt_dup_overlay(str(path)) is not None
    ]
    assert not left, f"overlay files left behind: {left}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def overlay_of(vm: ScratchDomain, target: str = "vda", job: str = JOB) -> Path:
    return Path(overlay_path(str(vm.images[target][-1]), job))


def write_offline(image: Path, pattern: int, offset: int, length: int) -> None:
    """Write into an image no QEMU holds (a shut-off domain's overlay)."""
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#04x} {offset} {length}", image],
        check=True,
        capture_output=True,
    )


def assert_back_on_original(vm: ScratchDomain, overlay: Path, target: str = "vda") -> None:
    top = vm.images[target][-1]
    if vm.domain.isActive():
        assert vm.disk_source(target) == top
        assert vm.disk_chain(target) == vm.images[target]
    assert vm.disk_source(target, inactive=True) == top
    assert not overlay.exists()


# --- running domain ------------------------------------------------------------------


def test_running_domain_writes_into_the_overlay_and_merge_keeps_them(
    make_domain: DomainFactory, hypervisor: Hypervisor
) -> None:
    vm = make_domain(chain=["base", "vm"])
    base, top = vm.images["vda"]
    overlay = overlay_of(vm)
    assert overlay == top.with_name(f"vm.virt-dup-{JOB}.qcow2")
    vm.write_pattern("vda", 0x11, 0, MIB)  # before the backup: lands in vm.qcow2
    checksums = {base: sha256(base), top: sha256(top)}

    started = time.monotonic()
    result = create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    created_in = time.monotonic() - started

    assert (result.frozen, result.domain_active) == (False, True)
    assert result.reason is not None and "QEMU guest agent is not configured" in result.reason
    assert result.crash_consistent_only
    assert vm.disk_source("vda") == overlay
    assert vm.disk_source("vda", inactive=True) == overlay
    assert vm.disk_chain("vda") == (base, top, overlay)
    vm.write_pattern("vda", 0xCD, 1 * MIB, 1 * MIB)
    assert vm.read_pattern_ok(overlay, 0xCD, 1 * MIB, 1 * MIB, with_backing=False)
    assert {path: sha256(path) for path in checksums} == checksums, "the chain must not change"

    started = time.monotonic()
    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)
    merged_in = time.monotonic() - started

    assert_back_on_original(vm, overlay)
    assert read_pattern_ok(top, 0xCD, 1 * MIB, 1 * MIB, with_backing=False)
    assert read_pattern_ok(top, 0x11, 0, MIB, with_backing=False)
    assert sha256(base) == checksums[base]
    assert vm.is_running()
    print(f"overlay created in {created_in:.3f}s, merged live in {merged_in:.3f}s")


def test_paused_domain_is_merged_with_blockcommit(
    make_domain: DomainFactory, hypervisor: Hypervisor
) -> None:
    vm = make_domain(chain=["base", "vm"])
    top = vm.images["vda"][-1]
    overlay = overlay_of(vm)
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "off")
    vm.write_pattern("vda", 0xCD, 1 * MIB, 1 * MIB)
    vm.domain.suspend()

    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)

    assert vm.domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert_back_on_original(vm, overlay)
    assert read_pattern_ok(top, 0xCD, 1 * MIB, 1 * MIB, with_backing=False)


def test_merge_is_idempotent(make_domain: DomainFactory, hypervisor: Hypervisor) -> None:
    vm = make_domain(chain=["base", "vm"])
    top = vm.images["vda"][-1]
    overlay = overlay_of(vm)
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "off")
    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)

    # Again, with nothing left to do.
    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)
    assert_back_on_original(vm, overlay)

    # An overlay file that exists but that no definition uses is deleted.
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2", overlay], check=True
    )
    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)
    assert_back_on_original(vm, overlay)


def test_merge_pivots_a_blockcommit_left_running_by_an_interrupted_merge(
    make_domain: DomainFactory, hypervisor: Hypervisor
) -> None:
    vm = make_domain(chain=["base", "vm"])
    top = vm.images["vda"][-1]
    overlay = overlay_of(vm)
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    vm.write_pattern("vda", 0xCD, 1 * MIB, 1 * MIB)
    # virt-dup was killed after starting the blockcommit: the job waits in QEMU.
    vm.domain.blockCommit(
        "vda",
        None,
        None,
        0,
        libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW,
    )

    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)

    assert_back_on_original(vm, overlay)
    assert vm.domain.blockJobInfo("vda", 0) == {}
    assert read_pattern_ok(top, 0xCD, 1 * MIB, 1 * MIB, with_backing=False)


def test_blockcommit_not_ready_in_time_is_aborted_and_retried_later(
    make_domain: DomainFactory, hypervisor: Hypervisor
) -> None:
    vm = make_domain(chain=["base", "vm"])
    top = vm.images["vda"][-1]
    overlay = overlay_of(vm)
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    for offset in range(0, 16 * MIB, 4 * MIB):
        vm.write_pattern("vda", 0xCD, offset, 1 * MIB)

    # 256 KiB/s: QEMU copies 2 MiB at once, then waits ~8 s for the next chunk.
    with pytest.raises(LibvirtError, match=r"blockcommit not ready after 1s.*stays on the overlay"):
        merge_overlay(
            hypervisor, vm.domain, "vda", str(overlay), str(top), 1.0, bandwidth=256 * 1024
        )

    assert vm.domain.blockJobInfo("vda", 0) == {}
    assert vm.disk_source("vda") == overlay
    assert overlay.exists()
    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)
    assert_back_on_original(vm, overlay)
    for offset in range(0, 16 * MIB, 4 * MIB):
        assert read_pattern_ok(top, 0xCD, offset, 1 * MIB, with_backing=False)


# --- shut-off domain -----------------------------------------------------------------


def test_shut_off_domain_gets_the_overlay_and_merges_with_qemu_img(
    make_domain: DomainFactory, hypervisor: Hypervisor
) -> None:
    vm = make_domain(chain=["base", "vm"], running=False)
    base, top = vm.images["vda"]
    overlay = overlay_of(vm)
    checksums = {base: sha256(base), top: sha256(top)}

    result = create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "required")

    assert result == QuiesceResult(frozen=False, domain_active=False, reason="domain is shut off")
    assert not result.crash_consistent_only
    assert vm.disk_source("vda", inactive=True) == overlay
    write_offline(overlay, 0xAB, 2 * MIB, 1 * MIB)
    assert {path: sha256(path) for path in checksums} == checksums

    started = time.monotonic()
    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)
    merged_in = time.monotonic() - started

    assert_back_on_original(vm, overlay)
    assert read_pattern_ok(top, 0xAB, 2 * MIB, 1 * MIB, with_backing=False)
    assert sha256(base) == checksums[base]
    # libvirt finds the backing chain again from the headers when it starts.
    vm.domain.create()
    assert vm.disk_chain("vda") == (base, top)
    print(f"merged offline in {merged_in:.3f}s")


def test_domain_started_during_the_backup_is_merged_with_blockcommit(
    make_domain: DomainFactory, hypervisor: Hypervisor
) -> None:
    vm = make_domain(chain=["base", "vm"], running=False)
    base, top = vm.images["vda"]
    overlay = overlay_of(vm)
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    vm.domain.create()
    assert vm.disk_chain("vda") == (base, top, overlay)
    vm.write_pattern("vda", 0xCD, 1 * MIB, 1 * MIB)

    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)

    assert vm.is_running()
    assert_back_on_original(vm, overlay)
    assert read_pattern_ok(top, 0xCD, 1 * MIB, 1 * MIB, with_backing=False)


def test_domain_shut_down_during_the_backup_is_merged_offline(
    make_domain: DomainFactory, hypervisor: Hypervisor
) -> None:
    vm = make_domain(chain=["base", "vm"])
    top = vm.images["vda"][-1]
    overlay = overlay_of(vm)
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    vm.write_pattern("vda", 0xCD, 1 * MIB, 1 * MIB)
    vm.domain.destroy()
    assert vm.disk_source("vda", inactive=True) == overlay

    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)

    assert not vm.domain.isActive()
    assert_back_on_original(vm, overlay)
    assert read_pattern_ok(top, 0xCD, 1 * MIB, 1 * MIB, with_backing=False)


def test_domain_shut_down_in_the_middle_of_the_blockcommit_is_merged_offline(
    make_domain: DomainFactory, hypervisor: Hypervisor, caplog: pytest.LogCaptureFixture
) -> None:
    vm = make_domain(chain=["base", "vm"])
    top = vm.images["vda"][-1]
    overlay = overlay_of(vm)
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    offsets = range(0, 16 * MIB, 4 * MIB)
    for offset in offsets:
        vm.write_pattern("vda", 0xCD, offset, 1 * MIB)
    destroyed = threading.Event()

    def destroy_once_the_blockcommit_runs() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if vm.domain.blockJobInfo("vda", 0):
                vm.domain.destroy()
                destroyed.set()
                return
            time.sleep(0.005)

    killer = threading.Thread(target=destroy_once_the_blockcommit_runs)
    killer.start()
    try:
        with caplog.at_level(logging.INFO, logger="virt_dup"):
            # Slowed down so that the domain surely stops before the job is ready.
            merge_overlay(
                hypervisor,
                vm.domain,
                "vda",
                str(overlay),
                str(top),
                MERGE_TIMEOUT_S,
                bandwidth=256 * 1024,
            )
    finally:
        killer.join()

    assert destroyed.is_set()
    assert "stopped during the blockcommit" in caplog.text
    assert "committed offline" in caplog.text
    assert not vm.domain.isActive()
    assert_back_on_original(vm, overlay)
    for offset in offsets:
        assert read_pattern_ok(top, 0xCD, offset, 1 * MIB, with_backing=False)


# --- selection, quiesce, refusals ----------------------------------------------------


@pytest.mark.parametrize("running", [True, False], ids=["running", "shut-off"])
def test_only_the_selected_disk_gets_an_overlay(
    make_domain: DomainFactory, hypervisor: Hypervisor, running: bool
) -> None:
    vm = make_domain(disks=["vda", "vdb"], chain=["base", "vm"], running=running)
    vdb_top = vm.images["vdb"][-1]
    vdb_checksum = sha256(vdb_top)
    overlay = overlay_of(vm, "vda")

    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")

    assert vm.disk_source("vda", inactive=True) == overlay
    assert vm.disk_source("vdb", inactive=True) == vdb_top
    if running:
        assert vm.disk_source("vda") == overlay
        assert vm.disk_chain("vdb") == vm.images["vdb"]
        vm.write_pattern("vdb", 0xEE, 0, MIB)  # vdb still writes into its own top
        assert read_pattern_ok(vdb_top, 0xEE, 0, MIB, with_backing=False)
    else:
        assert sha256(vdb_top) == vdb_checksum
    assert not list(vdb_top.parent.glob("*virt-dup*"))

    merge_overlay(
        hypervisor, vm.domain, "vda", str(overlay), str(vm.images["vda"][-1]), MERGE_TIMEOUT_S
    )
    assert_back_on_original(vm, overlay, "vda")
    assert vm.disk_source("vdb", inactive=True) == vdb_top


@pytest.mark.parametrize(
    ("agent_channel", "reason"),
    [(False, "not configured"), (True, "not connected")],
    ids=["no-agent-channel", "agent-not-connected"],
)
def test_quiesce_required_without_an_agent_fails_and_creates_nothing(
    make_domain: DomainFactory, hypervisor: Hypervisor, agent_channel: bool, reason: str
) -> None:
    vm = make_domain(chain=["base", "vm"], guest_agent_channel=agent_channel)
    top = vm.images["vda"][-1]
    overlay = overlay_of(vm)

    with pytest.raises(LibvirtError, match=f"quiesce is required: .*{reason}.*no overlay"):
        create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "required")

    assert vm.disk_source("vda") == top
    assert vm.disk_source("vda", inactive=True) == top
    assert not overlay.exists()


def test_quiesce_auto_with_a_silent_agent_falls_back_with_a_warning(
    make_domain: DomainFactory, hypervisor: Hypervisor, caplog: pytest.LogCaptureFixture
) -> None:
    vm = make_domain(chain=["base", "vm"], guest_agent_channel=True)
    top = vm.images["vda"][-1]
    overlay = overlay_of(vm)

    with caplog.at_level(logging.WARNING, logger="virt_dup"):
        result = create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")

    assert not result.frozen and result.domain_active
    assert result.reason is not None and "not connected" in result.reason
    assert "crash-consistent" in caplog.text
    assert vm.disk_source("vda") == overlay
    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)
    assert_back_on_original(vm, overlay)


@pytest.mark.parametrize("running", [True, False], ids=["running", "shut-off"])
def test_an_overlay_is_never_stacked_on_a_virt_dup_overlay(
    make_domain: DomainFactory, hypervisor: Hypervisor, running: bool
) -> None:
    vm = make_domain(chain=["base", "vm"], running=running)
    top = vm.images["vda"][-1]
    overlay = overlay_of(vm)
    create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")
    second = overlay_path(str(overlay), OTHER_JOB)

    with pytest.raises(VirtDupError, match=r"disk vda already runs on the virt-dup overlay .*"):
        create_overlays(hypervisor, vm.domain, {"vda": second}, "auto")

    assert not Path(second).exists()
    assert vm.disk_source("vda", inactive=True) == overlay
    merge_overlay(hypervisor, vm.domain, "vda", str(overlay), str(top), MERGE_TIMEOUT_S)
    assert_back_on_original(vm, overlay)


def test_an_existing_overlay_file_is_refused(
    make_domain: DomainFactory, hypervisor: Hypervisor
) -> None:
    vm = make_domain(chain=["base", "vm"])
    top = vm.images["vda"][-1]
    overlay = overlay_of(vm)
    overlay.write_bytes(b"left over")

    with pytest.raises(VirtDupError, match=r"overlay file .* already exists"):
        create_overlays(hypervisor, vm.domain, {"vda": str(overlay)}, "auto")

    assert vm.disk_source("vda") == top
    overlay.unlink()
