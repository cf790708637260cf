"""``virt-dup check-config``: virt-dup.yml as virt-dup reads it, and proof that it works.

Loading the file already validated it (:mod:`virt_dup.config.load`).  Beyond
that (unless ``syntax_only``), every part a backup needs is tried for real:

* duplicity 3.x, gpg 2.1+ and qemu-img 2.10+ are installed;
* each key the backups are encrypted to is in the GnuPG home and encrypts
  (as duplicity encrypts); the example's placeholder key is named as such;
* the passphrase (``passphrase_file``) unlocks each secret key here: a real
  decryption, and a signature with ``sign_key``;
* each backend is reachable and writable: a ``file://`` directory by
  writing a file into it, any other through duplicity's own backend (list,
  write, delete), bounded in time;
* with a connection, that libvirt answers.

Each problem is one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virt_dup.config.load import PLACEHOLDER_KEY, Config, read_passphrase
from virt_dup.config.options import masked_url
from virt_dup.duplicity import gpg
from virt_dup.duplicity.gpg import Key, KeyProblem, Keyring
from virt_dup.duplicity.listing import file_url_path, probe_backend
from virt_dup.duplicity.runner import Duplicity
from virt_dup.errors import ConfigError, VirtDupError
from virt_dup.execute import CommandFailed, meaningful_lines
from virt_dup.images.qemu_img import run_qemu_img
from virt_dup.libvirt.connection import Hypervisor

#: The oldest qemu-img virt-dup works with: ``-U`` (read an image a running QEMU holds).
QEMU_IMG_MINIMUM = (2, 10)


@dataclass
class CheckReport:
    """``lines``: what the configuration says and what was proven; ``problems``:
    one line each, with the fix."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: libvirt's library version, when asked to connect.
    libvirt_version: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def check_config(
    config: Config,
    hypervisor: Callable[[], Hypervisor] | None = None,
    *,
    syntax_only: bool = False,
    duplicity: Duplicity | None = None,
) -> CheckReport:
    """What ``config`` sets and, unless ``syntax_only``, whether it works (see the
    module docstring).  With ``hypervisor``, connects to libvirt too (raises
    :class:`~virt_dup.errors.LibvirtError` when it does not answer)."""
    backends = ", ".join(f"{name}={masked_url(url)}" for name, url in config.backends.items())
    report = CheckReport(
        lines=[
            f"{config.path}: "
            + ("ok" if config.path.exists() else "not present, using built-in defaults"),
            f"scope: {config.scope}, libvirt: {config.libvirt_uri}",
            f"backends: {backends or '(none)'}",
            f"encryption keys: {', '.join(config.encryption.keys) or '(none)'}",
        ]
    )
    if not syntax_only:
        check_programs(report, duplicity or Duplicity())
        keys = check_keys(config, report)
        check_passphrase(config, keys, report)
        check_backends(config, report)
    if hypervisor is not None:
        major, minor = hypervisor().library_version()
        report.libvirt_version = f"{major}.{minor}"
        report.lines.append(f"libvirt reachable (library {report.libvirt_version})")
    return report


def config_report(config: Config, report: CheckReport) -> dict[str, Any]:
    """What ``check-config --json`` prints: what ``config`` sets (backend URLs
    masked), what was proven (``report.lines``) and each problem."""
    return {
        "config": str(config.path),
        "config_exists": config.path.exists(),
        "notices": list(config.notices),
        "scope": config.scope,
        "libvirt_uri": config.libvirt_uri,
        "backends": {name: masked_url(url) for name, url in config.backends.items()},
        "encryption_keys": list(config.encryption.keys),
        "libvirt": (
            None
            if report.libvirt_version is None
            else {"reachable": True, "library_version": report.libvirt_version}
        ),
        "proven": list(report.lines),
        "problems": list(report.problems),
        "ok": report.ok,
    }


