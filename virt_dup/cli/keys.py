"""The handlers of ``virt-dup init`` and ``virt-dup export-key`` (see
:mod:`virt_dup.actions.keys`), and the passphrase prompt they share."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from virt_dup.actions import keys as key_actions
from virt_dup.cli.arguments import PROGRAM
from virt_dup.config.load import Config, config_path
from virt_dup.errors import EXIT_OK, UsageError
from virt_dup.files import file_errors_reported
from virt_dup.systemd.units import create_own_directories

if TYPE_CHECKING:
    from virt_dup.cli.main import Context

#: Said once, when a key is made: without its secret half elsewhere, the backups
#: are lost with the host.
EXPORT_WARNING = """\
================================================================================
  IMPORTANT: back up the secret key now, away from this host.
  Every backup is encrypted to this key: without its secret half no backup
  can be restored on another host -- losing this host loses them all.
      {program} export-key --output virt-dup-key.asc
  Keep that file and the passphrase ({passphrase_file}) apart, off this host.
  A new host restores with: {program} init --import virt-dup-key.asc
================================================================================"""


def ask_passphrase(confirm: bool) -> str:
    """The key's passphrase from the terminal (twice when ``confirm``), never echoed."""
    first = getpass.getpass("passphrase of the GPG key: ")
    if confirm and getpass.getpass("the same passphrase again: ") != first:
        raise UsageError("the two passphrases differ; nothing was changed")
    return first


def _config(context: Context) -> Config:
    """virt-dup.yml; a file named with --config that does not exist yet is made by init."""
    path, _named = config_path(context.arguments.config)
    return context.config if path.exists() else Config(path=path)


def cmd_init(context: Context) -> int:
    arguments = context.arguments
    request = key_actions.InitRequest(
        import_file=arguments.import_file,
        passphrase_file=arguments.passphrase_file,
        user_id=arguments.user_id,
        force=arguments.force,
    )
    ask = ask_passphrase if sys.stdin.isatty() else None
    config = _config(context)
    result = key_actions.init(config, request, ask)
    for line in result.lines():
        print(line)
    with file_errors_reported():
        for directory in create_own_directories(config):
            print(f"created {directory}")
    if result.created:
        print(
            EXPORT_WARNING.format(program=PROGRAM, passphrase_file=result.passphrase_file),
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_export_key(context: Context) -> int:
    output: Path | None = context.arguments.output
    export = key_actions.export_keys(context.config)
    if output is None:
        sys.stdout.write(export.text)
        sys.stdout.flush()
    else:
        key_actions.write_export(output, export.text)
    where = output or "standard output"
    for key in export.keys:
        print(
            f"{PROGRAM}: exported the secret and public key {key.fingerprint} to {where}",
            file=sys.stderr,
        )
    print(
        f"{PROGRAM}: keep it off this host; a new host takes it with "
        f"'{PROGRAM} init --import FILE' (and the key's passphrase)",
        file=sys.stderr,
    )
    return EXIT_OK
