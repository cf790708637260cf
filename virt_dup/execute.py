"""The one way virt-dup runs an external program (duplicity, qemu-img, gpg...).

:func:`run` starts the program, streams what it prints into the caller's
handler and the debug log, waits (bounded when asked) and returns a
:class:`Completed`; an exit code the caller did not declare as fine raises
:class:`CommandFailed` (a :class:`~virt_dup.errors.CommandError`) whose
message is one line: the copy-pasteable command, how it ended and the last
meaningful lines of its standard error.

Secrets (passphrases, passwords) travel in the environment, never in argv:
any process on the host can read another's argv in ``/proc``.  Every secret
the caller names is replaced by ``***`` in everything this module writes to
the log or puts in an exception; environment variables whose name says they
hold a secret (``PASSPHRASE``, ``*_PASSWORD``, ``*TOKEN*``...) are masked even
when the caller forgot to name the value.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from virt_dup.errors import CommandError

logger = logging.getLogger(__name__)

MASK = "***"
#: Lines of standard error kept for :attr:`Completed.stderr_tail` and errors.
STDERR_TAIL_LINES = 50
#: Meaningful stderr lines quoted in a failure message.
MESSAGE_LINES = 3
#: A quoted stderr line is cut after this many characters.
MESSAGE_LINE_WIDTH = 300
#: After the program ended, how long its output pipes may stay open (a
#: grandchild that inherited them) before we stop reading.
_DRAIN_TIMEOUT_S = 10.0
#: How often a running program's time limits are looked at.
_WATCH_INTERVAL_S = 0.5
#: prctl(2) option: the signal a process gets when its parent thread ends.
_PR_SET_PDEATHSIG = 1

#: Environment variable names whose values are masked whatever the caller says.
_SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|CREDENTIAL|API_?KEY", re.IGNORECASE)

#: Debian package that provides a program, for "not installed" messages.
INSTALL_HINTS: Mapping[str, str] = {
    "qemu-img": "package qemu-utils",
    "qemu-io": "package qemu-utils",
    "gpg": "package gnupg",
    "gpgconf": "package gnupg",
    "virsh": "package libvirt-clients",
    "systemd-analyze": "package systemd",
    "duplicity": "pip install --no-deps duplicity==3.2.1 fasteners (see scripts/setup)",
}


@dataclass(frozen=True)
class Completed:
    """How a program that ended with an accepted exit code ended.

    ``stdout``: everything it wrote to standard output (decoded as UTF-8,
    undecodable bytes replaced; not masked: the caller parses it).
    ``stderr_tail``: the last :data:`STDERR_TAIL_LINES` lines of standard
    error, secrets masked.
    """

    returncode: int
    stdout: str
    stderr_tail: tuple[str, ...]


class CommandFailed(CommandError):
    """A program exited with a code not in ``ok_codes``, was killed or timed out.

    ``str()`` is one line (see :func:`failure_message`).  The attributes let a
    caller that knows the program say something more precise:
    ``command`` (masked shell line), ``returncode`` (negative: killed by that
    signal; ``None``: timed out or stalled, ``limit_reached`` says which),
    ``stderr_tail`` (masked lines).
    """

    def __init__(
        self,
        message: str,
        *,
        command: str,
        returncode: int | None,
        stderr_tail: tuple[str, ...],
        stdout: str = "",
        limit_reached: str | None = None,
    ) -> None:
        super().__init__(message)
        self.command = command
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.stdout = stdout
        self.limit_reached = limit_reached


def mask(text: str, secrets: Collection[str]) -> str:
    """``text`` with every non-empty secret replaced by ``***`` (longest first)."""
    for secret in sorted((secret for secret in secrets if secret), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def command_line(
    command: Sequence[str],
    environment: Mapping[str, str | None] | None = None,
    secrets: Collection[str] = (),
) -> str:
    """The shell line that reproduces ``command``, secrets masked.

    Variables the caller sets in ``environment`` come first as ``NAME=value``
    assignments (removed ones as ``-u NAME`` of ``env``), so the line can be
    pasted into a shell as it is.
    """
    all_secrets = _all_secrets(environment, secrets)
    assignments = [
        f"{name}={shlex.quote(MASK if _SECRET_NAME.search(name) and value else value)}"
        for name, value in sorted((environment or {}).items())
        if value is not None
    ]
    removals = [name for name, value in sorted((environment or {}).items()) if value is None]
    prefix = ["env", *(part for name in removals for part in ("-u", name))] if removals else []
    line = " ".join([*map(shlex.quote, prefix), *assignments, shlex.join(command)])
    return mask(line, all_secrets)


def meaningful_lines(lines: Sequence[str], limit: int = MESSAGE_LINES) -> tuple[str, ...]:
    """The last ``limit`` lines worth quoting in a one-line error.

    Skips blank lines, rulers (``-----``) and the frames of a Python traceback
    (its last line, the exception, is what matters).
    """
    kept: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line or not re.search(r"\w", line):
            continue
        if line.startswith("Traceback (most recent call last)"):
            continue
        if raw.startswith("  ") and line.startswith('File "'):  # a traceback frame...
            continue
        if raw.startswith("    "):  # ...and the source line it quotes
            continue
        if len(line) > MESSAGE_LINE_WIDTH:
            line = line[: MESSAGE_LINE_WIDTH - 1] + "…"
        kept.append(line)
    return tuple(kept[-limit:])


def how_it_ended(returncode: int | None, meanings: Mapping[int, str] | None = None) -> str:
    """``exited with code 3 (meaning)``, ``killed by signal SIGKILL`` or ``timed out``."""
    if returncode is None:
        return "timed out and was killed"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    meaning = (meanings or {}).get(returncode)
    return f"exited with code {returncode}" + (f" ({meaning})" if meaning else "")


def failure_message(
    command: str,
    returncode: int | None,
    stderr_tail: Sequence[str],
    meanings: Mapping[int, str] | None = None,
    limit_reached: str | None = None,
) -> str:
    """One line: ``COMMAND exited with code N: last; stderr; lines``;
    ``limit_reached``: why it was killed ("timed out after 10 s")."""
    ended = how_it_ended(returncode, meanings)
    if returncode is None and limit_reached is not None:
        ended = f"{limit_reached} and was killed"
    quoted = meaningful_lines(stderr_tail)
    return f"{command} {ended}" + (f": {'; '.join(quoted)}" if quoted else "")


def run(
    command: Sequence[str],
    *,
    environment: Mapping[str, str | None] | None = None,
    secrets: Collection[str] = (),
    input: str | bytes | None = None,
    timeout: float | None = None,
    output_handler: Callable[[str], None] | None = None,
    pass_fds: Sequence[int] = (),
    ok_codes: Collection[int] = (0,),
    exit_meanings: Mapping[int, str] | None = None,
    stall: Stall | None = None,
) -> Completed:
    """Run ``command`` and wait for it.

    ``environment``: variables set (value ``None``: removed) on top of the
    inherited environment; the place for secrets.  ``secrets``: values masked
    as ``***`` in logs and errors (in addition to variables whose name says
    they are secret).  ``input``: written to standard input (else it is
    ``/dev/null``, so a program never waits for a keyboard).  ``timeout``:
    seconds before the program (its whole process group) is killed.
    ``output_handler``: called with each line of standard output (masked,
    without the newline) as it arrives.  ``pass_fds``: file descriptors the
    program inherits.  ``ok_codes``: exit codes that count as success.
    ``exit_meanings``: words for exit codes, quoted in the error.
    ``stall``: how long the program may go without a sign of life (a line of
    output, or what the caller sees of it) before it is killed as stalled.
    The program is killed (SIGKILL) when the calling thread or process dies,
    even by SIGKILL: it never outlives us.

    Returns :class:`Completed`.  Raises :class:`CommandFailed` when the exit
    code is not in ``ok_codes``, the program was killed or timed out, and
    :class:`~virt_dup.errors.CommandError` when it cannot be started.
    """
    argv = [os.fspath(argument) for argument in command]
    shown = command_line(argv, environment, secrets)
    logger.debug("running: %s", shown)
    started = time.monotonic()
    process = _start(argv, shown, _child_environment(environment), input, pass_fds)
    output = _Output(argv[0], _all_secrets(environment, secrets), output_handler)
    assert process.stdout is not None and process.stderr is not None
    readers = [
        _start_thread(_read_lines, process.stdout, output.take_stdout),
        _start_thread(_read_lines, process.stderr, output.take_stderr),
    ]
    if input is not None:
        assert process.stdin is not None
        data = input.encode() if isinstance(input, str) else input
        readers.append(_start_thread(_write_all, process.stdin, data))
    watch = _Watch(timeout, stall, lambda: output.last_line)
    returncode = _wait(process, readers, watch)
    if output.handler_errors:
        raise output.handler_errors[0]
    elapsed = time.monotonic() - started
    tail = tuple(output.stderr_tail)
    stdout = "".join(output.stdout_chunks)
    if returncode is not None and returncode in ok_codes:
        logger.debug("%s: exited with code %d after %.1f s", argv[0], returncode, elapsed)
        return Completed(returncode=returncode, stdout=stdout, stderr_tail=tail)
    message = failure_message(shown, returncode, tail, exit_meanings, watch.limit_reached)
    logger.debug("%s (after %.1f s)", message, elapsed)
    raise CommandFailed(
        message,
        command=shown,
        returncode=returncode,
        stderr_tail=tail,
        stdout=stdout,
        limit_reached=watch.limit_reached,
    )


def _start(
    argv: list[str],
    shown: str,
    environment: dict[str, str] | None,
    input: str | bytes | None,
    pass_fds: Sequence[int],
) -> subprocess.Popen[bytes]:
    """Start the program; :class:`CommandError` (one line) when it cannot be."""
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            pass_fds=tuple(pass_fds),
            # Its own session: no controlling terminal, so a program that would
            # prompt (getpass opens /dev/tty) fails at once instead of waiting
            # for a keyboard; and its own process group, so a timeout kills
            # the program and its helpers (duplicity's gpg), not only the program.
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
    except FileNotFoundError:
        hint = INSTALL_HINTS.get(os.path.basename(argv[0]))
        raise CommandError(
            f"{shown}: {argv[0]} is not installed" + (f" ({hint})" if hint else "")
        ) from None
    except OSError as error:
        raise CommandError(f"{shown}: cannot start {argv[0]}: {error.strerror}") from None


class _Output:
    """What a program writes: standard output kept whole (and handed, masked,
    line by line to ``handler``), the last lines of standard error."""

    def __init__(
        self, program: str, secrets: Collection[str], handler: Callable[[str], None] | None
    ) -> None:
        self.name = os.path.basename(program)
        self.secrets = secrets
        self.handler = handler
        self.stdout_chunks: list[str] = []
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.handler_errors: list[BaseException] = []
        self.last_line = time.monotonic()

    def take_stdout(self, line: str) -> None:
        self.last_line = time.monotonic()
        self.stdout_chunks.append(line)
        if self.handler is not None and not self.handler_errors:
            try:
                self.handler(mask(line.rstrip("\n"), self.secrets))
            except Exception as error:  # re-raised by run(); the pipe must keep draining
                self.handler_errors.append(error)

    def take_stderr(self, line: str) -> None:
        self.last_line = time.monotonic()
        masked = mask(line.rstrip("\n"), self.secrets)
        self.stderr_tail.append(masked)
        logger.debug("%s: %s", self.name, masked)


@dataclass(frozen=True)
class Stall:
    """A program stalls when it shows no sign of life for ``seconds``: no line of
    output, and no later ``last_sign_of_life()`` (a ``time.monotonic()`` time the
    caller keeps, e.g. of records on a descriptor of its own)."""

    seconds: float
    last_sign_of_life: Callable[[], float] = lambda: 0.0


class _Watch:
    """When a program has run too long, or gone too long without a sign of life."""

    def __init__(
        self, timeout: float | None, stall: Stall | None, last_line: Callable[[], float]
    ) -> None:
        self.started = time.monotonic()
        self.timeout = timeout
        self.stall = stall
        self.last_line = last_line
        #: What ended it: "timed out after N s", "stalled ...", or None.
        self.limit_reached: str | None = None

    def check(self) -> bool:
        """Whether the program must be killed now (and why, in ``limit_reached``)."""
        now = time.monotonic()
        if self.timeout is not None and now - self.started >= self.timeout:
            self.limit_reached = f"timed out after {self.timeout:g} s"
        elif self.stall is not None:
            last = max(self.last_line(), self.stall.last_sign_of_life())
            if now - last >= self.stall.seconds:
                self.limit_reached = f"stalled (no sign of life for {self.stall.seconds:g} s)"
        return self.limit_reached is not None


def _wait(
    process: subprocess.Popen[bytes], readers: list[threading.Thread], watch: _Watch
) -> int | None:
    """The exit code (``None``: killed by ``watch``), once the output is read."""
    try:
        while True:
            try:
                return process.wait(timeout=_WATCH_INTERVAL_S)
            except subprocess.TimeoutExpired:
                if watch.check():
                    _kill_group(process)
                    return None
    except BaseException:  # KeyboardInterrupt included: never leave the program behind
        _kill_group(process)
        raise
    finally:
        for reader in readers:
            reader.join(_DRAIN_TIMEOUT_S)
        # A reader still blocked holds its stream's lock: closing it would hang
        # too.  It is a daemon thread; the pipe goes with the Popen object.
        for stream, reader in zip((process.stdout, process.stderr), readers, strict=False):
            if not reader.is_alive() and stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _all_secrets(
    environment: Mapping[str, str | None] | None, secrets: Collection[str]
) -> tuple[str, ...]:
    named = [
        value for name, value in (environment or {}).items() if value and _SECRET_NAME.search(name)
    ]
    return tuple(secret for secret in (*secrets, *named) if secret)


def _child_environment(environment: Mapping[str, str | None] | None) -> dict[str, str] | None:
    if environment is None:
        return None
    merged = dict(os.environ)
    for name, value in environment.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def _start_thread(target: Callable[..., None], *arguments: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=arguments, daemon=True)
    thread.start()
    return thread


def _read_lines(stream: IO[bytes], take: Callable[[str], None]) -> None:
    with contextlib.suppress(ValueError, OSError):  # closed under us after a drain timeout
        for raw in stream:
            take(raw.decode("utf-8", errors="replace"))


def _write_all(stream: IO[bytes], data: bytes) -> None:
    # A program that exits without reading all of its input is not an error here.
    with contextlib.suppress(BrokenPipeError, OSError):
        stream.write(data)
    with contextlib.suppress(BrokenPipeError, OSError):
        stream.close()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the kernel SIGKILL the program when we die.

    Its own session protects the program from our terminal's signals, so
    nothing else would stop it when we are SIGKILLed (OOM killer, systemd's
    final kill): a duplicity left running would finish a backup set from
    disk images that recovery is changing under it.  ``PR_SET_PDEATHSIG``
    fires when the *thread* that started the program ends; :func:`run`
    waits in that thread, so it lives as long as the program should.  A
    parent that died before the setting took effect is caught by the
    ``getppid`` check.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return set_death_signal


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
