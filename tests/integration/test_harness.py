"""The test harness itself, against the real libvirtd: if these fail, every
integration test built on ``make_domain`` is suspect.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import libvirt
import pytest
from harness.domains import (
    MIB,
    DiskSpec,
    DomainFactory,
    HarnessError,
    HarnessSession,
    ScratchDomain,
    new_session_id,
    read_pattern_ok,
    session_domain_names,
    sweep_session,
)

pytestmark = pytest.mark.integration


def domain_exists(conn: libvirt.virConnect, name: str) -> bool:
    return name in {domain.name() for domain in conn.listAllDomains()}


def test_running_domain_runs_on_the_top_of_its_chain(make_domain: DomainFactory) -> None:
    vm = make_domain(chain=["base", "vm"])

    base, top = vm.images["vda"]
    assert (base.name, top.name) == ("base.qcow2", "vm.qcow2")
    assert vm.disk_source("vda") == top
    assert vm.disk_chain("vda") == (base, top)
    assert vm.xml().get("type") == make_domain.domain_type
    if os.path.exists("/dev/kvm"):
        assert make_domain.domain_type == "kvm", "/dev/kvm exists but is not usable by QEMU"
    time.sleep(0.5)
    assert vm.is_running(), "the firmware-only domain should stay running"


def test_shut_off_domain_is_defined_on_its_top_image(make_domain: DomainFactory) -> None:
    vm = make_domain(chain=["base", "vm", "vm.snap"], running=False)

    state, _reason = vm.domain.state()
    assert state == libvirt.VIR_DOMAIN_SHUTOFF
    assert vm.domain.isPersistent()
    assert [image.name for image in vm.images["vda"]] == ["base.qcow2", "vm.qcow2", "vm.snap.qcow2"]
    assert vm.disk_source("vda", inactive=True) == vm.images["vda"][-1]
    with pytest.raises(HarnessError, match="is it running"):
        vm.write_pattern("vda", 0xCD, 0, MIB)


def test_two_disks_with_their_own_chains(make_domain: DomainFactory) -> None:
    vm = make_domain(disks=["vda", DiskSpec("vdb", chain=("data", "data.top"), size=32 * MIB)])

    assert vm.disk_source("vda") == vm.images["vda"][-1]
    assert vm.disk_source("vdb") == vm.images["vdb"][-1]
    assert vm.images["vdb"][-1].name == "data.top.qcow2"
    assert {vm.disk_alias("vda"), vm.disk_alias("vdb")} == {"virtio-disk0", "virtio-disk1"}
    assert vm.domain.blockInfo("vda")[0] == 64 * MIB
    assert vm.domain.blockInfo("vdb")[0] == 32 * MIB


def test_two_domains_share_one_base(make_domain: DomainFactory) -> None:
    base = make_domain.create_image("shared-base")
    first = make_domain(disks=[DiskSpec(chain=("first",), backing=base)])
    second = make_domain(disks=[DiskSpec(chain=("second",), backing=first.images["vda"][0])])

    assert first.is_running() and second.is_running()
    assert first.disk_chain("vda") == (base, first.directory / "vda" / "first.qcow2")
    assert second.disk_chain("vda") == (base, second.directory / "vda" / "second.qcow2")
    assert first.images["vda"][0] == second.images["vda"][0] == base


def test_write_through_qemu_io_lands_in_the_top_image(make_domain: DomainFactory) -> None:
    vm = make_domain(disks=["vda", "vdb"], chain=["base", "vm"])
    (vda_base, vda_top), (vdb_base, vdb_top) = vm.images["vda"], vm.images["vdb"]

    vm.write_pattern("vda", 0xCD, 1 * MIB, 1 * MIB)
    vm.write_pattern(vm.disk_alias("vdb"), 0xAB, 3 * MIB, 64 * 1024)

    assert vm.read_pattern_ok(vda_top, 0xCD, 1 * MIB, 1 * MIB, with_backing=False)
    assert not read_pattern_ok(vda_base, 0xCD, 1 * MIB, 1 * MIB)
    assert read_pattern_ok(vdb_top, 0xAB, 3 * MIB, 64 * 1024, with_backing=False)
    assert not read_pattern_ok(vdb_base, 0xAB, 3 * MIB, 64 * 1024)
    assert not read_pattern_ok(vda_top, 0xAB, 3 * MIB, 64 * 1024)
    assert vm.is_running()


def test_write_outside_the_disk_is_refused(make_domain: DomainFactory) -> None:
    vm = make_domain(chain=["vm"], size=8 * MIB)

    with pytest.raises(HarnessError, match="do not fit"):
        vm.write_pattern("vda", 0xCD, 8 * MIB - 512, 1024)
    with pytest.raises(HarnessError, match="no disk 'vdz'"):
        vm.write_pattern("vdz", 0xCD, 0, 512)


def test_read_pattern_of_a_missing_image_raises(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="qemu-io"):
        read_pattern_ok(tmp_path / "missing.qcow2", 0, 0, 512)


def test_guest_agent_channel_is_there_but_not_connected(make_domain: DomainFactory) -> None:
    vm = make_domain(chain=["vm"], guest_agent_channel=True)

    channel = vm.xml().find("./devices/channel/target[@name='org.qemu.guest_agent.0']")
    assert channel is not None
    with pytest.raises(libvirt.libvirtError, match="agent"):
        vm.domain.fsFreeze()


def test_factory_cleanup_removes_everything_even_when_the_test_fails(
    libvirt_conn: libvirt.virConnect, harness_session: HarnessSession
) -> None:
    directory = harness_session.images_root / f"cleanup-{new_session_id()}"
    session_id = harness_session.id
    made: list[ScratchDomain] = []

    with (
        pytest.raises(RuntimeError, match="test failed"),
        DomainFactory(libvirt_conn, session_id, directory) as factory,
    ):
        base = factory.create_image("shared")
        made.append(factory(disks=[DiskSpec(chain=("a",), backing=base)]))
        made.append(factory(disks=["vda", "vdb"], running=False))
        made[0].write_pattern("vda", 0x11, 0, MIB)
        assert all(domain_exists(libvirt_conn, vm.name) for vm in made)
        raise RuntimeError("test failed")

    assert not [vm.name for vm in made if domain_exists(libvirt_conn, vm.name)]
    assert not directory.exists()


_left_by_failed_test: dict[str, object] = {}


@pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="fails on purpose: the next test checks its teardown"
)
def test_failing_test_with_domains(make_domain: DomainFactory) -> None:
    vm = make_domain(chain=["base", "vm"])
    _left_by_failed_test.update(name=vm.name, directory=vm.directory)
    raise AssertionError("deliberate failure")


def test_teardown_of_the_failed_test_left_nothing(libvirt_conn: libvirt.virConnect) -> None:
    if not _left_by_failed_test:
        pytest.skip("runs only after test_failing_test_with_domains")
    assert not domain_exists(libvirt_conn, str(_left_by_failed_test["name"]))
    directory = Path(str(_left_by_failed_test["directory"]))
    assert not directory.exists()
    assert not directory.parent.exists(), "the test's own image directory should be gone"


def test_session_sweep_removes_only_its_own_session(
    libvirt_conn: libvirt.virConnect, harness_session: HarnessSession
) -> None:
    images_root = harness_session.images_root
    sessions = [new_session_id(), new_session_id()]
    names = {}
    try:
        for session_id in sessions:
            # Made and deliberately not cleaned up, like after a crash.
            factory = DomainFactory(libvirt_conn, session_id, images_root / f"sweep-{session_id}")
            names[session_id] = factory(name_prefix="sweep", chain=["vm"]).name
        assert session_domain_names(libvirt_conn, sessions[0]) == [names[sessions[0]]]

        removed = sweep_session(libvirt_conn, sessions[0], images_root / f"sweep-{sessions[0]}")

        assert removed == [names[sessions[0]]]
        assert not domain_exists(libvirt_conn, names[sessions[0]])
        assert not (images_root / f"sweep-{sessions[0]}").exists()
        assert domain_exists(libvirt_conn, names[sessions[1]])
    finally:
        for session_id in sessions:
            sweep_session(libvirt_conn, session_id, images_root / f"sweep-{session_id}")


def test_gpg_home_has_a_key_that_encrypts(gpg_home, tmp_path: Path) -> None:
    fingerprint = gpg_home.fingerprint
    assert len(fingerprint) == 40
    assert gpg_home.path.stat().st_mode & 0o777 == 0o700
    secret = tmp_path / "secret.txt"
    secret.write_text("point-in-time\n")
    env = {**os.environ, **gpg_home.env}

    gpg = ["gpg", "--batch", "--yes", "--trust-model", "always"]
    subprocess.run([*gpg, "-r", fingerprint, "-e", secret], env=env, check=True)
    decrypted = subprocess.run(
        [*gpg, "-d", f"{secret}.gpg"], env=env, check=True, capture_output=True, text=True
    )

    assert decrypted.stdout == "point-in-time\n"
