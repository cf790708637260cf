"""Run a program on a pseudo-terminal, as a person at a terminal would.

:func:`on_terminal` gives the program a pty as stdin, stdout and stderr (so
``isatty()`` is true and getpass asks on it), types each answer after the
next prompt that ends in ``:``, and returns the exit status and everything
the terminal showed.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence

TIMEOUT_S = 300.0


def on_terminal(
    argv: Sequence[str],
    env: Mapping[str, str],
    answers: Sequence[str] = (),
    size: tuple[int, int] | None = (40, 120),
) -> tuple[int, str]:
    """(exit status, output) of ``argv`` run on a fresh pseudo-terminal of ``size``
    (rows, columns) as a terminal emulator sets it; None: a bare pty (0x0)."""
    controller, terminal = pty.openpty()
    if size is not None:
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    process = subprocess.Popen(
        list(argv),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=dict(env),
        start_new_session=True,
    )
    os.close(terminal)
    output = b""
    pending = list(answers)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # the terminal closed: the program ended
                    break
                if not chunk:
                    break
                output += chunk
                if pending and output.rstrip(b" ").endswith(b":"):
                    os.write(controller, pending.pop(0).encode() + b"\n")
            elif process.poll() is not None:
                break
    finally:
        os.close(controller)
    return process.wait(timeout=60), output.decode(errors="replace")
