"""The command line: one ``add_<verb>`` per verb, and the parser they make up.

Each ``add_<verb>`` declares one verb's arguments; :func:`build_parser`
joins them with the handlers :mod:`virt_dup.cli.main` maps them to.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from virt_dup import __version__
from virt_dup.cli.completion import (
    complete_domains,
    complete_domains_or_jobs,
    complete_jobs,
    complete_key_files,
)
from virt_dup.config.load import SCOPES
from virt_dup.config.options import BACKEND_NAME, OPTIONS, is_backend_url
from virt_dup.errors import UsageError

PROGRAM = "virt-dup"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[ArgumentParser]
    #: A verb: the function that declares its arguments, and its handler.
    Verb = tuple[Callable[[Subparsers], ArgumentParser], Callable[[Any], int]]


def backend_url(text: str) -> str:
    """``--backend NAME|URL``: a backend of virt-dup.yml or a duplicity URL
    (``scheme://...``, no blanks), so that it can never be read as an option by
    duplicity or the listing helper."""
    if not (is_backend_url(text) or BACKEND_NAME.fullmatch(text)):
        raise argparse.ArgumentTypeError(
            f"{text[:60]!r} is neither a backend name nor a duplicity URL such as "
            "file:///srv/backups"
        )
    return text


def add_add_job(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup add-job``."""
    add = subparsers.add_parser(
        "add-job",
        help="add a backup job to a domain",
        description="Add a backup job to DOMAIN's XML (live and persistent definition) and "
        "print its uuid. Options not given come from virt-dup.yml.",
    )
    add.add_argument("domain", metavar="DOMAIN", help="domain name or UUID").completer = (  # type: ignore[attr-defined]
        complete_domains
    )
    add_disk_flags(add)
    add.add_argument("--uuid", metavar="UUID", help="use this job uuid instead of a new random one")
    add_option_flags(add)
    return add


def add_disk_flags(parser: ArgumentParser) -> None:
    """``--path FILE``, ``--dev DEV``: the disks a job backs up (add-job, edit-job)."""
    parser.add_argument(
        "--path",
        action="append",
        metavar="FILE",
        help="back up the disk whose source is FILE (repeatable)",
    )
    parser.add_argument(
        "--dev",
        action="append",
        metavar="DEV",
        help="back up the disk with target DEV, e.g. vda (repeatable)",
    )


def add_option_flags(parser: ArgumentParser) -> None:
    """One flag per job option of :data:`~virt_dup.config.options.OPTIONS`."""
    for option in OPTIONS:
        parser.add_argument(
            option.command_line_flag,
            dest=option.name,
            metavar=option.metavar,
            action="append" if option.repeatable else "store",
            help=option.description + (" (repeatable)" if option.repeatable else ""),
        )


def add_edit_job(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup edit-job``."""
    edit = subparsers.add_parser(
        "edit-job",
        help="change a job's options, keeping its uuid",
        description="Change the job JOB_UUID in its domain's XML (live and persistent "
        "definition). It keeps its uuid, and so its timer and its backup collection. "
        "Options not named stay as they are; --unset OPTION makes the job inherit OPTION "
        "from virt-dup.yml again. Nothing is written when anything is wrong.",
    )
    edit.add_argument("job", metavar="JOB_UUID").completer = complete_jobs  # type: ignore[attr-defined]
    add_disk_flags(edit)
    edit.add_argument(
        "--unset",
        action="append",
        metavar="OPTION",
        choices=[*(option.name for option in OPTIONS), "disks"],
        help="inherit OPTION again (a job option name such as full_retention, or disks: "
        "every qcow2 disk) (repeatable)",
    )
    add_option_flags(edit)
    return edit


def add_remove_job(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup remove-job``."""
    remove = subparsers.add_parser(
        "remove-job", help="remove one job", description="Remove the job JOB_UUID from its domain."
    )
    remove.add_argument("job", metavar="JOB_UUID").completer = complete_jobs  # type: ignore[attr-defined]
    return remove


def add_remove_all_jobs(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup remove-all-jobs``."""
    remove_all = subparsers.add_parser(
        "remove-all-jobs",
        help="remove every job of a domain (or of every domain)",
        description="Remove every virt-dup job of DOMAIN, or of every domain when none is given.",
    )
    remove_all.add_argument("domain", metavar="DOMAIN", nargs="?").completer = complete_domains  # type: ignore[attr-defined]
    remove_all.add_argument("-y", "--yes", action="store_true", help="do not ask")
    return remove_all


def add_list_jobs(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup list-jobs``."""
    listing = subparsers.add_parser(
        "list-jobs",
        aliases=["jobs"],
        help="list jobs",
        description="List jobs with their effective options.",
    )
    listing.add_argument("domain", metavar="DOMAIN", nargs="?").completer = complete_domains  # type: ignore[attr-defined]
    add_json_option(listing)
    return listing


def add_status(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup status``."""
    status = subparsers.add_parser(
        "status",
        help="show every job: next run, last results, freshness; --check for monitoring",
        description="Show one row per job: domain, disks, schedule (and in words), next run "
        "(from the systemd timers), last run and its result, last successful backup and its "
        "age, last full, encryption and freshness (ok, warn or crit: warn once the last "
        "success is older than 1.5 times, crit once older than 3 times the longest interval "
        "between two scheduled runs; the job options freshness_warn and freshness_crit "
        "override them). Reads the local status files and systemd only; --backend also "
        "lists the backups on each job's backend (slow). Rewrites the metrics file.",
    )
    status.add_argument(
        "domain", metavar="DOMAIN|JOB_UUID", nargs="?", help="default: every job"
    ).completer = complete_domains_or_jobs  # type: ignore[attr-defined]
    status.add_argument(
        "--backend",
        action="store_true",
        help="also count the backups and their size on each job's backend (slow)",
    )
    status.add_argument(
        "--check",
        action="store_true",
        help="monitoring plugin: one line per problem, exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN",
    )
    status.add_argument(
        "--alert",
        action="store_true",
        help="with --check: send the problems through the alerts of virt-dup.yml when its "
        "alerts.events name stale (virt-dup-check.timer runs this daily)",
    )
    add_json_option(status)
    return status


def add_check_config(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup check-config``."""
    check = subparsers.add_parser(
        "check-config",
        help="validate virt-dup.yml",
        description="Validate virt-dup.yml and print what it says.",
    )
    check.add_argument("--connect", action="store_true", help="also connect to libvirt")
    check.add_argument(
        "--syntax-only",
        action="store_true",
        help="only read and validate the file: no gpg, duplicity or backend is tried",
    )
    add_json_option(check)
    return check


def add_doctor(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup doctor``."""
    doctor = subparsers.add_parser(
        "doctor",
        help="check this host before a backup does",
        description=(
            "Check what a backup run will meet on this host: libvirt, each job's disks "
            "(qcow2 files, room and a writable directory for the overlays), the guest agent "
            "its quiesce policy wants, room in the cache and on file:// backends, the "
            "systemd units and timers, and the jobs the generator sees.  One line per "
            "finding, with the fix.  Exit status 0: no problem (warnings allowed); 1: problems."
        ),
    )
    add_json_option(doctor)
    return doctor


def add_init(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup init``."""
    init = subparsers.add_parser(
        "init",
        help="make (or import) the GPG key backups are encrypted to",
        description="Make a GPG key in virt-dup's own GnuPG home (gnupg in the state "
        "directory), or import one with --import, set up the passphrase file and write the "
        "key's fingerprint, the GnuPG home and the passphrase file into virt-dup.yml (its "
        "comments and layout kept). Run again, it says what is set up and changes nothing.",
    )
    init.add_argument(
        "--import",
        dest="import_file",
        type=Path,
        metavar="FILE",
        help="import the key from FILE (written by 'virt-dup export-key') instead of making one",
    ).completer = complete_key_files  # type: ignore[attr-defined]
    init.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help="the key's passphrase is in FILE (root's alone, mode 600), which virt-dup.yml "
        "then names (default: ask on the terminal and write it to gpg-passphrase next to "
        "virt-dup.yml)",
    )
    init.add_argument(
        "--user-id",
        metavar="'NAME <EMAIL>'",
        help="the user id of a new key (default: virt-dup on HOST <root@HOST>)",
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="replace the keys virt-dup.yml names already (backups made to them still need "
        "their secret keys to restore)",
    )
    return init


def add_export_key(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup export-key``."""
    export = subparsers.add_parser(
        "export-key",
        help="write out the secret key, to restore on another host",
        description="Write the secret keys (armored, still protected by their passphrase) "
        "and the public keys of encryption.keys and encryption.sign_key to standard output "
        "or FILE. Without them no backup can be restored once this host is lost: keep the "
        "output away from it. A new host imports it with 'virt-dup init --import FILE'.",
    )
    export.add_argument(
        "--output",
        "-o",
        type=Path,
        metavar="FILE",
        help="write to FILE, a new file only root can read (default: standard output)",
    )
    return export


def add_schedule(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup schedule``."""
    schedule = subparsers.add_parser(
        "schedule", help="cron schedules", description="Work with cron schedules."
    )
    schedule_verbs = schedule.add_subparsers(
        dest="schedule_command", metavar="COMMAND", parser_class=ArgumentParser
    )
    schedule_verbs.required = True
    explain = schedule_verbs.add_parser(
        "explain",
        help="show the systemd timer lines and next runs of a cron string",
        description="Print the OnCalendar=/OnBootSec= lines for CRON (exactly as they go "
        "into the timer), a description and the next run times.",
    )
    explain.add_argument("expression", metavar="CRON")
    explain.add_argument(
        "--count", type=int, default=5, metavar="N", help="how many next runs (default 5)"
    )
    add_json_option(explain)
    return explain


def add_install_units(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup install-units``."""
    install = subparsers.add_parser(
        "install-units",
        help="install the systemd units and the generator",
        description="Install virt-dup's systemd units (virt-dup@.service, virt-dup.target, "
        "virt-dup-reload.path...) and virt-dup-generator, with the path of this virt-dup and "
        "of virt-dup.yml filled in; then reload the manager and start virt-dup.target.",
    )
    install.add_argument(
        "--scope",
        choices=SCOPES,
        help="which manager: system (PID 1) or user (systemd --user); default: scope in "
        "virt-dup.yml",
    )
    install.add_argument(
        "--unit-dir",
        type=Path,
        metavar="DIR",
        help="where the units go (default: /etc/systemd/system, or ~/.config/systemd/user)",
    )
    install.add_argument(
        "--generator-dir",
        type=Path,
        metavar="DIR",
        help="where the generator goes (default: /etc/systemd/system-generators, or "
        "/etc/systemd/user-generators)",
    )
    install.add_argument(
        "--root",
        type=Path,
        metavar="DIR",
        help="write into this scratch tree (DESTDIR) instead of the host, and leave the "
        "running manager alone; paths inside it are written as the host will see them",
    )
    install.add_argument(
        "--dry-run", action="store_true", help="print the files instead of writing them"
    )
    add_json_option(install)
    return install


def add_sync_timers(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup sync-timers``."""
    sync = subparsers.add_parser(
        "sync-timers",
        help="start new and stop removed job timers",
        description="Reload the systemd manager (re-running virt-dup-generator), start the "
        "timer of every job that has none running and stop the timers of removed jobs. "
        "virt-dup-reload.service runs this when virt-dup.yml or a domain definition changes.",
    )
    add_json_option(sync)
    return sync


def add_run(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup run``."""
    run = subparsers.add_parser(
        "run",
        help="run one backup job (what the timers start)",
        description="Run the backup job JOB_UUID; virt-dup@JOB_UUID.service does this.",
    )
    run.add_argument("job", metavar="JOB_UUID", nargs="?").completer = complete_jobs  # type: ignore[attr-defined]
    run.add_argument(
        "--domain", metavar="DOMAIN", help="run every job of DOMAIN now, one after the other"
    ).completer = complete_domains  # type: ignore[attr-defined]
    run.add_argument("--full", action="store_true", help="a full backup, not an incremental")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (disks, chain files selected by depth, full or incremental, "
        "backend, what recovery would merge first) and change nothing: no lock, no "
        "recovery, no record, nothing in the cache or on the backend",
    )
    add_json_option(run)
    return run


def add_recover(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup recover``."""
    recover = subparsers.add_parser(
        "recover",
        help="finish or roll back interrupted runs (what the boot unit does)",
        description="Merge every virt-dup overlay an interrupted run left back into its "
        "disk, so each domain runs on its original top image with every write kept.",
    )
    return recover


def add_alert(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup alert``."""
    alert = subparsers.add_parser(
        "alert",
        help="send the alert that a virt-dup unit failed (what the alert unit does)",
        description="Say in the journal that UNIT failed and send an alert with its job, "
        "domain, error line and the journalctl command that shows more to every URL of "
        "alerts: in virt-dup.yml (apprise URLs). virt-dup-alert@UNIT.service runs this "
        "when a virt-dup unit fails. An alert that cannot be sent is a journal warning: "
        "the exit code is 0 unless UNIT is not a unit name.",
    )
    alert.add_argument(
        "unit", metavar="UNIT", help="the failed unit, e.g. virt-dup@JOB_UUID.service"
    )
    return alert


def add_backups(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup backups``."""
    backups = subparsers.add_parser(
        "backups",
        help="list the backups of a domain or job, or the jobs on a backend",
        description="List every restorable point (backup id = its time) of the jobs of "
        "DOMAIN, or of JOB_UUID: full or incremental, the chain it belongs to, its size on "
        "the backend and the disks in it. A domain not defined here is looked for on the "
        "backends of virt-dup.yml. With --backend URL, only that backend is read and neither "
        "libvirt nor local state is needed (a fresh host).",
    )
    backups.add_argument(
        "domain", metavar="DOMAIN|JOB_UUID", nargs="?", help="default: every job found"
    ).completer = complete_domains  # type: ignore[attr-defined]
    backups.add_argument(
        "--backend",
        metavar="URL",
        type=backend_url,
        help="read this backend (its job directories) only",
    )
    add_json_option(backups)
    return backups


def add_restore(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup restore``."""
    restore = subparsers.add_parser(
        "restore",
        help="restore the disks of a domain from a backup",
        description="Restore the chain files of DOMAIN (or of the job JOB_UUID) from the "
        "backup BACKUP_ID (default: the latest): each file checked against the checksum "
        "recorded at backup time, its backing file rewritten to the new location, made "
        "sparse, and checked with qemu-img check. Without --target-dir or --in-place the "
        "files go back where they were, which must not exist any more. A restore never "
        "replaces a file (except --in-place).",
    )
    restore.add_argument("domain", metavar="DOMAIN|JOB_UUID").completer = complete_domains  # type: ignore[attr-defined]
    restore.add_argument("backup_id", metavar="BACKUP_ID", nargs="?", help="default: the latest")
    where = restore.add_mutually_exclusive_group()
    where.add_argument(
        "--target-dir", metavar="DIR", help="restore into DIR/<disk>/<file> (new files only)"
    )
    where.add_argument(
        "--in-place",
        action="store_true",
        help="replace the disks of the shut-off domain; its current files are set aside "
        "until the restore has been checked, then deleted",
    )
    restore.add_argument(
        "--keep-replaced",
        action="store_true",
        help="with --in-place: keep the replaced files (FILE.virt-dup-replaced-BACKUP_ID)",
    )
    restore.add_argument(
        "--define",
        action="store_true",
        help="define the domain from the saved XML on the restored files (a copy with a "
        "new name and UUID when the original is still defined)",
    )
    restore.add_argument("--name", metavar="NAME", help="with --define: the new domain's name")
    restore.add_argument(
        "--disk", action="append", metavar="DEV", help="restore only this disk (repeatable)"
    )
    restore.add_argument("--job", metavar="JOB_UUID", help="the job, when the domain has several")
    restore.add_argument(
        "--backend",
        metavar="URL",
        type=backend_url,
        help="the backend to restore from; the domain is found in the manifests there",
    )
    restore.add_argument(
        "--backing-file",
        action="append",
        metavar="[DEV=]FILE",
        help="the base to put a chain on that was backed up without it (depth < 0); it must "
        "have the virtual size recorded in the backup (repeatable)",
    )
    restore.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be restored where, and change nothing: no file, no lock, "
        "no definition, nothing in the cache",
    )
    add_json_option(restore)
    return restore


def add_verify(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup verify``."""
    verify = subparsers.add_parser(
        "verify",
        help="check that a backup restores and matches its checksums",
        description="Restore every file of the backup BACKUP_ID (default: the latest) of the "
        "job JOB_UUID into a scratch directory, compare the checksums recorded at backup time, "
        "run qemu-img check, remove the scratch directory. Exits 1 when the backup does not "
        "verify. virt-dup-verify@JOB_UUID.service does this.",
    )
    verify.add_argument("job", metavar="JOB_UUID|DOMAIN").completer = complete_jobs  # type: ignore[attr-defined]
    verify.add_argument("backup_id", metavar="BACKUP_ID", nargs="?", help="default: the latest")
    verify.add_argument(
        "--backend",
        metavar="URL",
        type=backend_url,
        help="the backend to read (default: the job's)",
    )
    verify.add_argument(
        "--scratch-dir",
        metavar="DIR",
        help="where the scratch directory goes (default: $TMPDIR or /var/tmp)",
    )
    add_json_option(verify)
    return verify


def add_migrate_backend(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup migrate-backend``."""
    migrate = subparsers.add_parser(
        "migrate-backend",
        help="move a job's backups to another backend and switch the job to it",
        description="Copy every backup of the job JOB_UUID from its first backend to BACKEND "
        "(any duplicity scheme to any other, file by file), check there that duplicity lists "
        "the same backups and that the latest one restores and matches its checksums, then "
        "make BACKEND the job's first backend and delete the job's files from the old one "
        "(unless --keep-source). Nothing is deleted before the check passed; interrupted, "
        "the same command finishes the migration. No backup of the domain runs meanwhile.",
    )
    migrate.add_argument("job", metavar="JOB_UUID").completer = complete_jobs  # type: ignore[attr-defined]
    migrate.add_argument(
        "--to",
        metavar="NAME|URL",
        type=backend_url,
        required=True,
        help="the backend to move to: a name from virt-dup.yml or a duplicity URL",
    )
    migrate.add_argument(
        "--keep-source",
        action="store_true",
        help="leave the job's files on the old backend (the job no longer uses it)",
    )
    add_json_option(migrate)
    return migrate


def add_help(subparsers: Subparsers) -> ArgumentParser:
    """``virt-dup help``."""
    helper = subparsers.add_parser("help", help="show help for a command")
    helper.add_argument("verb", metavar="COMMAND", nargs="?")
    return helper


def build_parser(verbs: Mapping[str, Verb]) -> tuple[ArgumentParser, Subparsers]:
    """The whole parser: global options, then every verb of ``verbs`` with its
    handler as ``handler`` in the parsed arguments."""
    parser = ArgumentParser(
        prog=PROGRAM,
        description="Back up the qcow2 disks of libvirt/KVM domains with duplicity; "
        "jobs live in the domain XML, systemd timers run them.",
        epilog="See virt-dup(8) and virt-dup.yml(5).",
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    add_global_options(parser, after_verb=False)
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=ArgumentParser
    )

    for add, handler in verbs.values():
        verb = add(subparsers)
        add_global_options(verb, after_verb=True)
        verb.set_defaults(handler=handler)
    return parser, subparsers


def add_global_options(parser: ArgumentParser, *, after_verb: bool) -> None:
    """``--config``, ``--debug``, ``-q``, ``-v``: on the main parser (with their
    defaults) and on every verb's, so that they may come before or after the
    verb with the same meaning.

    After the verb they default to nothing (``SUPPRESS``): a verb's parser
    writes its namespace over the main parser's, and a default there would
    undo ``virt-dup --config F run``.  Their help is one group, "global
    options", at the end of each verb's help.
    """
    group = parser.add_argument_group("global options (before or after the command)")

    def default(value: object) -> object:
        return argparse.SUPPRESS if after_verb else value

    group.add_argument(
        "--config",
        metavar="FILE",
        default=default(None),
        help="configuration file (default: $VIRT_DUP_CONFIG or /etc/virt-dup/virt-dup.yml)",
    )
    group.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="debug messages, and the traceback of a failure",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="more messages: the debug log (without tracebacks)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=default(0),
        help="fewer messages: warnings and errors only; twice: errors only (no progress)",
    )


def add_json_option(parser: ArgumentParser) -> None:
    """``--json``: the verb prints one JSON object (see JSON OUTPUT in virt-dup(8))."""
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead (schema virt-dup/<command>/1, see virt-dup(8))",
    )
