"""A restore of a hostile backup set stays inside its target directory.

The backup sets here are real duplicity backups, made with plain duplicity
the way someone with write access to a backend could make them: a virt-dup
metadata folder whose manifest tries to escape, or a symbolic link where a
disk image should be (pointing at a file of this host whose checksum the
attacker knows).  ``virt-dup restore --backend URL --target-dir DIR`` runs
as its own process; it must fail in one line, write nothing inside or
outside DIR, and leave the file the link names as it was (no rebase, no
hole digging, no hard link to it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness.backups import VENV_BIN

pytestmark = pytest.mark.integration

JOB = "7a0b1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d"
DOMAIN_UUID = "8b1c2d3e-4f5a-4b6c-9d7e-8f9a0b1c2d3e"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, tuple[str, int, int] | str]:
    """Every entry below ``root``: files by (digest, mtime_ns, link count), links by target."""
    entries: dict[str, tuple[str, int, int] | str] = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            entries[relative] = "-> " + os.readlink(path)
        elif path.is_file():
            status = path.stat()
            entries[relative] = (sha256(path), status.st_mtime_ns, status.st_nlink)
        else:
            entries[relative] = "dir"
    return entries


def manifest(image: Path, digest: str, size: int) -> dict[str, Any]:
    return {
        "format": 1,
        "virt_dup_version": "0.1.0",
        "created": "2026-01-01T00:00:00+00:00",
        "host": "elsewhere",
        "full": True,
        "domain": {"name": "hostile", "uuid": DOMAIN_UUID},
        "job": {"uuid": JOB, "xml": "<instance/>", "options": {}},
        "disks": [
            {
                "target": "vda",
                "top": str(image),
                "files": [
                    {
                        "path": str(image),
                        "format": "qcow2",
                        "virtual_size": size,
                        "backing_file": None,
                        "backing_format": None,
                        "actual_size": None,
                        "selected": True,
                        "sha256": digest,
                    }
                ],
            }
        ],
    }


def symlink_to_a_host_file(data: dict[str, Any], image: Path, secret: Path) -> None:
    image.unlink()
    image.symlink_to(secret)
    data["disks"][0]["files"][0]["sha256"] = sha256(secret)


def disk_target_escaping(data: dict[str, Any], image: Path, secret: Path) -> None:
    data["disks"][0]["target"] = "../../escaped"


def file_path_escaping(data: dict[str, Any], image: Path, secret: Path) -> None:
    escaping = f"{image.parent}/../../escaped.qcow2"
    data["disks"][0]["top"] = escaping
    data["disks"][0]["files"][0]["path"] = escaping


def absolute_disk_target(data: dict[str, Any], image: Path, secret: Path) -> None:
    data["disks"][0]["target"] = str(secret.parent)


HOSTILE_SETS = [
    pytest.param(
        symlink_to_a_host_file, "holds a symbolic link to", id="symlink in the restored set"
    ),
    pytest.param(disk_target_escaping, "disk target '../../escaped'", id="disk target ../../x"),
    pytest.param(file_path_escaping, "is not an absolute, normalized file path", id="path with .."),
    pytest.param(absolute_disk_target, "is not a name", id="absolute disk target"),
]


@pytest.mark.parametrize(("make_hostile", "message"), HOSTILE_SETS)
def test_a_hostile_backup_set_restores_nothing_anywhere(
    tmp_path: Path,
    make_hostile: Callable[[dict[str, Any], Path, Path], None],
    message: str,
) -> None:
    source = tmp_path / "source"
    images = source / "images"
    folder = source / "state" / "metadata" / JOB
    images.mkdir(parents=True)
    folder.mkdir(parents=True)
    # The host file a hostile link names: a real qcow2, so qemu-img would take it.
    outside = tmp_path / "host"
    outside.mkdir()
    secret = outside / "secret.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(secret), "1M"], check=True)
    image = images / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    data = manifest(image, sha256(image), 1 << 20)
    make_hostile(data, image, secret)
    (folder / "manifest.json").write_text(json.dumps(data))
    (folder / "domain.xml").write_text(
        f"<domain type='kvm'><name>hostile</name><uuid>{DOMAIN_UUID}</uuid></domain>"
    )
    (folder / "SHA256SUMS").write_text("")
    backend = tmp_path / "backend"
    subprocess.run(
        [
            str(VENV_BIN / "duplicity"),
            "full",
            "--no-encryption",
            "--archive-dir",
            str(tmp_path / "plain-cache"),
            "--include",
            str(source),
            "--exclude",
            "**",
            "/",
            f"file://{backend}/{JOB}",
        ],
        check=True,
        capture_output=True,
    )
    config = tmp_path / "virt-dup.yml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\ncache_dir: {tmp_path / 'cache'}\n"
        "defaults:\n  encryption: none\n"
    )
    target = tmp_path / "target"
    target.mkdir()
    watched = {name: tree(tmp_path / name) for name in ("source", "host", "backend", "target")}
    outside_before = sorted(path.name for path in tmp_path.iterdir())
    (tmp_path / "tmp").mkdir()

    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "virt_dup",
            "--config",
            str(config),
            "restore",
            JOB,
            "--backend",
            f"file://{backend}",
            "--target-dir",
            str(target),
        ],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
        timeout=300,
    )

    assert finished.returncode != 0, finished.stdout
    lines = [line for line in finished.stderr.splitlines() if line.startswith("virt-dup: error: ")]
    assert len(lines) == 1 and message in lines[0], finished.stderr
    assert all(line.startswith("virt-dup: ") for line in finished.stderr.splitlines())
    assert "Traceback" not in finished.stderr and "internal error" not in finished.stderr
    assert list(target.iterdir()) == []
    for name, before in watched.items():
        assert tree(tmp_path / name) == before, name
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert not (tmp_path.parent / "escaped.qcow2").exists()
    # virt-dup writes only its cache and scratch space (and the state dir) besides
    assert set(os.listdir(tmp_path)) <= {*outside_before, "tmp", "cache", "state"}
    assert list((tmp_path / "tmp").iterdir()) == []
    assert secret.stat().st_nlink == 1
