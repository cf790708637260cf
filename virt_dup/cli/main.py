# PYTHON_ARGCOMPLETE_OK
"""The ``virt-dup`` command: argparse + argcomplete, verbs dispatched through a dict.

Expected failures (:class:`~virt_dup.errors.VirtDupError`) become one line on
stderr and an exit code (0 ok, 1 operation failed, 2 usage or configuration
error, 3 no backups yet); ``--debug`` adds the traceback.  Under ``--json``
a failure prints nothing on stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import argcomplete

from virt_dup.actions import jobs as job_actions
from virt_dup.actions import units as unit_actions
from virt_dup.cli import arguments as cli_arguments
from virt_dup.cli import keys as cli_keys
from virt_dup.cli import output
from virt_dup.cli.arguments import PROGRAM
from virt_dup.config.load import Config, load_config
from virt_dup.config.options import OPTIONS
from virt_dup.errors import (
    EXIT_FAILED,
    EXIT_NO_BACKUPS,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    NotFoundError,
    UsageError,
    VirtDupError,
)
from virt_dup.libvirt.connection import Hypervisor
from virt_dup.libvirt.locality import require_local_disks
from virt_dup.systemd.journal import Outcome
from virt_dup.systemd.manager import ServiceManager
from virt_dup.systemd.units import InstallSettings

log = logging.getLogger("virt_dup")


# -- verbs ------------------------------------------------------------------------
class Context:
    """What a verb gets: the parsed arguments, the config, a lazily opened hypervisor."""

    def __init__(self, arguments: argparse.Namespace, hypervisor: Hypervisor | None) -> None:
        self.arguments = arguments
        self._hypervisor = hypervisor
        self._owns_hypervisor = False
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
            self._owns_hypervisor = True
        return self._hypervisor

    @property
    def local_hypervisor(self) -> Hypervisor:
        """:attr:`hypervisor`, for verbs that read the domains' disk files: a URI
        naming another host is refused before anything connects to it."""
        require_local_disks(self.config.libvirt_uri)
        return self.hypervisor

    def close(self) -> None:
        """Close the connection this context opened (not an injected one)."""
        if self._owns_hypervisor and self._hypervisor is not None:
            self._hypervisor.close()


def sync_after_job_change(context: Context) -> None:
    """Jobs changed: timers follow now (:func:`virt_dup.actions.units.sync_after_job_change`).

    Everything goes to stderr: the stdout of add-job is the job uuid.
    """
    unit_actions.sync_after_job_change(
        context.config, lambda line: print(f"{PROGRAM}: {line}", file=sys.stderr)
    )


def cmd_add_job(context: Context) -> int:
    arguments = context.arguments
    request = job_actions.AddJobRequest(
        domain=arguments.domain,
        option_values=requested_option_values(arguments),
        devs=tuple(arguments.dev or ()),
        paths=tuple(arguments.path or ()),
        job_uuid=arguments.uuid,
    )
    job = job_actions.add_job(context.config, context.local_hypervisor, request)
    print(job.uuid)
    effective = job.options.over(context.config.defaults)
    if effective.encryption == "gpg" and not (
        effective.encryption_keys or context.config.encryption.keys
    ):
        print(
            f"{PROGRAM}: warning: job {job.uuid} is to be encrypted but no key is configured: "
            "its runs fail until 'virt-dup init' makes one",
            file=sys.stderr,
        )
    if not (effective.schedule or effective.full_schedule):
        print(
            f"{PROGRAM}: notice: job {job.uuid} has no schedule and virt-dup.yml no "
            "defaults.schedule: it gets no timer (run it with 'virt-dup run')",
            file=sys.stderr,
        )
    sync_after_job_change(context)
    return EXIT_OK


def requested_option_values(arguments: argparse.Namespace) -> dict[str, object]:
    """The job option flags given (add-job, edit-job): option name -> text."""
    return {
        option.name: getattr(arguments, option.name)
        for option in OPTIONS
        if getattr(arguments, option.name) is not None
    }


def cmd_edit_job(context: Context) -> int:
    arguments = context.arguments
    request = job_actions.EditJobRequest(
        job_uuid=arguments.job,
        option_values=requested_option_values(arguments),
        unset=tuple(arguments.unset or ()),
        devs=tuple(arguments.dev or ()),
        paths=tuple(arguments.path or ()),
    )
    before, after = job_actions.edit_job(context.config, context.hypervisor, request)
    for line in job_actions.job_changes(before, after):
        print(f"job {after.uuid} of domain {after.domain_name}: {line}")
    sync_after_job_change(context)
    return EXIT_OK


def cmd_remove_job(context: Context) -> int:
    job = job_actions.remove_job(context.hypervisor, context.arguments.job)
    print(f"removed job {job.uuid} from domain {job.domain_name}")
    sync_after_job_change(context)
    return EXIT_OK


def cmd_remove_all_jobs(context: Context) -> int:
    arguments = context.arguments
    removed = job_actions.remove_all_jobs(
        context.hypervisor, arguments.domain, output.confirmation(arguments.yes)
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
    output.print_jobs(records, context.arguments.json)
    return EXIT_OK


def alert_stale(config: Config, lines: list[str]) -> None:
    """Send ``status --check``'s problems when virt-dup.yml's alerts want "stale";
    an alert that cannot be sent is a warning, never a failure."""
    from virt_dup.alerts.message import stale_alert
    from virt_dup.alerts.send import alert_urls, hostname, send_alert

    if "stale" not in config.alerts.events:
        log.info("alerts.events does not name stale: no alert sent")
        return
    alert = stale_alert(lines, host=hostname(), scope=config.scope)
    for problem in send_alert(alert_urls(config.alerts), alert):
        print(f"{PROGRAM}: warning: alert not sent: {problem}", file=sys.stderr)


def cmd_status(context: Context) -> int:
    from virt_dup.actions.status import CHECK_OK, refresh_metrics, status
    from virt_dup.systemd.manager import SystemdUnavailable

    arguments = context.arguments
    config = context.config
    try:
        manager: ServiceManager | None = ServiceManager.connect(config.scope)
    except SystemdUnavailable as error:
        log.debug("%s", error)  # no next runs: "-"
        manager = None
    try:
        report = status(
            config, context.hypervisor, arguments.domain, manager=manager, backend=arguments.backend
        )
    finally:
        if manager is not None:
            manager.close()
    if arguments.check and arguments.domain is None:
        refresh_metrics(config, context.hypervisor, report.jobs)
    code, lines = report.check()
    if arguments.alert:
        if not arguments.check:
            raise UsageError("--alert goes with --check")
        if code != CHECK_OK:
            alert_stale(config, lines)
    if arguments.json:
        output.print_json("status", report.as_json())
    elif arguments.check:
        for line in lines:
            print(line)
    else:
        output.print_status(report.jobs, backend=arguments.backend)
        for line in report.unknown:
            print(f"{PROGRAM}: warning: {line}", file=sys.stderr)
    return code if arguments.check else EXIT_OK


def cmd_check_config(context: Context) -> int:
    from virt_dup.actions.check_config import check_config, config_report

    arguments = context.arguments
    connect = (lambda: context.hypervisor) if arguments.connect else None
    report = check_config(context.config, connect, syntax_only=arguments.syntax_only)
    if arguments.json:
        output.print_json("check-config", config_report(context.config, report))
    else:
        for line in report.lines:
            print(line)
    for problem in report.problems:
        print(f"{PROGRAM}: error: {problem}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_doctor(context: Context) -> int:
    from virt_dup.actions.doctor import PROBLEM, doctor, has_problems

    config = context.config
    findings = doctor(
        config, lambda: context.hypervisor, lambda: ServiceManager.connect(config.scope)
    )
    if context.arguments.json:
        output.print_json(
            "doctor",
            {
                "problems": sum(finding.severity == PROBLEM for finding in findings),
                "findings": [finding.as_json() for finding in findings],
            },
        )
    else:
        for finding in findings:
            print(finding.line())
    return EXIT_FAILED if has_problems(findings) else EXIT_OK


def cmd_schedule_explain(context: Context) -> int:
    from virt_dup.actions.schedule import explain

    explanation = explain(
        context.arguments.expression, context.arguments.count, datetime.now(UTC).astimezone()
    )
    if context.arguments.json:
        output.print_json("schedule-explain", explanation.as_json())
    else:
        for line in explanation.lines():
            print(line)
    return EXIT_OK


def cmd_install_units(context: Context) -> int:
    arguments = context.arguments
    settings = InstallSettings.from_config(
        context.config,
        scope=arguments.scope,
        unit_directory=arguments.unit_dir,
        generator_directory=arguments.generator_dir,
        root=arguments.root,
    )
    installed = unit_actions.install_units(
        context.config,
        settings,
        dry_run=arguments.dry_run,
        root=arguments.root,
        say=(lambda _line: None) if arguments.json else print,
        notice=lambda line: print(f"{PROGRAM}: notice: {line}", file=sys.stderr),
    )
    if arguments.json:
        output.print_json("install-units", installed.as_json())
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
    if context.arguments.json:
        output.print_json("sync-timers", report.as_json())
        return EXIT_FAILED if report.not_active else EXIT_OK
    for line in report.lines():
        print(line)
    print(
        f"timers: {len(report.started)} started, {len(report.removed)} stopped, "
        f"{len(report.paused)} paused, {report.unchanged} unchanged"
    )
    return EXIT_FAILED if report.not_active else EXIT_OK


def cmd_run(context: Context) -> int:
    from virt_dup.actions.run import plan_job, run_job

    arguments = context.arguments
    if (arguments.job is None) == (arguments.domain is None):
        raise UsageError("give either JOB_UUID or --domain DOMAIN")
    hypervisor = context.local_hypervisor
    if arguments.domain is not None:
        domain = hypervisor.domain(arguments.domain)
        job_ids = [job.uuid for job in hypervisor.jobs(domain)]
        if not job_ids:
            raise NotFoundError(f"domain {domain.name()} has no virt-dup jobs")
    else:
        job_ids = [arguments.job]
    if arguments.dry_run:
        plans = [
            plan_job(context.config, hypervisor, job_id, force_full=arguments.full)
            for job_id in job_ids
        ]
        if arguments.json:
            output.print_json("run-plan", {"plans": [plan.as_json() for plan in plans]})
        else:
            for plan in plans:
                for line in plan.lines():
                    print(line)
        return EXIT_OK
    results = []
    for job_id in job_ids:
        progress, end_progress = output.backup_progress()
        try:
            result = run_job(
                context.config,
                hypervisor,
                job_id,
                force_full=arguments.full,
                report=output.progress_reporter() if arguments.json else print,
                progress=progress,
            )
        finally:
            end_progress()
        results.append(result)
        if not arguments.json:
            output.print_summary(result)
    if arguments.json:
        output.print_json("run", {"runs": [result.as_json() for result in results]})
    return EXIT_OK


def cmd_recover(context: Context) -> int:
    from virt_dup.actions.recover import recover_all
    from virt_dup.backup.state import StateStore

    done, errors = recover_all(context.hypervisor, StateStore.of(context.config))
    # Each domain's recovery has a journal record saying the same.
    output.print_lines([f"recovered: {line}" for line in done])
    for line in errors:
        print(f"{PROGRAM}: error: {line}", file=sys.stderr)
    if not done and not errors:
        print("nothing to recover")
    return EXIT_FAILED if errors else EXIT_OK


def cmd_alert(context: Context) -> int:
    from virt_dup.actions.alert import alert_failure, config_failure
    from virt_dup.alerts.message import parse_unit

    unit = context.arguments.unit
    parse_unit(unit)  # a usage error before anything else
    try:
        config = context.config
    except ConfigError as error:
        config_failure(unit, error)
        print(f"{PROGRAM}: warning: alert not sent: {error}", file=sys.stderr)
        return EXIT_OK
    result = alert_failure(config, unit)
    for shown in result.sent:
        print(f"alert sent to {shown}")
    if not result.sent and not result.problems:
        print("no alerts configured (alerts.urls in virt-dup.yml): the journal has the failure")
    return EXIT_OK


def cmd_backups(context: Context) -> int:
    from virt_dup.actions.backups import list_jobs_backups

    arguments = context.arguments
    listings = list_jobs_backups(
        context.config,
        lambda: context.hypervisor,
        arguments.domain,
        arguments.backend,
        report=output.progress_reporter(),
    )
    output.print_backups(listings, arguments.json)
    if not any(listing.backups for listing in listings):
        return EXIT_NO_BACKUPS
    return EXIT_OK


def cmd_restore(context: Context) -> int:
    from virt_dup.actions.restore import (
        RestoreRequest,
        format_notices,
        plan_restore_request,
        restore,
    )

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
    report = output.progress_reporter()
    if arguments.dry_run:
        planned = plan_restore_request(context.config, lambda: context.hypervisor, request, report)
        if arguments.json:
            output.print_json("restore-plan", planned.as_json())
        else:
            for line in planned.lines():
                print(line)
        return EXIT_OK
    progress, progress_lines, end_progress = output.restore_progress()
    try:
        result = restore(
            context.config, lambda: context.hypervisor, request, progress_lines, progress
        )
    finally:
        end_progress()
    for line in format_notices(result):
        print(f"{PROGRAM}: notice: {line}", file=sys.stderr)
    if arguments.json:
        output.print_json("restore", result.as_json())
    else:
        output.print_summary(result)
    if result.defined:
        sync_after_job_change(context)
    return EXIT_OK


def cmd_verify(context: Context) -> int:
    from virt_dup.actions.verify import verify

    arguments = context.arguments
    result = verify(
        context.config,
        lambda: context.hypervisor,
        arguments.job,
        arguments.backup_id,
        backend_url=arguments.backend,
        scratch=arguments.scratch_dir,
        report=output.progress_reporter(),
    )
    for warning in result.warnings:
        print(f"{PROGRAM}: warning: {warning}", file=sys.stderr)
    if arguments.json:
        output.print_json("verify", result.as_json())
    else:
        output.print_summary(result)
    return EXIT_OK


def cmd_migrate_backend(context: Context) -> int:
    from virt_dup.actions.migrate import migrate_backend

    arguments = context.arguments
    result = migrate_backend(
        context.config,
        context.hypervisor,
        arguments.job,
        arguments.to,
        keep_source=arguments.keep_source,
        report=lambda line: log.info("%s", line),
    )
    if arguments.json:
        output.print_json("migrate-backend", result.as_json())
    else:
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


#: Every verb: how its arguments are declared, and what runs it.
VERBS: dict[str, cli_arguments.Verb] = {
    "add-job": (cli_arguments.add_add_job, cmd_add_job),
    "edit-job": (cli_arguments.add_edit_job, cmd_edit_job),
    "remove-job": (cli_arguments.add_remove_job, cmd_remove_job),
    "remove-all-jobs": (cli_arguments.add_remove_all_jobs, cmd_remove_all_jobs),
    "list-jobs": (cli_arguments.add_list_jobs, cmd_list_jobs),
    "status": (cli_arguments.add_status, cmd_status),
    "check-config": (cli_arguments.add_check_config, cmd_check_config),
    "doctor": (cli_arguments.add_doctor, cmd_doctor),
    "init": (cli_arguments.add_init, cli_keys.cmd_init),
    "export-key": (cli_arguments.add_export_key, cli_keys.cmd_export_key),
    "schedule": (cli_arguments.add_schedule, cmd_schedule_explain),
    "install-units": (cli_arguments.add_install_units, cmd_install_units),
    "sync-timers": (cli_arguments.add_sync_timers, cmd_sync_timers),
    "run": (cli_arguments.add_run, cmd_run),
    "recover": (cli_arguments.add_recover, cmd_recover),
    "alert": (cli_arguments.add_alert, cmd_alert),
    "backups": (cli_arguments.add_backups, cmd_backups),
    "restore": (cli_arguments.add_restore, cmd_restore),
    "verify": (cli_arguments.add_verify, cmd_verify),
    "migrate-backend": (cli_arguments.add_migrate_backend, cmd_migrate_backend),
    "help": (cli_arguments.add_help, cmd_help),
}


def log_level(arguments: argparse.Namespace) -> int:
    """The logging level the global options ask for: INFO, one step down per
    ``-v`` (DEBUG), up per ``-q`` (WARNING, ERROR); ``--debug`` is DEBUG."""
    if arguments.debug:
        return logging.DEBUG
    steps: int = arguments.quiet - arguments.verbose
    return min(max(logging.INFO + 10 * steps, logging.DEBUG), logging.ERROR)


def main(argv: Sequence[str] | None = None, hypervisor: Hypervisor | None = None) -> int:
    """Run virt-dup; returns the exit code.  ``hypervisor`` may be injected."""
    parser, subparsers = cli_arguments.build_parser(VERBS)
    argcomplete.autocomplete(parser)
    # Before parsing (a usage error is shown with --debug's traceback too);
    # the parsed options then set the level.
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format=f"{PROGRAM}: %(message)s")
    logging.getLogger().setLevel(logging.DEBUG if debug else logging.INFO)
    # What virt-dup and its children (duplicity's cache, gpg, qemu-img) create
    # is root's alone, as under the units' UMask=0077; modes that others need
    # (units, restored image directories) are set explicitly.
    umask = os.umask(0o077)
    try:
        return _main(parser, subparsers, argv, hypervisor, debug)
    finally:
        os.umask(umask)


def _main(
    parser: cli_arguments.ArgumentParser,
    subparsers: cli_arguments.Subparsers,
    argv: Sequence[str] | None,
    hypervisor: Hypervisor | None,
    debug: bool,
) -> int:
    try:
        arguments = parser.parse_args(argv)
        debug = arguments.debug
        logging.getLogger().setLevel(log_level(arguments))
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
            context.close()
    except VirtDupError as error:
        if debug:
            traceback.print_exc()
        recorded = getattr(error, "result", None)  # a run's or verification's outcome
        if not (isinstance(recorded, Outcome) and recorded.in_journal_of(sys.stderr)):
            # (under systemd its journal record already says it)
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