# -- programs ------------------------------------------------------------------------
def check_programs(report: CheckReport, duplicity: Duplicity) -> None:
    """duplicity, gpg and qemu-img are there, in versions virt-dup works with."""
    try:
        report.lines.append(f"duplicity {duplicity.version()} ({duplicity.program})")
    except VirtDupError as error:
        report.problems.append(f"{error}")
    try:
        report.lines.append(f"gpg {'.'.join(map(str, gpg.version()))}")
    except VirtDupError as error:
        report.problems.append(f"{error}")
    try:
        output = run_qemu_img("--version", timeout_s=60)
    except VirtDupError as error:
        report.problems.append(f"{error}")
        return
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", output)
    if match is None:
        report.problems.append(f"cannot tell the qemu-img version from {output[:60]!r}")
    elif (int(match.group(1)), int(match.group(2))) < QEMU_IMG_MINIMUM:
        report.problems.append(
            f"qemu-img {match.group(0).split()[-1]} is too old (need "
            f"{'.'.join(map(str, QEMU_IMG_MINIMUM))} or later: package qemu-utils)"
        )
    else:
        report.lines.append(f"qemu-img {match.group(0).split()[-1]}")


# -- keys ----------------------------------------------------------------------------
def configured_keys(config: Config) -> list[tuple[str, str]]:
    """(where, key id) of every key backups are encrypted to: ``encryption.keys``
    and ``defaults.encryption_keys``, each once."""
    found: list[tuple[str, str]] = []
    for where, keys in (
        ("encryption.keys", config.encryption.keys),
        ("defaults.encryption_keys", config.defaults.encryption_keys or ()),
    ):
        for key in keys:
            if key not in (known for _where, known in found):
                found.append((where, key))
    return found


def check_keys(config: Config, report: CheckReport) -> list[Key]:
    """Each configured key is in the GnuPG home and encrypts; returns the keys found."""
    home = config.gnupg_directory
    keyring = Keyring(home)
    wanted = configured_keys(config)
    if not wanted:
        if (config.defaults.encryption or "gpg") == "gpg":
            report.problems.append(
                f"{config.path}: encryption.keys: no key is configured, so no backup can be "
                "made (encryption: gpg): run 'virt-dup init' to make one"
            )
        return []
    try:
        available = keyring.keys()
    except VirtDupError as error:
        report.problems.append(f"GnuPG home {home}: cannot list its keys: {error}")
        return []
    found: list[Key] = []
    for where, key_id in wanted:
        if key_id == PLACEHOLDER_KEY:
            report.problems.append(
                f"{config.path}: {where}: {key_id} is the placeholder of the example "
                "configuration, not a key: run 'virt-dup init' to make a key and write "
                "its fingerprint there"
            )
            continue
        key = next((key for key in available if key.matches(key_id)), None)
        problem = _key_problem(keyring, key, key_id)
        if problem is not None:
            report.problems.append(f"{config.path}: {where}: key {key_id} {problem}")
            continue
        assert key is not None
        found.append(key)
        secret = ", its secret key too" if key.has_secret else ", public key only"
        report.lines.append(f"key {key.fingerprint}: in {home}, encrypts{secret}")
    return found


def _key_problem(keyring: Keyring, key: Key | None, key_id: str) -> str | None:
    """Why backups cannot be encrypted to ``key`` (None: they can: a probe did)."""
    if key is None:
        return (
            f"is not in the GnuPG home {keyring.home}: run 'virt-dup init' (a new key) or "
            "'virt-dup init --import FILE' (a file of 'virt-dup export-key')"
        )
    if key.problem is not None:
        return f"is {key.problem} in {keyring.home}: make a new one with 'virt-dup init --force'"
    if not key.can_encrypt:
        return (
            f"has no encryption subkey in {keyring.home}: make a key with 'virt-dup init "
            "--force' (gpg --quick-gen-key ... default default never)"
        )
    try:
        keyring.encrypt_probe(key.fingerprint)
    except CommandFailed as failure:
        reason = "; ".join(meaningful_lines(failure.stderr_tail)) or str(failure)
        return f"cannot encrypt: {reason}"
    return None


