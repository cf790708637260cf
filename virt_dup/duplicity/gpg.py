"""GnuPG, as duplicity uses it: virt-dup's keyring, its keys, and proof that they work.

:class:`Keyring` is one GnuPG home.  It lists the keys there, makes one
(``--quick-gen-key ... default default never``: the ``default default`` form
has the encryption subkey duplicity needs), imports and exports keys, and
probes what a backup needs: that a key encrypts (as duplicity calls gpg:
``--always-trust``) and that the passphrase unlocks its secret half.

Every gpg runs through :func:`virt_dup.execute.run` with ``--batch``; a
passphrase goes to gpg only through a pipe named by ``--passphrase-fd``
(``--pinentry-mode loopback``), never in argv or the environment.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from virt_dup.errors import CommandError, VirtDupError
from virt_dup.execute import CommandFailed, meaningful_lines, run

#: gpg 2.1 brought --quick-gen-key, --pinentry-mode loopback and gpg-agent's key store.
MINIMUM_VERSION = (2, 1)
#: How long one gpg call may take (making an RSA key: seconds; a stuck agent: never).
GPG_TIMEOUT_S = 120.0
#: What the passphrase and encryption probes encrypt and decrypt.
_PROBE = b"virt-dup key probe\n"
#: Validity letters of ``--with-colons`` that make a key or subkey unusable.
_UNUSABLE = frozenset("idrne")


class KeyProblem(VirtDupError):
    """A key is missing, cannot encrypt, or its passphrase does not unlock it."""


@dataclass(frozen=True)
class Key:
    """A public key in a keyring.

    ``fingerprint``: the primary key's (40 hex digits); ``subkeys``: the
    fingerprints of its subkeys; ``user_ids``; ``can_encrypt``: the key or a
    valid subkey may encrypt; ``has_secret``: the secret half is here;
    ``problem``: why it is unusable (revoked, expired, disabled) or None.
    """

    fingerprint: str
    subkeys: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()
    can_encrypt: bool = False
    has_secret: bool = False
    problem: str | None = None

    def matches(self, key_id: str) -> bool:
        """Whether ``key_id`` (8, 16 or 40 hex digits, as virt-dup.yml has them) names
        this key or one of its subkeys."""
        wanted = key_id.upper().removeprefix("0X")
        return any(fpr.endswith(wanted) for fpr in (self.fingerprint, *self.subkeys))


@dataclass
class _Draft:
    """A key while its ``--with-colons`` records are read."""

    can_encrypt: bool
    problem: str | None
    fingerprint: str = ""
    subkeys: list[str] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)


def parse_keys(colons: str, secret_fingerprints: Iterable[str] = ()) -> tuple[Key, ...]:
    """The keys of ``gpg --with-colons --list-keys`` output (pure).

    ``secret_fingerprints``: primary fingerprints whose secret half is held.
    """
    drafts: list[_Draft] = []
    last_record = ""
    for line in colons.splitlines():
        fields = line.split(":")
        record = fields[0]
        if record in ("pub", "sec"):
            # field 12: the whole key's usable capabilities (E: something may encrypt)
            capabilities = fields[11] if len(fields) > 11 else ""
            drafts.append(_Draft("E" in capabilities, _validity_problem(fields[1])))
        elif drafts and record == "fpr" and len(fields) > 9:
            if last_record in ("pub", "sec"):
                drafts[-1].fingerprint = fields[9]
            elif last_record in ("sub", "ssb"):
                drafts[-1].subkeys.append(fields[9])
        elif drafts and record == "uid" and len(fields) > 9 and fields[1] not in _UNUSABLE:
            drafts[-1].user_ids.append(fields[9])
        if record != "grp":  # a keygrip sits between a key and its fingerprint
            last_record = record
    secrets = set(secret_fingerprints)
    return tuple(
        Key(
            fingerprint=draft.fingerprint,
            subkeys=tuple(draft.subkeys),
            user_ids=tuple(draft.user_ids),
            can_encrypt=draft.can_encrypt,
            has_secret=draft.fingerprint in secrets,
            problem=draft.problem,
        )
        for draft in drafts
        if draft.fingerprint
    )


def _validity_problem(validity: str) -> str | None:
    return {
        "r": "revoked",
        "e": "expired",
        "d": "disabled",
        "i": "invalid",
        "n": "not valid",
    }.get(validity)


def parse_version(output: str) -> tuple[int, int, int]:
    """``gpg --version``'s first line (``gpg (GnuPG) 2.2.40``) as numbers.

    Raises :class:`VirtDupError` when it cannot be read.
    """
    match = re.search(r"\(GnuPG\)\s+(\d+)\.(\d+)\.(\d+)", output)
    if not match:
        first = output.strip().splitlines()[0] if output.strip() else "nothing"
        raise VirtDupError(f"cannot tell the gpg version from {first!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def imported_fingerprints(status: str) -> tuple[str, ...]:
    """Primary fingerprints of the secret keys ``gpg --import --status-fd`` took in
    (``IMPORT_OK`` with flag 16: "contains a private key"), in order, once each."""
    found: list[str] = []
    for line in status.splitlines():
        parts = line.split()
        imported = len(parts) >= 4 and parts[:2] == ["[GNUPG:]", "IMPORT_OK"]
        if imported and int(parts[2]) & 16 and parts[3] not in found:
            found.append(parts[3])
    return tuple(found)


def version(program: str = "gpg") -> tuple[int, int, int]:
    """gpg's version; raises :class:`VirtDupError` below :data:`MINIMUM_VERSION`."""
    completed = run([program, "--version"], timeout=GPG_TIMEOUT_S)
    found = parse_version(completed.stdout)
    if found[:2] < MINIMUM_VERSION:
        raise VirtDupError(
            f"gpg {'.'.join(map(str, found))} is too old (need "
            f"{'.'.join(map(str, MINIMUM_VERSION))} or later: package gnupg)"
        )
    return found


