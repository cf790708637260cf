"""A user's own domains on ``qemu:///session``, backed up and restored by that user.

DESIGN.md: "the same code serves a user manager + qemu:///session (a
desktop user's own VMs)".  Here a real non-root user (``session_user``: a
temporary system user in group kvm, with the installed virt-dup) defines a
running domain on their own session daemon and runs ``add-job``, ``run``,
``backups`` and ``restore`` with a virt-dup.yml that names only the libvirt
URI, a file:// backend in their home and their own GPG key in ``~/.gnupg``:
state, cache and locks take their defaults, which for a user other than root
are the XDG directories (``~/.local/state/virt-dup``, ``~/.cache/virt-dup``,
``$XDG_RUNTIME_DIR/virt-dup/locks``).
"""

from __future__ import annotations

import os
from pathlib import Path
from xml.etree import ElementTree

import pytest
from harness.domains import MIB, domain_xml
from harness.session_user import SessionUser, kvm_usable_by_group

pytestmark = pytest.mark.integration

PATTERN = 0xCD


def disk_source(user: SessionUser, domain: str, *, inactive: bool = False) -> Path:
    arguments = ["dumpxml", domain, *(["--inactive"] if inactive else [])]
    root = ElementTree.fromstring(user.virsh(*arguments).stdout)
    source = root.find("./devices/disk[@device='disk']/source")
    assert source is not None
    return Path(source.attrib["file"])


def not_owned_by(user: SessionUser, *trees: Path) -> list[str]:
    """Every path under ``trees`` (themselves included) not owned by ``user``."""
    found = []
    for tree in trees:
        for directory, _names, files in os.walk(tree):
            for path in [Path(directory), *(Path(directory, name) for name in files)]:
                status = path.lstat()
                if (status.st_uid, status.st_gid) != (user.uid, user.gid):
                    found.append(f"{path} ({status.st_uid}:{status.st_gid})")
    return found


def test_a_user_backs_up_and_restores_a_domain_of_their_own_session(
    session_user: SessionUser,
) -> None:
    user = session_user
    home = user.home
    image = home / "images" / "desk.qcow2"
    user.run(["mkdir", "-p", str(image.parent)])
    user.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(64 * MIB)])
    # Data for the backup to carry (the domain has no OS: nothing else writes).
    user.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {PATTERN:#x} 1M 2M", str(image)])

    user.run(
        [
            "gpg",
            "--batch",
            "--passphrase",
            "",
            "--quick-gen-key",
            "desk <desk@example.invalid>",
            "default",
            "default",
            "never",
        ]
    )
    colons = user.run(["gpg", "--with-colons", "--list-secret-keys"]).stdout
    fingerprint = next(
        line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:")
    )

    config = user.write_file(
        home / ".config" / "virt-dup" / "virt-dup.yml",
        "libvirt:\n  uri: qemu:///session\n"
        f"backends:\n  home: file://{home}/backups\n"
        f"encryption:\n  keys: [{fingerprint}]\n"
        "defaults:\n  backends: [home]\n",
    )
    domain = "desk"
    domain_type = "kvm" if kvm_usable_by_group() else "qemu"
    definition = user.write_file(
        home / "desk.xml", domain_xml(domain, {"vda": image}, domain_type=domain_type)
    )
    user.virsh("define", str(definition))
    user.virsh("start", domain)

    def virt_dup(*arguments: str) -> str:
        return user.virt_dup("--config", str(config), *arguments).stdout

    job = virt_dup("add-job", domain).split()[-1]
    ran = virt_dup("run", job)
    assert "full backup of vda done" in ran

    # The run merged its overlay back: both definitions name the image again,
    # and no overlay file is left beside it.
    assert disk_source(user, domain) == image
    assert disk_source(user, domain, inactive=True) == image
    assert sorted(path.name for path in image.parent.iterdir()) == [image.name]
    assert user.virsh("domstate", domain).stdout.strip() == "running"

    listing = virt_dup("backups", domain)
    assert "full" in listing and job in listing

    target = home / "restored"
    virt_dup("restore", domain, "--target-dir", str(target))
    [restored] = target.glob("*/*.qcow2")
    # The running QEMU holds the image's lock: read it shared (-U).
    user.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(image), str(restored)])
    user.run(["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {PATTERN:#x} 1M 2M", str(restored)])

    # virt-dup kept to the user's own directories, and made nothing root's there.
    state = home / ".local" / "state" / "virt-dup"
    cache = home / ".cache" / "virt-dup"
    assert (state / "status" / f"{job}.json").is_file()
    assert (cache / job).is_dir()
    assert (user.runtime_dir / "virt-dup" / "locks").is_dir()
    assert not_owned_by(user, home, user.runtime_dir / "virt-dup") == []