# -- passphrase ----------------------------------------------------------------------
def check_passphrase(config: Config, keys: list[Key], report: CheckReport) -> None:
    """The passphrase unlocks every secret key here: decrypting (restores) and, for
    ``sign_key``, signing (signed backups)."""
    where = config.encryption.passphrase_file
    try:
        passphrase = read_passphrase(config)
    except VirtDupError as error:
        report.problems.append(str(error))
        return
    keyring = Keyring(config.gnupg_directory)
    secret = [key for key in keys if key.has_secret]
    for key in secret:
        try:
            keyring.decrypt_probe(keyring.encrypt_probe(key.fingerprint), passphrase or "")
        except KeyProblem as problem:
            report.problems.append(_passphrase_problem(config, key.fingerprint, str(problem)))
            continue
        except VirtDupError as error:
            report.problems.append(f"key {key.fingerprint}: cannot decrypt: {error}")
            continue
        report.lines.append(
            f"key {key.fingerprint}: decrypts"
            + (f" with the passphrase of {where}" if where else " (no passphrase)")
        )
    if config.encryption.sign_key:
        try:
            keyring.sign_probe(config.encryption.sign_key, passphrase or "")
            report.lines.append(f"sign key {config.encryption.sign_key}: signs")
        except KeyProblem as problem:
            report.problems.append(
                _passphrase_problem(config, config.encryption.sign_key, str(problem))
            )
    if where is not None and not secret and not config.encryption.sign_key:
        report.lines.append(
            f"{where}: no secret key here to try it on (restores on this host need one)"
        )


def _passphrase_problem(config: Config, key_id: str, problem: str) -> str:
    where = config.encryption.passphrase_file
    if where is None:
        return (
            f"key {key_id}: {problem}: its secret key has a passphrase, and "
            f"{config.path} names no encryption.passphrase_file to read it from"
        )
    return f"{where}: key {key_id}: {problem}: put that key's passphrase in {where}"


# -- backends ------------------------------------------------------------------------
def configured_backends(config: Config) -> list[tuple[str, str]]:
    """(name, URL) of every named backend and of every URL in ``defaults.backends``."""
    found = list(config.backends.items())
    for backend in config.defaults.backends or ():
        if "://" in backend and backend not in (url for _name, url in found):
            found.append((backend, backend))
    return found


def check_backends(config: Config, report: CheckReport) -> None:
    """Each backend is reachable and writable."""
    for name, url in configured_backends(config):
        shown = masked_url(url)
        label = f"backend {shown}" if name == url else f"backend {name} ({shown})"
        try:
            password = config.backend_settings_of(url).password(f"{config.path}: backends.{name}")
        except ConfigError as error:
            report.problems.append(f"{label}: {error}")
            continue
        problem = _backend_problem(url, password)
        if problem is None:
            report.lines.append(f"{label}: reachable and writable")
        else:
            report.problems.append(f"{label}: {problem}")


def _backend_problem(url: str, password: str | None = None) -> str | None:
    directory = file_url_path(url)
    if directory is not None:
        return _directory_problem(directory)
    try:
        if password is None:
            probe_backend(url)
        else:
            probe_backend(url, {"FTP_PASSWORD": password}, (password,))
    except CommandFailed as failure:
        if failure.limit_reached:
            return f"duplicity {failure.limit_reached} reaching it: is it up and reachable?"
        reason = "; ".join(meaningful_lines(failure.stderr_tail, 1)) or str(failure.returncode)
        return f"duplicity cannot list, write and delete there: {reason}"
    except VirtDupError as error:
        return str(error)
    return None


def _directory_problem(directory: Path) -> str | None:
    if not directory.is_dir():
        return (
            f"{directory} does not exist: 'virt-dup install-units' makes it, or "
            f"mkdir -p -m 700 {directory}"
        )
    try:
        descriptor, name = tempfile.mkstemp(prefix=".virt-dup-check-", dir=directory)
        os.close(descriptor)
        os.unlink(name)
    except OSError as error:
        return f"cannot write to {directory}: {error.strerror}"
    return None
