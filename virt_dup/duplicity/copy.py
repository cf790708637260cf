"""A job's backup sets copied from one backend to another, byte for byte.

A job with several destinations is backed up once, to the first; the others
get the same files, copied through duplicity's own backend layer (any
scheme to any scheme), run by duplicity's interpreter as listings are
(:mod:`.listing`).  Why not duplicity's own ways: ``multi://`` in mirror
mode either fails the whole backup when one store is down (``onfail=abort``)
or leaves a set without volumes on it that nothing ever repairs
(``onfail=continue``), and it deletes on every store alike (no retention per
destination); duplicity 3.2.1 has no ``replicate``.  Copying the files
keeps what duplicity wrote (encrypted and signed by the job's keys: a copy
needs no passphrase, and ``restore.require_signature`` holds on every
destination), and a destination that was down catches up at the next run.

A set is copied in order: volumes, signatures, then its manifest, which is
read back and compared; a set counts as present on the target only with its
manifest.  So an interrupted copy leaves a set without a manifest, which
duplicity ignores and the next copy replaces.  An incremental is copied only
onto the set it continues, and never beside another incremental that continues
it already: a target never gets a chain with a hole or a fork.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from virt_dup.config.options import split_password
from virt_dup.duplicity.collection import BackupSet, Chain, Collection
from virt_dup.duplicity.listing import (
    SET_FILE,
    duplicity_interpreter,
    file_url_path,
    list_backend,
)
from virt_dup.duplicity.target import Target, environment, secrets
from virt_dup.duplicity.times import format_time, parse_time
from virt_dup.errors import CommandError
from virt_dup.execute import CommandFailed, meaningful_lines
from virt_dup.execute import run as run_command

#: How long copying one job's new sets may take.
COPY_TIMEOUT_S = 6 * 3600.0


@dataclass
class BackupSetFiles:
    """The files of one backup set on a backend."""

    #: None for a full, else the time of the set it continues.
    start: str | None
    end: str
    volumes: list[tuple[int, str]] = field(default_factory=list)
    signatures: list[str] = field(default_factory=list)
    manifest: str | None = None

    @property
    def key(self) -> tuple[str | None, str]:
        return (self.start, self.end)

    def in_copy_order(self) -> list[str]:
        """Volumes, signatures, the manifest last (it makes the set whole)."""
        names = [name for _number, name in sorted(self.volumes)] + sorted(self.signatures)
        return names + ([self.manifest] if self.manifest else [])

    def names(self) -> list[str]:
        return self.in_copy_order()


def backup_sets(names: Sequence[str]) -> dict[tuple[str | None, str], BackupSetFiles]:
    """The backup sets the file names of a collection make up, by (start, end)."""
    sets: dict[tuple[str | None, str], BackupSetFiles] = {}
    for name in names:
        match = SET_FILE.match(name)
        if not match or match["part"]:
            continue
        start, end = (None, match["time"]) if match["full"] else (match["start"], match["end"])
        found = sets.setdefault((start, end), BackupSetFiles(start, end))
        if match["volume"]:
            found.volumes.append((int(match["volume"]), name))
        elif match["kind"] == "manifest":
            found.manifest = name
        else:
            found.signatures.append(name)
    return sets


def collection_of(names: Sequence[str]) -> Collection:
    """The chains the whole sets among ``names`` make (what retention decides on),
    without asking duplicity: a mirror's retention runs duplicity only when it
    would delete something."""
    chains: list[list[BackupSetFiles]] = []
    for found in sorted(backup_sets(names).values(), key=lambda found: found.end):
        if found.manifest is None:
            continue
        if found.start is None:
            chains.append([found])
        elif chains and chains[-1][-1].end == found.start:
            chains[-1].append(found)
    return Collection(
        tuple(
            Chain(
                tuple(
                    BackupSet(
                        "full" if found.start is None else "incremental",
                        parse_time(found.end),
                        len(found.volumes),
                        found.manifest is not None and found.manifest.endswith(".gpg"),
                    )
                    for found in chain
                ),
                complete=True,
            )
            for chain in chains
        )
    )


@dataclass(frozen=True)
class CopyPlan:
    """What a copy does: files to delete first (sets the target has only in
    part), then the sets to copy, oldest first."""

    delete: tuple[str, ...] = ()
    copy: tuple[BackupSetFiles, ...] = ()
    #: Sets of the source that cannot be copied: the set they continue is
    #: missing on the target (and no longer on the source).
    skipped: tuple[BackupSetFiles, ...] = ()

    @property
    def files(self) -> list[str]:
        return [name for backup_set in self.copy for name in backup_set.in_copy_order()]


def copy_plan(
    source: Sequence[str], target: Sequence[str], *, newer_only: bool = False
) -> CopyPlan:
    """How to make ``target`` (its file names) hold every whole set of ``source``
    that can continue a chain there; with ``newer_only``, only those newer than
    everything whole on ``target`` (what it missed, not what its retention
    removed).  Pure."""
    source_sets = backup_sets(source)
    target_sets = backup_sets(target)
    whole_on_target = {key for key, found in target_sets.items() if found.manifest}
    newest = max((end for _start, end in whole_on_target), default="")
    if newer_only:
        source_sets = {key: found for key, found in source_sets.items() if key[1] > newest}
    ends = {end for _start, end in whole_on_target}
    continued = {start for start, _end in whole_on_target if start is not None}
    delete: list[str] = []
    copy: list[BackupSetFiles] = []
    skipped: list[BackupSetFiles] = []
    for key, found in sorted(source_sets.items(), key=lambda item: item[0][1]):
        if found.manifest is None or key in whole_on_target:
            continue  # not whole on the source (a backup in progress), or already there
        if found.start is not None and (found.start not in ends or found.start in continued):
            # It would continue nothing there, or fork a chain that another
            # incremental continues already (made while this one was unreachable).
            skipped.append(found)
            continue
        if key in target_sets:
            delete.extend(target_sets[key].names())  # an interrupted copy's part
        copy.append(found)
        ends.add(found.end)
        if found.start is not None:
            continued.add(found.start)
    return CopyPlan(tuple(delete), tuple(copy), tuple(skipped))


# Run by duplicity's interpreter: stdin carries the names and both backends'
# passwords (never argv); one JSON line per file copied on stdout.
_COPY_SCRIPT = """
import filecmp, json, os, sys, tempfile
from duplicity import backend, config, log, path
log.setup()
request = json.load(sys.stdin)
for name, value in request["network"].items():
    setattr(config, name, value)
