"""duplicity's exit codes (``duplicity/log.py`` ErrorCode) and what they mean."""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum


class DuplicityExit(IntEnum):
    """duplicity's exit codes that virt-dup tells apart (``duplicity/log.py`` ErrorCode)."""

    GENERIC = 1
    COMMAND_LINE = 2
    HOSTNAME_MISMATCH = 3
    NO_MANIFESTS = 4
    MISMATCHED_MANIFESTS = 5
    UNREADABLE_MANIFESTS = 6
    BAD_URL = 8
    BAD_ARCHIVE_DIR = 9
    RESTORE_PATH_EXISTS = 11
    BACKUP_DIR_DOESNT_EXIST = 13
    INC_WITHOUT_SIGS = 17
    NO_SIGS = 18
    RESTORE_PATH_NOT_FOUND = 19
    NO_RESTORE_FILES = 20
    MISMATCHED_HASH = 21
    #: Restoring with --sign-key, a volume was unsigned or signed by another key.
    UNSIGNED_VOLUME = 22
    USER_ERROR = 23
    EXCEPTION = 30
    GPG_FAILED = 31
    NOT_ENOUGH_FREESPACE = 35
    CONNECTION_FAILED = 38
    SOURCE_PATH_MISMATCH = 42
    ENCRYPTION_MISMATCH = 45
    BACKEND_ERROR = 50
    BACKEND_PERMISSION_DENIED = 51
    BACKEND_NOT_FOUND = 52
    BACKEND_NO_SPACE = 53
    BACKEND_COMMAND_ERROR = 54
    BACKEND_CODE_ERROR = 55
    BACKEND_VALIDATION_FAILED = 56
    BAD_SIGN_KEY = 80
    BAD_ENCRYPT_KEY = 81


EXIT_MEANINGS: Mapping[int, str] = {
    code.value: code.name.lower().replace("_", " ") for code in DuplicityExit
}
BACKEND_CODES = frozenset(
    {DuplicityExit.CONNECTION_FAILED, *range(DuplicityExit.BACKEND_ERROR, 70)}
)
GPG_CODES = frozenset(
    {DuplicityExit.GPG_FAILED, DuplicityExit.BAD_SIGN_KEY, DuplicityExit.BAD_ENCRYPT_KEY, 82}
)