class Keyring:
    """The GnuPG home ``home``, driven by the gpg at ``program``."""

    def __init__(self, home: Path, program: str = "gpg") -> None:
        self.home = home
        self.program = program

    # -- reading -------------------------------------------------------------------
    def keys(self) -> tuple[Key, ...]:
        """Every public key in the home, with whether its secret half is here too
        (none when the home does not exist yet)."""
        if not self.home.is_dir():
            return ()
        secret = self._gpg("--with-colons", "--list-secret-keys").stdout
        secret_fingerprints = [key.fingerprint for key in parse_keys(secret)]
        public = self._gpg("--with-colons", "--list-keys").stdout
        return parse_keys(public, secret_fingerprints)

    def find(self, key_id: str) -> Key | None:
        """The key ``key_id`` names (a subkey's id names its key), or None."""
        return next((key for key in self.keys() if key.matches(key_id)), None)

    # -- changing ------------------------------------------------------------------
    def create_home(self) -> None:
        """Make the home (mode 0700, parents too).  Refuses a home others can read
        or that is not a directory: gpg would warn on every call, and its keys
        would not be root's alone."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = self.home.lstat()
        if not stat.S_ISDIR(status.st_mode):
            raise VirtDupError(f"{self.home}: the GnuPG home is not a directory")
        if status.st_mode & 0o077:
            raise VirtDupError(
                f"{self.home}: the GnuPG home can be read by others (mode "
                f"{status.st_mode & 0o777:o}): chmod 700 it"
            )

    def generate(self, user_id: str, passphrase: str) -> str:
        """Make a key (``default default never``: RSA with an encryption subkey,
        no expiry) protected by ``passphrase``; returns its fingerprint."""
        completed = self._gpg(
            "--status-fd",
            "1",
            "--quick-gen-key",
            user_id,
            "default",
            "default",
            "never",
            passphrase=passphrase,
        )
        match = re.search(r"^\[GNUPG:\] KEY_CREATED [BP] ([0-9A-F]{40})", completed.stdout, re.M)
        if not match:
            raise CommandError(f"gpg --quick-gen-key {user_id!r} made no key in {self.home}")
        return match.group(1)

    def import_keys(self, data: bytes) -> tuple[str, ...]:
        """Import the keys in ``data`` (an export-key file); returns the
        fingerprints of the secret keys it held (none: :class:`KeyProblem`)."""
        completed = self._gpg("--status-fd", "1", "--import", input=data)
        fingerprints = imported_fingerprints(completed.stdout)
        if not fingerprints:
            raise KeyProblem(
                "it holds no secret key (only a public key cannot restore): export it "
                "with 'virt-dup export-key' on the host that has the secret key"
            )
        return fingerprints

    def export(self, fingerprints: Sequence[str], passphrase: str | None) -> str:
        """The secret keys (armored, which gpg-agent unlocks with ``passphrase``)
        followed by the public keys of ``fingerprints``."""
        secret = self._gpg(
            "--armor", "--export-secret-keys", *fingerprints, passphrase=passphrase or ""
        )
        public = self._gpg("--armor", "--export", *fingerprints)
        return secret.stdout + public.stdout

    # -- probing -------------------------------------------------------------------
    def encrypt_probe(self, key_id: str) -> bytes:
        """Encrypt a few bytes to ``key_id`` as duplicity does (``--always-trust``);
        returns the ciphertext.  Raises :class:`CommandError` (gpg's reason)."""
        completed = self._gpg(
            "--always-trust",
            "--encrypt",
            "--recipient",
            key_id,
            "--output",
            "-",
            "--armor",
            input=_PROBE,
        )
        return completed.stdout.encode()

    def decrypt_probe(self, ciphertext: bytes, passphrase: str) -> None:
        """Decrypt what :meth:`encrypt_probe` made with ``passphrase``.

        gpg-agent forgets every cached passphrase first (``gpgconf --reload``):
        a passphrase that worked a minute ago must not stand in for this one.
        Raises :class:`KeyProblem` when the passphrase does not unlock the key.
        """
        self.forget_passphrases()
        try:
            completed = self._gpg("--decrypt", input=ciphertext, passphrase=passphrase)
        except CommandFailed as failure:
            raise KeyProblem(_gpg_reason(failure, "cannot decrypt")) from None
        if completed.stdout.encode() != _PROBE:
            raise KeyProblem("decrypting a probe gave back other bytes")

    def sign_probe(self, key_id: str, passphrase: str) -> None:
        """Sign a few bytes with ``key_id`` unlocked by ``passphrase`` (after
        gpg-agent forgot its cache).  Raises :class:`KeyProblem`."""
        self.forget_passphrases()
        try:
            self._gpg(
                "--local-user",
                key_id,
                "--detach-sign",
                "--output",
                "-",
                "--armor",
                input=_PROBE,
                passphrase=passphrase,
            )
        except CommandFailed as failure:
            raise KeyProblem(_gpg_reason(failure, "cannot sign")) from None

    def forget_passphrases(self) -> None:
        """Make gpg-agent of this home drop its cached passphrases (a no-op when
        no agent runs)."""
        gpgconf = os.path.join(os.path.dirname(self.program), "gpgconf")
        program = gpgconf if os.path.isabs(gpgconf) else "gpgconf"
        run([program, "--homedir", os.fspath(self.home), "--reload", "gpg-agent"], timeout=30)

    def stop_agent(self) -> None:
        """Stop the gpg-agent this home's gpg calls started (one per home)."""
        gpgconf = os.path.join(os.path.dirname(self.program), "gpgconf")
        program = gpgconf if os.path.isabs(gpgconf) else "gpgconf"
        run(
            [program, "--homedir", os.fspath(self.home), "--kill", "all"],
            timeout=30,
            ok_codes=range(256),
        )

    # -- running -------------------------------------------------------------------
    def _gpg(
        self, *arguments: str, input: bytes | None = None, passphrase: str | None = None
    ) -> CompletedGpg:
        with _passphrase_pipe(passphrase) as descriptor:
            extra = () if descriptor is None else _passphrase_arguments(descriptor)
            completed = run(
                [self.program, "--homedir", os.fspath(self.home), "--batch", *extra, *arguments],
                environment={"LC_ALL": "C.UTF-8", "GNUPGHOME": os.fspath(self.home)},
                secrets=(passphrase,) if passphrase else (),
                input=input,
                timeout=GPG_TIMEOUT_S,
                pass_fds=() if descriptor is None else (descriptor,),
            )
        return CompletedGpg(completed.stdout)


def _gpg_reason(failure: CommandFailed, what: str) -> str:
    """Why a gpg call that needed the secret key failed, in words."""
    if any("Bad passphrase" in line for line in failure.stderr_tail):
        return "the passphrase does not unlock it (Bad passphrase)"
    if any(
        "No secret key" in line or "secret key not available" in line
        for line in failure.stderr_tail
    ):
        return "its secret key is not in the GnuPG home"
    return f"{what}: " + ("; ".join(meaningful_lines(failure.stderr_tail)) or str(failure))


@dataclass(frozen=True)
class CompletedGpg:
    """What a gpg call wrote to standard output."""

    stdout: str


def _passphrase_arguments(descriptor: int) -> tuple[str, ...]:
    return ("--pinentry-mode", "loopback", "--passphrase-fd", str(descriptor))


@contextmanager
def _passphrase_pipe(passphrase: str | None) -> Iterator[int | None]:
    """The read end of a pipe that holds ``passphrase`` and a newline (None: no
    passphrase is given).  A passphrase fits in the pipe's buffer, so it is
    written whole before gpg starts; the descriptor is closed afterwards."""
    if passphrase is None:
        yield None
        return
    data = passphrase.encode() + b"\n"
    if len(data) > 4096:
        raise VirtDupError("a passphrase of more than 4095 bytes is not supported")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
        os.close(write_end)
        write_end = -1
        yield read_end
    finally:
        if write_end >= 0:
            os.close(write_end)
        os.close(read_end)