backend.import_backends()

def open_backend(url, password):
    os.environ.pop("FTP_PASSWORD", None)
    if password is not None:
        os.environ["FTP_PASSWORD"] = password
    return backend.get_backend(url)

source = open_backend(request["source"], request["source_password"])
target = open_backend(request["target"], request["target_password"])
if request["delete"]:
    target.delete(request["delete"])
with tempfile.TemporaryDirectory(
    prefix="duplicity-copy-", suffix="-tempdir", dir=request["tempdir"]
) as scratch:
    for name in request["copy"]:
        local = path.Path(os.path.join(scratch, "file"))
        source.get(name, local)
        size = os.path.getsize(local.name)
        target.put(local, name)
        if ".manifest" in name:
            back = path.Path(os.path.join(scratch, "back"))
            target.get(name, back)
            if not filecmp.cmp(local.name, back.name, shallow=False):
                raise SystemExit(f"{name} reads back different from {request['target_shown']}")
            os.unlink(back.name)
        os.unlink(local.name)
        print(json.dumps({"copied": name, "bytes": size}), flush=True)
"""


@dataclass(frozen=True)
class CopyResult:
    sets: int
    bytes: int
    #: The target's collection after the copy.
    collection: Collection
    skipped: tuple[str, ...] = ()


def copy_collection(
    source: Target, target: Target, tempdir: Path, *, newer_only: bool = False
) -> CopyResult:
    """Copy every whole set of ``source`` that ``target`` lacks (see the module).

    Raises :class:`CommandError` naming the (masked) target when a backend
    cannot be listed, read or written; what was copied before stays and
    counts at the next copy.
    """
    source_names = listing(source)
    target_names = list(listing(target))
    plan = copy_plan(list(source_names), target_names, newer_only=newer_only)
    if plan.copy or plan.delete:
        tempdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # What a killed copy left (the caller holds the domain's lock: no copy
        # of this job runs now).
        for leftover in tempdir.glob("duplicity-copy-*-tempdir"):
            shutil.rmtree(leftover, ignore_errors=True)
        request = {
            "source": _plain(source),
            "target": _plain(target),
            "target_shown": target.display_url,
            "source_password": environment(source).get("FTP_PASSWORD"),
            "target_password": environment(target).get("FTP_PASSWORD"),
            "delete": list(plan.delete),
            "copy": plan.files,
            "network": _network(target),
            "tempdir": str(tempdir),
        }
        try:
            completed = run_command(
                [*duplicity_interpreter(), "-c", _COPY_SCRIPT],
                environment=_copy_environment(source),
                secrets=[*secrets(source), *secrets(target)],
                timeout=COPY_TIMEOUT_S,
                input=json.dumps(request),
            )
        except CommandFailed as failure:
            raise CommandError(f"copying to {target.display_url}: {_reason(failure)}") from None
        copied = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
        total = sum(int(entry["bytes"]) for entry in copied)
        check_sizes(source_names, listing(target), plan.files, target.display_url)
    else:
        total = 0
    deleted = set(plan.delete)
    after = [name for name in target_names if name not in deleted] + plan.files
    return CopyResult(
        len(plan.copy), total, collection_of(after), tuple(found.end for found in plan.skipped)
    )


def _network(target: Target) -> dict[str, int]:
    """duplicity's settings for reaching ``target``, as its own runs get them
    (``backend_retries``, ``backend_retry_delay``, ``backend_timeout``)."""
    settings = {
        "num_retries": target.num_retries,
        "backend_retry_delay": target.retry_delay,
        "timeout": target.network_timeout,
    }
    return {name: value for name, value in settings.items() if value is not None}


def check_sizes(
    source: Mapping[str, int | None],
    target: Mapping[str, int | None],
    names: Sequence[str],
    shown: str,
) -> None:
    """Every copied file is on the target, as large as on the source where both
    backends say sizes (the manifest was read back already; duplicity checks each
    volume's hash against it at a restore).  Raises :class:`CommandError`."""
    for name in names:
        if name not in target:
            raise CommandError(f"copying to {shown}: {name} is not there after the copy")
        expected, found = source.get(name), target[name]
        if expected is not None and found is not None and expected != found:
            raise CommandError(
                f"copying to {shown}: {name} has {found} bytes there, {expected} here"
            )


def listing(target: Target) -> dict[str, int | None]:
    """The names (and sizes, where the backend says) in ``target``'s collection;
    raises :class:`CommandError` (one line)."""
    try:
        return list_backend(target.url, environment(target), secrets(target))
    except CommandFailed as failure:
        raise CommandError(f"cannot list {target.display_url}: {_reason(failure)}") from None


def _reason(failure: CommandFailed) -> str:
    """The last thing duplicity's backend said (its exception), in one line."""
    if failure.limit_reached:
        return f"{failure.limit_reached}: is it up and reachable?"
    return "; ".join(meaningful_lines(failure.stderr_tail, 1)) or f"exit {failure.returncode}"


def _plain(target: Target) -> str:
    return split_password(target.url)[0]


def _copy_environment(source: Target) -> Mapping[str, str | None]:
    variables: dict[str, str | None] = dict(environment(source))
    # Each backend's password comes on stdin; a copy decrypts nothing.
    variables.update(FTP_PASSWORD=None, PASSPHRASE=None, SIGN_PASSPHRASE=None)
    return variables


_DELETE_SCRIPT = """
import json, os, sys
from duplicity import backend, config, log
log.setup()
request = json.load(sys.stdin)
for name, value in request["network"].items():
    setattr(config, name, value)
backend.import_backends()
os.environ.pop("FTP_PASSWORD", None)
if request["password"] is not None:
    os.environ["FTP_PASSWORD"] = request["password"]
backend.get_backend(request["url"]).delete(request["names"])
"""


def delete_collection(target: Target) -> int:
    """Delete the backup files of ``target``'s collection (its volumes, manifests
    and signatures: nothing else there) through duplicity's backend; returns how
    many.  A ``file://`` collection's directory goes too when that leaves it
    empty.  Raises :class:`CommandError`."""
    names = [name for name in listing(target) if SET_FILE.match(name)]
    delete_files(target, names)
    directory = file_url_path(target.url)
    if directory is not None:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when empty
    return len(names)


def delete_files(target: Target, names: Sequence[str]) -> None:
    """Delete backup files (names duplicity gave them) of ``target``'s collection."""
    names = [name for name in names if SET_FILE.match(name)]
    if not names:
        return
    try:
        run_command(
            [*duplicity_interpreter(), "-c", _DELETE_SCRIPT],
            environment=_copy_environment(target),
            secrets=secrets(target),
            timeout=COPY_TIMEOUT_S,
            input=json.dumps(
                {
                    "url": _plain(target),
                    "password": environment(target).get("FTP_PASSWORD"),
                    "names": names,
                    "network": _network(target),
                }
            ),
        )
    except CommandFailed as failure:
        raise CommandError(f"deleting from {target.display_url}: {_reason(failure)}") from None


def prune_changes(changes: Target, main: Collection, keep_incrementals: int | None) -> int:
    """Delete the changed-block sets (each a full of the ``changes`` collection) made
    before the oldest chain of ``main`` that keeps its incrementals: their base
    is gone, or their chain keeps no incrementals.  Returns how many sets."""
    if not main.chains:
        return 0
    kept = main.chains[-keep_incrementals:] if keep_incrementals else main.chains
    cutoff = format_time(kept[0].start_time)
    doomed = [found for found in backup_sets(list(listing(changes))).values() if found.end < cutoff]
    delete_files(changes, [name for found in doomed for name in found.names()])
    return len(doomed)
