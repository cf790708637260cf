"""``virt-dup init`` and ``virt-dup export-key``: the key backups are encrypted to.

``init`` makes (or, with ``--import``, takes in) the GPG key in virt-dup's
own GnuPG home, sets up the passphrase file, and writes the fingerprint, the
home and the passphrase file into virt-dup.yml.  Everything is checked
before anything is written; a second ``init`` says what is set up and
changes nothing.  ``export-key`` writes the secret key out, so that a host
that has lost everything but its backends can restore
(``virt-dup init --import FILE`` there).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from virt_dup.config.edit import update_encryption, with_encryption
from virt_dup.config.load import PLACEHOLDER_KEY, Config, read_passphrase
from virt_dup.duplicity.gpg import Key, KeyProblem, Keyring
from virt_dup.errors import CommandError, ConfigError, UsageError, VirtDupError
from virt_dup.execute import CommandFailed

#: Largest key file ``init --import`` reads (an RSA-3072 key with subkey: ~7 KB armored).
MAX_KEY_FILE = 1 << 20
#: The passphrase file ``init`` creates, next to virt-dup.yml.
PASSPHRASE_FILE_NAME = "gpg-passphrase"

#: Asks for a passphrase on the terminal (``confirm``: twice, for a new one);
#: None when there is no terminal to ask.
Ask = Callable[[bool], str]


@dataclass(frozen=True)
class InitRequest:
    """What ``init`` was asked for.

    ``import_file``: an export-key file to take the key from (else a new key
    is made); ``passphrase_file``: where the passphrase is (it must exist, be
    root's alone, and becomes ``encryption.passphrase_file``); ``user_id`` of a
    new key; ``force``: replace the keys virt-dup.yml names already.
    """

    import_file: Path | None = None
    passphrase_file: Path | None = None
    user_id: str | None = None
    force: bool = False


@dataclass(frozen=True)
class InitResult:
    """What ``init`` found or did: ``created`` (a new key was made),
    ``imported``, ``changed`` (virt-dup.yml or the passphrase file was written)."""

    config_path: Path
    gnupg_home: Path
    keys: tuple[Key, ...]
    passphrase_file: Path | None
    created: bool = False
    imported: bool = False
    changed: bool = False
    notes: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        verb = "created" if self.created else "imported" if self.imported else "exists"
        lines = [
            f"key {key.fingerprint} ({', '.join(key.user_ids) or 'no user id'}): {verb}, "
            f"in {self.gnupg_home}"
            for key in self.keys
        ]
        if self.passphrase_file is not None:
            lines.append(f"passphrase file: {self.passphrase_file}")
        lines.append(
            f"{self.config_path}: "
            + ("encryption written" if self.changed else "already set up, nothing changed")
        )
        return [*lines, *self.notes]


def real_keys(config: Config) -> tuple[str, ...]:
    """The keys virt-dup.yml encrypts to, without the example's placeholder."""
    return tuple(key for key in config.encryption.keys if key != PLACEHOLDER_KEY)


def init(config: Config, request: InitRequest, ask: Ask | None) -> InitResult:
    """Set up the key of ``config`` (see the module docstring).

    Raises :class:`ConfigError` when virt-dup.yml names keys already (without
    ``force``), :class:`UsageError` for a passphrase that cannot be had, and
    :class:`KeyProblem` or :class:`CommandError` when gpg refuses; nothing is
    written then.
    """
    configured = real_keys(config)
    existing = _existing_setup(config, configured)
    if existing is not None and not request.force:
        if request.import_file is None:
            return existing
    elif configured and not request.force and request.import_file is None:
        home = config.gnupg_directory
        raise ConfigError(
            f"{config.path}: encryption.keys names {', '.join(configured)}, whose secret key "
            f"is not in {home}: import it with 'virt-dup init --import FILE' (a file of "
            "'virt-dup export-key'), or make a new key with 'virt-dup init --force'"
        )
    home = config.encryption.gnupg_home or config.own_gnupg_home
    if request.import_file is not None:
        return _import(config, request, ask, home, configured)
    return _create(config, request, ask, home)


def _existing_setup(config: Config, configured: tuple[str, ...]) -> InitResult | None:
    """The set-up as it is, when every configured key has its secret half here."""
    if not configured:
        return None
    keyring = Keyring(config.gnupg_directory)
    found = [keyring.find(key) for key in configured]
    if not all(key is not None and key.has_secret for key in found):
        return None
    return InitResult(
        config_path=config.path,
        gnupg_home=keyring.home,
        keys=tuple(key for key in found if key is not None),
        passphrase_file=config.encryption.passphrase_file,
    )


def _create(config: Config, request: InitRequest, ask: Ask | None, home: Path) -> InitResult:
    passphrase_file, passphrase, new_file = _passphrase(config, request, ask, confirm=True)
    values = _values(config, [PLACEHOLDER_KEY], home, passphrase_file)
    _check_edit(config, values)  # refuse before a key exists that nothing names
    keyring = Keyring(home)
    keyring.create_home()
    hostname = socket.gethostname()
    user_id = request.user_id or f"virt-dup on {hostname} <root@{hostname}>"
    fingerprint = keyring.generate(user_id, passphrase)
    keyring.decrypt_probe(keyring.encrypt_probe(fingerprint), passphrase)
    if new_file:
        _write_passphrase_file(passphrase_file, passphrase)
    update_encryption(config.path, {**values, "keys": [fingerprint]})
    key = keyring.find(fingerprint)
    return InitResult(
        config_path=config.path,
        gnupg_home=home,
        keys=(key,) if key is not None else (),
        passphrase_file=passphrase_file,
        created=True,
        changed=True,
    )


def _import(
    config: Config, request: InitRequest, ask: Ask | None, home: Path, configured: tuple[str, ...]
) -> InitResult:
    assert request.import_file is not None
    data = _read_key_file(request.import_file)
    passphrase_file, passphrase, new_file = _passphrase(config, request, ask, confirm=False)
    fingerprints = _probe_import(data, passphrase, passphrase_file, request.import_file)
    keys = list(fingerprints)
    if configured:
        missing = [key for key in configured if not any(fpr.endswith(key) for fpr in fingerprints)]
        if missing and not request.force:
            raise ConfigError(
                f"{request.import_file}: holds {', '.join(fingerprints)}, but {config.path} "
                f"encrypts to {', '.join(missing)}: import that key's export, or --force to "
                "encrypt to the imported key from now on"
            )
        if not missing:
            keys = list(config.encryption.keys)
    values = _values(config, keys, home, passphrase_file)
    _check_edit(config, values)
    keyring = Keyring(home)
    keyring.create_home()
    held = [keyring.find(fingerprint) for fingerprint in fingerprints]
    new_keys = not all(key is not None and key.has_secret for key in held)
    if new_keys:
        keyring.import_keys(data)
    if new_file:
        _write_passphrase_file(passphrase_file, passphrase)
    changed = _differs(config, values)
    if changed:
        update_encryption(config.path, values)
    found = tuple(key for key in (keyring.find(fpr) for fpr in fingerprints) if key is not None)
    return InitResult(
        config_path=config.path,
        gnupg_home=home,
        keys=found,
        passphrase_file=passphrase_file,
        imported=new_keys,
        changed=changed or new_file,
    )


def _values(
    config: Config, keys: list[str], home: Path, passphrase_file: Path
) -> dict[str, object]:
    return {"keys": keys, "gnupg_home": str(home), "passphrase_file": str(passphrase_file)}


def _differs(config: Config, values: dict[str, object]) -> bool:
    encryption = config.encryption
    return (
        list(encryption.keys) != values["keys"]
        or str(encryption.gnupg_home) != values["gnupg_home"]
        or str(encryption.passphrase_file) != values["passphrase_file"]
    )


def _check_edit(config: Config, values: dict[str, object]) -> None:
    """Raise :class:`ConfigError` now when virt-dup.yml could not take ``values``."""
    try:
        text = config.path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{config.path}: cannot read: {error}") from None
    with_encryption(text, config.path, values)
    directory = config.path.parent
    if directory.exists() and not os.access(directory, os.W_OK):
        raise ConfigError(f"{config.path}: cannot write to {directory}")


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_KEY_FILE + 1)
    except OSError as error:
        raise UsageError(f"--import {path}: cannot read: {error.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise UsageError(f"--import {path}: larger than {MAX_KEY_FILE} bytes: not a key file")
    return data


def _probe_import(
    data: bytes, passphrase: str, passphrase_file: Path, source: Path
) -> tuple[str, ...]:
    """Import ``data`` into a scratch keyring and prove that ``passphrase`` unlocks
    each secret key in it; returns their fingerprints.  The real home is not
    touched when this fails."""
    scratch = Path(tempfile.mkdtemp(prefix="virt-dup-gnupg-"))  # short: gpg-agent's socket
    keyring = Keyring(scratch)
    try:
        try:
            fingerprints = keyring.import_keys(data)
        except CommandFailed as failure:
            raise KeyProblem(f"--import {source}: gpg cannot read it: {failure}") from None
        except KeyProblem as problem:
            raise KeyProblem(f"--import {source}: {problem}") from None
        for fingerprint in fingerprints:
            try:
                keyring.decrypt_probe(keyring.encrypt_probe(fingerprint), passphrase)
            except KeyProblem as problem:
                raise KeyProblem(
                    f"--import {source}: key {fingerprint}: {problem}, with the passphrase "
                    f"of {passphrase_file}"
                ) from None
        return fingerprints
    finally:
        keyring.stop_agent()
        shutil.rmtree(scratch, ignore_errors=True)


def _passphrase(
    config: Config, request: InitRequest, ask: Ask | None, *, confirm: bool
) -> tuple[Path, str, bool]:
    """(the passphrase file, the passphrase, whether the file is still to be written).

    From ``--passphrase-file``, else the configured or the default file when it
    exists, else asked on the terminal (written to the default file later).
    """
    if request.passphrase_file is not None:
        path = request.passphrase_file
        if not path.is_absolute():
            path = path.resolve()
        if not path.is_file():
            raise UsageError(f"--passphrase-file {path}: no such file")
        return path, _read(config, path), False
    default = config.encryption.passphrase_file or config.path.parent / PASSPHRASE_FILE_NAME
    if default.exists():
        return default, _read(config, default), False
    if ask is None:
        raise UsageError(
            "no terminal to ask for the key's passphrase: put it in a file only root can "
            f"read (chmod 600) and give --passphrase-file FILE, or create {default}"
        )
    passphrase = ask(confirm)
    if not passphrase:
        raise UsageError("an empty passphrase: the exported key would be unprotected")
    return default, passphrase, True


def _read(config: Config, path: Path) -> str:
    with_file = replace(config, encryption=replace(config.encryption, passphrase_file=path))
    passphrase = read_passphrase(with_file)
    assert passphrase is not None
    return passphrase


def _write_passphrase_file(path: Path, passphrase: str) -> None:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            os.fchmod(stream.fileno(), 0o600)
            stream.write(passphrase + "\n")
    except OSError as error:
        raise VirtDupError(f"{path}: cannot write the passphrase file: {error.strerror}") from None


# -- export-key ---------------------------------------------------------------------
@dataclass(frozen=True)
class Export:
    """The armored secret and public keys of ``keys``, from ``gnupg_home``."""

    text: str
    keys: tuple[Key, ...]
    gnupg_home: Path


def export_keys(config: Config) -> Export:
    """The secret keys (and public keys) of virt-dup.yml's ``encryption.keys`` and
    ``sign_key``.  Raises :class:`ConfigError` when none is configured and
    :class:`KeyProblem` when one has no secret half here or the passphrase
    does not unlock it."""
    wanted = [*real_keys(config)]
    sign_key = config.encryption.sign_key
    if sign_key and sign_key not in wanted:
        wanted.append(sign_key)
    if not wanted:
        raise ConfigError(
            f"{config.path}: encryption.keys names no key of your own: run 'virt-dup init'"
        )
    keyring = Keyring(config.gnupg_directory)
    keys: list[Key] = []
    for key_id in wanted:
        key = keyring.find(key_id)
        if key is None or not key.has_secret:
            what = "is not" if key is None else "has only its public key"
            raise KeyProblem(
                f"key {key_id} {what} in {keyring.home}: export it on the host that holds "
                "its secret key"
            )
        if key not in keys:
            keys.append(key)
    passphrase = read_passphrase(config)
    try:
        text = keyring.export([key.fingerprint for key in keys], passphrase)
    except CommandFailed as failure:
        if any("Bad passphrase" in line for line in failure.stderr_tail):
            where = config.encryption.passphrase_file or "no encryption.passphrase_file"
            raise KeyProblem(
                f"the passphrase ({where}) does not unlock the secret key in {keyring.home}"
            ) from None
        raise CommandError(str(failure)) from None
    return Export(text=text, keys=tuple(keys), gnupg_home=keyring.home)


def write_export(path: Path, text: str) -> None:
    """Write an export to a new file only root can read (never over an existing one)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"--output {path}: exists already; name a new file") from None
    except OSError as error:
        raise UsageError(f"--output {path}: cannot create: {error.strerror}") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            os.fchmod(stream.fileno(), 0o600)
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as error:
        path.unlink(missing_ok=True)
        raise VirtDupError(f"--output {path}: cannot write: {error.strerror}") from None
