"""execute.run against real programs: exit codes, signals, timeouts, masking."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virt_dup.errors import CommandError
from virt_dup.execute import (
    MASK,
    CommandFailed,
    Completed,
    command_line,
    mask,
    meaningful_lines,
    run,
)

SECRET = "hunter2-correct-horse"
REPOSITORY = Path(__file__).parents[2]


def test_success_returns_stdout_and_code() -> None:
    result = run(["sh", "-c", "echo out; echo err >&2"])
    assert result == Completed(returncode=0, stdout="out\n", stderr_tail=("err",))


def test_failure_is_one_line_with_command_code_and_last_stderr_lines() -> None:
    script = "echo one >&2; echo >&2; echo ---- >&2; echo two >&2; echo three >&2; exit 3"
    with pytest.raises(CommandFailed) as caught:
        run(["sh", "-c", script])
    message = str(caught.value)
    assert "\n" not in message
    assert message == f"sh -c '{script}' exited with code 3: one; two; three"
    assert caught.value.returncode == 3


def test_only_the_last_three_meaningful_lines_are_quoted() -> None:
    with pytest.raises(CommandFailed) as caught:
        run(["sh", "-c", "for n in 1 2 3 4 5; do echo line$n >&2; done; exit 1"])
    assert str(caught.value).endswith("exited with code 1: line3; line4; line5")


def test_false_without_output() -> None:
    with pytest.raises(CommandFailed, match=r"^false exited with code 1$"):
        run(["false"])


def test_ok_codes_and_exit_meanings() -> None:
    assert run(["sh", "-c", "exit 23"], ok_codes=(0, 23)).returncode == 23
    with pytest.raises(CommandFailed, match=r"exited with code 42 \(source mismatch\)$"):
        run(["sh", "-c", "exit 42"], exit_meanings={42: "source mismatch"})


def test_killed_by_a_signal_is_named() -> None:
    with pytest.raises(CommandFailed) as caught:
        run(["sh", "-c", "echo dying >&2; kill -KILL $$"])
    assert caught.value.returncode == -signal.SIGKILL
    assert (
        str(caught.value) == "sh -c 'echo dying >&2; kill -KILL $$' killed by signal SIGKILL: dying"
    )


def test_timeout_kills_the_program_and_its_children(tmp_path: object) -> None:
    # The grandchild (sleep) keeps the pipes open; the whole group must die.
    with pytest.raises(CommandFailed, match=r"timed out after 0.5 s and was killed$") as caught:
        run(["sh", "-c", "sleep 30 & sleep 30; wait"], timeout=0.5)
    assert caught.value.returncode is None


def test_missing_program_names_the_package() -> None:
    with pytest.raises(CommandError, match=r"qemu-img is not installed \(package qemu-utils\)"):
        run(["qemu-img", "info", "x"], environment={"PATH": "/nonexistent"})


def test_input_and_environment_reach_the_program() -> None:
    result = run(
        ["sh", "-c", 'cat; printf "%s|%s" "$VDT_A" "${VDT_GONE-unset}"'],
        input="fed\n",
        environment={"VDT_A": "a value", "VDT_GONE": None},
    )
    assert result.stdout == "fed\na value|unset"


def test_stdin_is_not_the_terminal() -> None:
    assert run(["sh", "-c", "cat; echo done"]).stdout == "done\n"


def test_output_handler_gets_each_line_as_it_comes() -> None:
    lines: list[str] = []
    result = run(["sh", "-c", "echo a; echo b; printf c"], output_handler=lines.append)
    assert lines == ["a", "b", "c"]
    assert result.stdout == "a\nb\nc"


def test_output_handler_errors_propagate_after_the_program_ends() -> None:
    def explode(_line: str) -> None:
        raise RuntimeError("handler broke")

    with pytest.raises(RuntimeError, match="handler broke"):
        run(["sh", "-c", "seq 1 100000"], output_handler=explode)


def test_pass_fds_gives_the_program_a_descriptor() -> None:
    read_end, write_end = os.pipe()
    try:
        code = f"import os; os.write({write_end}, b'via-fd\\n')"
        run([sys.executable, "-c", code], pass_fds=(write_end,))
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end) as pipe:
            read_end = -1
            assert pipe.read() == "via-fd\n"
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


# --- secrets -------------------------------------------------------------------


def test_secret_is_masked_in_message_stderr_and_output_handler() -> None:
    lines: list[str] = []
    with pytest.raises(CommandFailed) as caught:
        run(
            ["sh", "-c", 'echo "out $PASSPHRASE"; echo "bad passphrase $PASSPHRASE" >&2; exit 2'],
            environment={"PASSPHRASE": SECRET},
            secrets=(SECRET,),
            output_handler=lines.append,
        )
    message = str(caught.value)
    assert SECRET not in message
    assert message.endswith(f"exited with code 2: bad passphrase {MASK}")
    assert f"PASSPHRASE='{MASK}'" in message  # the environment is part of the copy-paste line
    assert caught.value.stderr_tail == (f"bad passphrase {MASK}",)
    assert lines == [f"out {MASK}"]


def test_secret_named_environment_is_masked_even_if_not_listed() -> None:
    with pytest.raises(CommandFailed) as caught:
        run(["sh", "-c", 'echo "$FTP_PASSWORD" >&2; exit 1'], environment={"FTP_PASSWORD": SECRET})
    assert SECRET not in str(caught.value)


def test_secret_never_reaches_the_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="virt_dup.execute")
    with pytest.raises(CommandFailed):
        run(
            ["sh", "-c", f"echo {SECRET} >&2; exit 1"],  # a careless caller: masked anyway
            environment={"VDT_KEY": SECRET},
            secrets=(SECRET,),
        )
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "running: VDT_KEY=*** sh -c" in text
    assert SECRET not in text
    assert MASK in text


def test_command_line_is_copy_pasteable() -> None:
    line = command_line(
        ["duplicity", "full", "--include", "/a b", "/"],
        environment={"GNUPGHOME": "/tmp/g h", "PASSPHRASE": "x", "DROP": None},
    )
    assert line == (
        "env -u DROP GNUPGHOME='/tmp/g h' PASSPHRASE='***' duplicity full --include '/a b' /"
    )


def test_mask_replaces_longest_secret_first_and_ignores_empty() -> None:
    assert mask("abcdef abc", ["abc", "abcdef", ""]) == f"{MASK} {MASK}"


def test_meaningful_lines_skip_traceback_frames() -> None:
    stderr = [
        "Traceback (most recent call last):",
        '  File "/usr/lib/x.py", line 3, in <module>',
        "    main()",
        "BackendException: ssh connection failed",
        "",
        "-----",
    ]
    assert meaningful_lines(stderr) == ("BackendException: ssh connection failed",)


def test_a_program_cannot_prompt_on_the_terminal() -> None:
    # Its own session has no controlling terminal: a prompt fails at once
    # (duplicity's getpass) instead of waiting for a keyboard that is not there.
    result = run(
        ["sh", "-c", "if (true </dev/tty) 2>/dev/null; then echo tty; else echo no-tty; fi"]
    )
    assert result.stdout == "no-tty\n"


def _process_ended(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever adopted it to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            state = stream.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_a_program_dies_with_the_process_that_ran_it() -> None:
    # A SIGKILLed `virt-dup run` cannot clean up after itself: a duplicity it
    # left running would go on reading disk images that recovery is changing.
    script = (
        "from virt_dup.execute import run\n"
        "run(['sh', '-c', 'echo $$; exec sleep 60'], "
        "output_handler=lambda line: print(line, flush=True))\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPOSITORY
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not _process_ended(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 1.0
    while not _process_ended(child):
        assert time.monotonic() < deadline, f"pid {child} outlived its parent by 1 s"
        time.sleep(0.01)
