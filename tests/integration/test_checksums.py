"""The manifest's checksums cost one read of a file only when it changed: the
base under a guest's top is hashed once over many runs, and a restore still
checks every file against the checksum recorded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from harness.backups import BackupEnvironment, fill, guest_view, same_guest_view
from test_restore import backups_json, prepared

pytestmark = pytest.mark.integration


def test_an_untouched_base_is_hashed_once_and_restores_are_still_checked(
    make_domain, environment: BackupEnvironment, tmp_path: Path
) -> None:
    vm = prepared(make_domain, running=False)  # vda: base.qcow2 <- vm.qcow2
    base, top = vm.images["vda"]
    job = environment.virt_dup("add-job", vm.name).stdout.strip()
    environment.virt_dup("run", job)
    first = environment.status(job)["last_success"]
    assert first["bytes_hashed"] == os.path.getsize(base) + os.path.getsize(top)

    fill(top, 0x77, 0, 1 << 20)
    view = guest_view(top, tmp_path / "view.qcow2")
    environment.virt_dup("run", job)
    second = environment.status(job)["last_success"]
    assert second["bytes_hashed"] == os.path.getsize(top)  # the base was not read again
    restored = tmp_path / "restored"
    environment.virt_dup("restore", vm.name, "--target-dir", str(restored))
    assert same_guest_view(restored / "vda" / top.name, view)

    # A remembered checksum that were wrong (the file identical to the eye) is caught
    # by the restore, as any file that does not match its manifest is.
    cache = environment.state / "checksums" / f"{job}.json"
    remembered = json.loads(cache.read_text())
    good = remembered[str(base)]["sha256"]
    remembered[str(base)]["sha256"] = ("0" if good[0] != "0" else "1") + good[1:]
    cache.write_text(json.dumps(remembered))
    fill(top, 0x78, 2 << 20, 1 << 20)
    environment.virt_dup("run", job)
    (listing,) = backups_json(environment, vm.name)
    latest = listing["backups"][-1]["id"]
    refused = environment.virt_dup(
        "restore", vm.name, latest, "--target-dir", str(tmp_path / "refused"), check=False
    )
    assert refused.returncode != 0
    line = refused.stderr.splitlines()[-1]
    assert f"{base} in backup {latest}: SHA-256 {good} differs from the" in line, line
