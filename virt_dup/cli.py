# PYTHON_ARGCOMPLETE_OK
"""The ``virt-dup`` command: argparse + argcomplete, verbs dispatched through a dict.

Expected failures (:class:`~virt_dup.errors.VirtDupError`) become one line on
stderr and an exit code (0 ok, 1 operation failed, 2 usage or configuration
error); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import argcomplete

from virt_dup import __version__
from virt_dup.actions import jobs as job_actions
from virt_dup.actions import units as unit_actions
from virt_dup.config import SCOPES, Config, load_config
from virt_dup.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    NotFoundError,
    UsageError,
    VirtDupError,
)
from virt_dup.hypervisor import Hypervisor
from virt_dup.options import OPTIONS
from virt_dup.systemd import ServiceManager, SystemdError, SystemdUnavailable

PROGRAM = "virt-dup"
log = logging.getLogger("virt_dup")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- completion -----------------------------------------------------------------
def _completion_hypervisor(parsed_args: argparse.Namespace) -> Hypervisor | None:
    try:
        return Hypervisor.open(load_config(getattr(parsed_args, "config", None)))
    except VirtDupError:
        return None


def complete_domains(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    hypervisor = _completion_hypervisor(parsed_args)
    if hypervisor is None:
        return []
    with hypervisor:
        return [name for name in hypervisor.domain_names() if name.startswith(prefix)]


def complete_jobs(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    hypervisor = _completion_hypervisor(parsed_args)
    if hypervisor is None:
        return []
    with hypervisor:
        return [
            job.uuid
            for _domain, jobs in hypervisor.all_jobs()
            if isinstance(jobs, list)
            for job in jobs
            if job.uuid.startswith(prefix)
        ]


# -- verbs ------------------------------------------------------------------------
class Context:
    """What a verb gets: the parsed arguments, the config, a lazily opened hypervisor."""

    def __init__(self, arguments: argparse.Namespace, hypervisor: Hypervisor | None) -> None:
        self.arguments = arguments
        self._hypervisor = hypervisor
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.arguments.config)
            for notice in self._config.notices:
                print(f"{PROGRAM}: notice: {notice}", file=sys.stderr)
        return self._config

    @property
    def hypervisor(self) -> Hypervisor:
        if self._hypervisor is None:
            self._hypervisor = Hypervisor.open(self.config)
        return self._hypervisor


def sync_after_job_change(context: Context) -> None:
    """Jobs changed: have the manager run the generator and start/stop timers now.

    Everything goes to stderr (stdout of add-job is the job uuid).  No manager
    is a notice, a failing one a warning: the XML is written either way, and
    virt-dup-reload.path or the next daemon-reload catches up.
    """
    try:
        with ServiceManager.connect(context.config.scope) as manager:
            report = unit_actions.sync_until_settled(
                manager, lambda: unit_actions.watched_files_state(context.config)
            )
    except SystemdUnavailable as error:
        log.debug("%s", error)
        print(
            f"{PROGRAM}: notice: no systemd manager reachable; timers change at the next "
            "daemon-reload",
            file=sys.stderr,
        )
        return
    except SystemdError as error:
        print(f"{PROGRAM}: warning: {error}; run '{PROGRAM} sync-timers'", file=sys.stderr)
        return
    for line in report.lines():
        print(f"{PROGRAM}: {line}", file=sys.stderr)


def cmd_add_job(context: Context) -> int:
    arguments = context.arguments
    values: dict[str, object] = {}
    for option in OPTIONS:
        value = getattr(arguments, option.name)
        if value is not None:
            values[option.name] = value
    request = job_actions.AddJobRequest(
        domain=arguments.domain,
        option_values=values,
        devs=tuple(arguments.dev or ()),
        paths=tuple(arguments.path or ()),
        job_uuid=arguments.uuid,
    )
    job = job_actions.add_job(context.config, context.hypervisor, request)
    print(job.uuid)
    effective = job.options.over(context.config.defaults)
    if not (effective.schedule or effective.full_schedule):
        print(
            f"{PROGRAM}: notice: job {job.uuid} has no schedule and virt-dup.yml no "
            "defaults.schedule: it gets no timer (run it with 'virt-dup run')",
            file=sys.stderr,
        )
    sync_after_job_change(context)
    return EXIT_OK


def cmd_remove_job(context: Context) -> int:
    job = job_actions.remove_job(context.hypervisor, context.arguments.job)
    print(f"removed job {job.uuid} from domain {job.domain_name}")
    sync_after_job_change(context)
    return EXIT_OK


def _confirm(assume_yes: bool) -> Callable[[str], bool]:
    def confirm(question: str) -> bool:
        if assume_yes:
            return True
        if not sys.stdin.isatty():
            raise UsageError(f"{question} refusing without --yes (no terminal to ask)")
        answer = input(f"{question} [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    return confirm


def cmd_remove_all_jobs(context: Context) -> int:
    arguments = context.arguments
    removed = job_actions.remove_all_jobs(
        context.hypervisor, arguments.domain, _confirm(arguments.yes)
    )
    for job in removed:
        print(f"removed job {job.uuid} from domain {job.domain_name}")
    if not removed:
        print("no jobs to remove")
    else:
        sync_after_job_change(context)
    return EXIT_OK


def cmd_list_jobs(context: Context) -> int:
    records, warnings = job_actions.list_jobs(
        context.config, context.hypervisor, context.arguments.domain
    )
    for warning in warnings:
        print(f"{PROGRAM}: warning: {warning}", file=sys.stderr)
    job_actions.print_jobs(records, context.arguments.json)
    return EXIT_OK


def cmd_check_config(context: Context) -> int:
    config = context.config
    exists = config.path.exists()
    print(f"{config.path}: {'ok' if exists else 'not present, using built-in defaults'}")
    print(f"scope: {config.scope}, libvirt: {config.libvirt_uri}")
    print(f"backends: {', '.join(f'{n}={u}' for n, u in config.backends.items()) or '(none)'}")
    print(f"encryption keys: {', '.join(config.encryption.keys) or '(none)'}")
    if context.arguments.connect:
        version = context.hypervisor.connection.getLibVersion()
        print(f"libvirt reachable (library {version // 1000000}.{version // 1000 % 1000})")
    return EXIT_OK


def cmd_schedule_explain(context: Context) -> int:
    from virt_dup.schedule import cron_to_timer, describe, next_runs

    expression = context.arguments.expression
    timer = cron_to_timer(expression)
    start = datetime.now(UTC).astimezone()
    runs = next_runs(expression, start, context.arguments.count)
    if context.arguments.json:
        json.dump(
            {
                "expression": expression,
                "description": describe(expression),
                "on_calendar": list(timer.on_calendar),
                "on_boot_sec": timer.on_boot_sec,
                "next": [run.isoformat() for run in runs],
            },
            sys.stdout,
            indent=2,
        )
        print()
        return EXIT_OK
    for spec in timer.on_calendar:
        print(f"OnCalendar={spec}")
    if timer.on_boot_sec is not None:
        print(f"OnBootSec={timer.on_boot_sec}")
    print(f"# {describe(expression)}")
    for run in runs:
        print(f"# next: {run.strftime('%a %Y-%m-%d %H:%M %Z')}")
    return EXIT_OK


def cmd_install_units(context: Context) -> int:
    arguments = context.arguments
    config = context.config
    settings = unit_actions.InstallSettings.from_config(
        config,
        scope=arguments.scope,
        unit_directory=arguments.unit_dir,
        generator_directory=arguments.generator_dir,
    )
    mismatch = unit_actions.check_scope(config, settings.scope)
    if mismatch:
        print(f"{PROGRAM}: notice: {mismatch}", file=sys.stderr)
    unit_sources, generator_source = unit_actions.read_sources(
        unit_actions.data_directory("units"), unit_actions.data_directory("generator")
    )
    installation = unit_actions.render_installation(settings, unit_sources, generator_source)
    if arguments.dry_run:
        for path, (text, mode) in sorted(installation.files.items()):
            print(f"# {path} (mode {mode:04o})")
            print(text, end="" if text.endswith("\n") else "\n")
        for link, target in sorted(installation.symlinks.items()):
            print(f"# {link} -> {target}")
        return EXIT_OK
    unit_actions.write_installation(installation)
    for path in sorted(installation.files):
        print(f"installed {path}")
    for link, target in sorted(installation.symlinks.items()):
        print(f"linked {link} -> {target}")
    systemctl = "systemctl" if settings.scope == "system" else "systemctl --user"
    try:
        with ServiceManager.connect(settings.scope) as manager:
            started = unit_actions.start_installed(manager)
    except SystemdUnavailable as error:
        log.debug("%s", error)
        print(
            f"{PROGRAM}: notice: no systemd {settings.scope} manager reachable; the units take "
            f"effect at the next boot, or run: {systemctl} daemon-reload && "
            f"{systemctl} start {' '.join(unit_actions.START_UNITS)}",
            file=sys.stderr,
        )
        return EXIT_OK
    print(f"reloaded the {settings.scope} manager; started {', '.join(started)}")
    return EXIT_OK


def cmd_sync_timers(context: Context) -> int:
    # virt-dup-reload.service runs this: wait for the watched files to settle,
    # since the path unit drops changes made while this service runs.
    with ServiceManager.connect(context.config.scope) as manager:
        report = unit_actions.sync_until_settled(
            manager,
            lambda: unit_actions.watched_files_state(context.config),
            settle_seconds=1.0,
        )
    for line in report.lines():
        print(line)
    print(
        f"timers: {len(report.started)} started, {len(report.removed)} stopped, "
        f"{len(report.paused)} paused, {report.unchanged} unchanged"
    )
    return EXIT_FAILED if report.not_active else EXIT_OK


def cmd_run(context: Context) -> int:
    from virt_dup.run import run_job

    arguments = context.arguments
    if (arguments.job is None) == (arguments.domain is None):
        raise UsageError("give either JOB_UUID or --domain DOMAIN")
    hypervisor = context.hypervisor
    if arguments.domain is not None:
        domain = hypervisor.domain(arguments.domain)
        job_ids = [job.uuid for job in hypervisor.jobs(domain)]
        if not job_ids:
            raise NotFoundError(f"domain {domain.name()} has no virt-dup jobs")
    else:
        job_ids = [arguments.job]
    progress = _print_progress if sys.stderr.isatty() else None
    for job_id in job_ids:
        result = run_job(
            context.config,
            hypervisor,
            job_id,
            force_full=arguments.full,
            dry_run=arguments.dry_run,
            progress=progress,
        )
        if result.result != "dry-run":
            print(result.summary())
    return EXIT_OK


def _print_progress(progress: object) -> None:
    print(f"\r{PROGRAM}: {progress}", end="", file=sys.stderr, flush=True)


def cmd_recover(context: Context) -> int:
    from virt_dup.recovery import recover_all
    from virt_dup.state import StateStore

    done, errors = recover_all(context.hypervisor, StateStore(context.config.state_directory))
    for line in done:
        print(f"recovered: {line}")
    for line in errors:
        print(f"{PROGRAM}: error: {line}", file=sys.stderr)
    if not done and not errors:
        print("nothing to recover")
    return EXIT_FAILED if errors else EXIT_OK


def _progress_reporter() -> Callable[[str], None]:
    """Progress lines on a terminal (stderr); debug log lines otherwise."""
    if sys.stderr.isatty():
        return lambda line: print(f"{PROGRAM}: {line}", file=sys.stderr, flush=True)
    return lambda line: log.debug("%s", line)


def cmd_backups(context: Context) -> int:
    from virt_dup.actions.restore import list_jobs_backups, print_backups

    arguments = context.arguments
    listings = list_jobs_backups(
        context.config,
        lambda: context.hypervisor,
        arguments.domain,
        arguments.backend,
        report=_progress_reporter(),
    )
    print_backups(listings, arguments.json)
    return EXIT_OK


def cmd_restore(context: Context) -> int:
    from virt_dup.actions.restore import RestoreRequest, format_notices, restore

    arguments = context.arguments
    request = RestoreRequest(
        domain=arguments.domain,
        backup_id=arguments.backup_id,
        job=arguments.job,
        backend=arguments.backend,
        target_dir=arguments.target_dir,
        in_place=arguments.in_place,
        keep_replaced=arguments.keep_replaced,
        define=arguments.define,
        name=arguments.name,
        disks=tuple(arguments.disk or ()),
        backing_files=tuple(arguments.backing_file or ()),
    )
    result = restore(context.config, lambda: context.hypervisor, request, _progress_reporter())
    for line in format_notices(result):
        print(f"{PROGRAM}: notice: {line}", file=sys.stderr)
    print(result.summary())
    if result.defined:
        sync_after_job_change(context)
    return EXIT_OK


def cmd_verify(context: Context) -> int:
    from virt_dup.verify import verify

    arguments = context.arguments
    result = verify(
        context.config,
        lambda: context.hypervisor,
        arguments.job,
        arguments.backup_id,
        backend_url=arguments.backend,
        scratch=arguments.scratch_dir,
        report=_progress_reporter(),
    )
    for warning in result.warnings:
        print(f"{PROGRAM}: warning: {warning}", file=sys.stderr)
    print(result.summary())
    return EXIT_OK


def cmd_help(context: Context) -> int:
    parser = context.arguments.parser
    verb = context.arguments.verb
    if verb:
        subparser = context.arguments.subparsers.choices.get(verb)
        if subparser is None:
            raise UsageError(f"no command {verb!r} (see '{PROGRAM} help')")
        subparser.print_help()
    else:
        parser.print_help()
    return EXIT_OK


# -- the parser -----------------------------------------------------------------------
def build_parser() -> tuple[ArgumentParser, argparse._SubParsersAction[ArgumentParser]]:
    parser = ArgumentParser(
        prog=PROGRAM,
        description="Back up the qcow2 disks of libvirt/KVM domains with duplicity; "
        "jobs live in the domain XML, systemd timers run them.",
        epilog="See virt-dup(8) and virt-dup.yml(5).",
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: $VIRT_DUP_CONFIG or /etc/virt-dup/virt-dup.yml)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=ArgumentParser
    )

    add = subparsers.add_parser(
        "add-job",
        help="add a backup job to a domain",
        description="Add a backup job to DOMAIN's XML (live and persistent definition) and "
        "print its uuid. Options not given come from virt-dup.yml.",
    )
    add.add_argument("domain", metavar="DOMAIN", help="domain name or UUID").completer = (  # type: ignore[attr-defined]
        complete_domains
    )
    add.add_argument(
        "--path",
        action="append",
        metavar="FILE",
        help="back up the disk whose source is FILE (repeatable)",
    )
    add.add_argument(
        "--dev",
        action="append",
        metavar="DEV",
        help="back up the disk with target DEV, e.g. vda (repeatable)",
    )
    add.add_argument("--uuid", metavar="UUID", help="use this job uuid instead of a new random one")
    for option in OPTIONS:
        add.add_argument(
            option.command_line_flag,
            dest=option.name,
            metavar=option.metavar,
            action="append" if option.repeatable else "store",
            help=option.description + (" (repeatable)" if option.repeatable else ""),
        )
    add.set_defaults(handler=cmd_add_job)

    remove = subparsers.add_parser(
        "remove-job", help="remove one job", description="Remove the job JOB_UUID from its domain."
    )
    remove.add_argument("job", metavar="JOB_UUID").completer = complete_jobs  # type: ignore[attr-defined]
    remove.set_defaults(handler=cmd_remove_job)

    remove_all = subparsers.add_parser(
        "remove-all-jobs",
        help="remove every job of a domain (or of every domain)",
        description="Remove every virt-dup job of DOMAIN, or of every domain when none is given.",
    )
    remove_all.add_argument("domain", metavar="DOMAIN", nargs="?").completer = complete_domains  # type: ignore[attr-defined]
    remove_all.add_argument("-y", "--yes", action="store_true", help="do not ask")
    remove_all.set_defaults(handler=cmd_remove_all_jobs)

    for name, aliases in (("list-jobs", ["jobs"]),):
        listing = subparsers.add_parser(
            name,
            aliases=aliases,
            help="list jobs",
            description="List jobs with their effective options.",
        )
        listing.add_argument("domain", metavar="DOMAIN", nargs="?").completer = complete_domains  # type: ignore[attr-defined]
        listing.add_argument("--json", action="store_true", help="machine-readable output")
        listing.set_defaults(handler=cmd_list_jobs)

    check = subparsers.add_parser(
        "check-config",
        help="validate virt-dup.yml",
        description="Validate virt-dup.yml and print what it says.",
    )
    check.add_argument("--connect", action="store_true", help="also connect to libvirt")
    check.set_defaults(handler=cmd_check_config)

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
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.set_defaults(handler=cmd_schedule_explain)

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
        "--dry-run", action="store_true", help="print the files instead of writing them"
    )
    install.set_defaults(handler=cmd_install_units)

    sync = subparsers.add_parser(
        "sync-timers",
        help="start new and stop removed job timers",
        description="Reload the systemd manager (re-running virt-dup-generator), start the "
        "timer of every job that has none running and stop the timers of removed jobs. "
        "virt-dup-reload.service runs this when virt-dup.yml or a domain definition changes.",
    )
    sync.set_defaults(handler=cmd_sync_timers)

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
        "backend) and change nothing",
    )
    run.set_defaults(handler=cmd_run)

    recover = subparsers.add_parser(
        "recover",
        help="finish or roll back interrupted runs (what the boot unit does)",
        description="Merge every virt-dup overlay an interrupted run left back into its "
        "disk, so each domain runs on its original top image with every write kept.",
    )
    recover.set_defaults(handler=cmd_recover)

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
        "--backend", metavar="URL", help="read this backend (its job directories) only"
    )
    backups.add_argument("--json", action="store_true", help="machine-readable output")
    backups.set_defaults(handler=cmd_backups)

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
        help="the backend to restore from; the domain is found in the manifests there",
    )
    restore.add_argument(
        "--backing-file",
        action="append",
        metavar="[DEV=]FILE",
        help="the base to put a chain on that was backed up without it (depth < 0); it must "
        "have the virtual size recorded in the backup (repeatable)",
    )
    restore.set_defaults(handler=cmd_restore)

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
    verify.add_argument("--backend", metavar="URL", help="the backend to read (default: the job's)")
    verify.add_argument(
        "--scratch-dir",
        metavar="DIR",
        help="where the scratch directory goes (default: $TMPDIR or /var/tmp)",
    )
    verify.set_defaults(handler=cmd_verify)

    helper = subparsers.add_parser("help", help="show help for a command")
    helper.add_argument("verb", metavar="COMMAND", nargs="?")
    helper.set_defaults(handler=cmd_help)
    return parser, subparsers


def main(argv: Sequence[str] | None = None, hypervisor: Hypervisor | None = None) -> int:
    """Run virt-dup; returns the exit code.  ``hypervisor`` may be injected."""
    parser, subparsers = build_parser()
    argcomplete.autocomplete(parser)
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format=f"{PROGRAM}: %(message)s"
    )
    try:
        arguments = parser.parse_args(argv)
        if arguments.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        arguments.parser = parser
        arguments.subparsers = subparsers
        context = Context(arguments, hypervisor)
        handler: Callable[[Context], int] = arguments.handler
        try:
            return handler(context)
        finally:
            if hypervisor is None and context._hypervisor is not None:
                context._hypervisor.close()
    except VirtDupError as error:
        if debug:
            traceback.print_exc()
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (| head): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as error:  # a bug: say so, with the traceback when asked
        if debug:
            traceback.print_exc()
        print(
            f"{PROGRAM}: internal error: {type(error).__name__}: {error} (run with --debug)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
