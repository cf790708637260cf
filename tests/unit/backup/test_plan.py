"""The plan of a backup: what it selects, and the check a backup ends with."""

from __future__ import annotations

import pytest

from virt_dup.backup.plan import IncompleteBackup, check_complete
from virt_dup.duplicity.protocol import BackupStats

MIB = 1 << 20


def test_a_backup_that_misses_a_selected_file_is_a_failure_not_a_success() -> None:
    """The check every backup ends with: duplicity's statistics must account for
    every selected file and its size (a link backed up as a link reads less)."""

    def stats(files: int, size: int, errors: int = 0) -> BackupStats:
        return BackupStats("full", None, files, size, size, 0, files, size, size, 1.0, errors)

    selected = {"/d/vm.qcow2": 10 * MIB, "/m/manifest.json": 500}
    check_complete(stats(7, 10 * MIB + 500 + 5 * 4096), selected)  # directories count too
    with pytest.raises(IncompleteBackup, match=r"read 7 of their 10486260 bytes"):
        check_complete(stats(7, 7), selected)  # a 7-byte symbolic link instead of the image
    with pytest.raises(IncompleteBackup, match="read 1 of the 2 selected files"):
        check_complete(stats(1, 20 * MIB), selected)
    with pytest.raises(IncompleteBackup, match="1 error"):
        check_complete(stats(7, 20 * MIB, errors=1), selected)
