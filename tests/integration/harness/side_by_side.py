"""Integration tests side by side (``scripts/test`` runs pytest-xdist workers),
and the ones that must run alone.

A test that restarts or replaces a shared daemon (libvirtd) breaks every
connection and job of the tests beside it: it is marked ``disruptive``, and
the autouse fixture in ``tests/integration/conftest.py`` runs it inside
:func:`alone`; every other integration test runs inside
:func:`beside_others`.  A module-scoped fixture that replaces the daemon (it
is set up before any test's own fixture) takes :func:`alone` itself.
"""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Held by every integration test (shared) and by a disruptive one (exclusive):
#: ``scripts/test`` runs tests side by side (pytest-xdist), and a test that
#: restarts libvirtd must run alone.  In /tmp, so that two sessions on one
#: machine keep to it too.
_SIDE_BY_SIDE_LOCK = Path(tempfile.gettempdir()) / "virt-dup-tests.lock"
#: Taken first by everyone, and held by a disruptive test while it waits for the
#: shared lock: tests that come after it wait instead of starving it.
_TURNSTILE = Path(tempfile.gettempdir()) / "virt-dup-tests.turnstile"
#: How many :func:`alone` blocks this process is in (flock(2) locks of two open
#: files conflict even within one process: the inner ones take nothing).
_alone_depth = 0


@contextmanager
def alone() -> Iterator[None]:
    """Run the block with no other test beside it, in any process: for whatever
    restarts or replaces a shared daemon (libvirtd), a module-scoped fixture that
    does so included (it is set up before the tests' own lock)."""
    global _alone_depth
    if _alone_depth:
        _alone_depth += 1
        try:
            yield
        finally:
            _alone_depth -= 1
        return
    with _TURNSTILE.open("a") as turnstile, _SIDE_BY_SIDE_LOCK.open("a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _alone_depth = 1
            try:
                yield
            finally:
                _alone_depth = 0
                fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)


@contextmanager
def beside_others() -> Iterator[None]:
    """Run the block beside other such blocks, never beside an :func:`alone` one."""
    if _alone_depth:
        yield
        return
    with _TURNSTILE.open("a") as turnstile, _SIDE_BY_SIDE_LOCK.open("a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
