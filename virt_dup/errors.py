"""Exceptions raised deep in virt-dup and turned into one line + exit code in ``cli.main``.

Every expected failure is a :class:`VirtDupError`.  Its ``str()`` is the one
line the user sees; ``exit_code`` is what the process returns.
"""

from __future__ import annotations


def shown(text: str) -> str:
    """User-given text as an error line quotes it: as it is when printable, else
    in Python's escaped form, so that a newline in an argument cannot start a
    line of its own (in the terminal or the journal)."""
    return text if text.isprintable() else repr(text)


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: The job, domain or backend exists (or may) but holds no backup yet: nothing to
#: list, restore or verify.  Not a usage error, and not a failure of an operation.
EXIT_NO_BACKUPS = 3


class VirtDupError(Exception):
    """An expected failure: printed as one line, no traceback (unless --debug)."""

    exit_code = EXIT_FAILED


class UsageError(VirtDupError):
    """Bad input from the command line: unknown option, malformed value."""

    exit_code = EXIT_USAGE


class ConfigError(VirtDupError):
    """virt-dup.yml (or a job's options) is invalid.

    The message names the file, the key path inside it and what was expected.
    """

    exit_code = EXIT_USAGE


class ScheduleError(ConfigError):
    """A cron string that cron would reject or that can never fire."""

    def __init__(self, expression: str, reason: str) -> None:
        super().__init__(f"invalid schedule {expression!r}: {reason}")
        self.expression = expression
        self.reason = reason


class NotFoundError(VirtDupError):
    """A domain, job, disk or backup that does not exist."""

    exit_code = EXIT_USAGE


class LibvirtError(VirtDupError):
    """libvirtd refused or failed an operation (message says which, on what).

    ``code``: libvirt's error code (``VIR_ERR_*``) and ``reason`` libvirt's own
    message, when libvirt gave them.
    """

    def __init__(self, message: str, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason if reason is not None else message


class CommandError(VirtDupError):
    """An external program (duplicity, qemu-img, gpg...) failed.

    The message is the copy-pasteable command line (secrets masked), how it
    ended and the last lines it printed.
    """
