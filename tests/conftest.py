"""Fixtures shared by all virt-dup tests.

Unit tests (``tests/unit``) are pure: no daemon, no root, no network.

Integration tests (``tests/integration``) run against the real components of
the test machine (libvirtd on ``qemu:///system``, QEMU/KVM, duplicity, gpg,
systemd; see /work/shared/ENVIRONMENT.md).  Mark every one of them, once per
module::

    import pytest

    pytestmark = pytest.mark.integration

or per test with ``@pytest.mark.integration``.  ``pytest -m "not integration"``
then runs only the fast unit tests; ``./scripts/test`` runs everything.

A missing component *skips* an integration test on a developer machine but
*fails* it when ``CI=true``: CI must never pass by skipping.  Use the
``require`` fixture for that instead of ``pytest.skip``::

    def test_sftp_backend(require):
        require(shutil.which("sshd") is not None, "sshd not installed (openssh-server)")

Fixtures here: ``require``, ``gpg_home``.  Libvirt fixtures (``libvirt_conn``,
``make_domain``) are in ``tests/integration/conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

GPG_USER_ID = "test <t@example.invalid>"
#: algorithm, usage, expiry: "default default" includes an encryption subkey,
#: which duplicity needs ("rsa2048 default" has none: "Unusable public key").
KEY_ARGS = ("default", "default", "never")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run ``disruptive`` tests (they restart libvirtd) after all the others."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


def in_ci() -> bool:
    """Tell whether the tests run in CI (environment ``CI=true``)."""
    return os.environ.get("CI", "").lower() == "true"


def _require(condition: bool, reason: str) -> None:
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: not skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def require() -> Callable[[bool, str], None]:
    """``require(condition, reason)``: skip the test with ``reason`` unless
    ``condition`` holds; with ``CI=true`` fail it instead (no silent skips in CI).
    """
    return _require


@dataclass(frozen=True)
class GpgHome:
    """A throw-away GnuPG home holding one secret key without passphrase.

    ``path``: the home directory (mode 0700); ``fingerprint``: the key's
    (40 hex digits, primary key; it has an encryption subkey);
    ``env``: ``{"GNUPGHOME": path}`` to merge into a command's environment.
    """

    path: Path
    fingerprint: str

    @property
    def env(self) -> dict[str, str]:
        return {"GNUPGHOME": os.fspath(self.path)}


def _gpg(home: Path, *args: str) -> str:
    argv = ["gpg", "--homedir", os.fspath(home), "--batch", *args]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def _stop_gpg_agent(home: Path) -> None:
    # gpg starts one agent per home; stop ours so no process outlives the test.
    subprocess.run(
        ["gpgconf", "--homedir", os.fspath(home), "--kill", "all"],
        capture_output=True,
        check=False,
    )


def _new_gpg_directory() -> Path:
    # Short path under /tmp: gpg-agent's socket lives in the home and a Unix
    # socket path must stay under 108 bytes (pytest's tmp_path may not).
    return Path(tempfile.mkdtemp(prefix="vdt-gnupg-"))


@pytest.fixture(scope="session")
def _gpg_key_template() -> Iterator[GpgHome]:
    """Generate the test key once per session (~1 s); ``gpg_home`` copies it."""
    _require(shutil.which("gpg") is not None, "gpg not installed (package gnupg)")
    home = _new_gpg_directory()
    try:
        _gpg(
            home, "--passphrase", "", "--quick-gen-key", GPG_USER_ID, "default", "default", "never"
        )
        colons = _gpg(home, "--with-colons", "--list-secret-keys", GPG_USER_ID)
        fingerprint = next(
            line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:")
        )
        _stop_gpg_agent(home)
        yield GpgHome(path=home, fingerprint=fingerprint)
    finally:
        _stop_gpg_agent(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def gpg_home(_gpg_key_template: GpgHome) -> Iterator[GpgHome]:
    """A fresh throw-away GnuPG home for this test, with the session's test key.

    The key was made by ``gpg --batch --passphrase '' --quick-gen-key
    'test <t@example.invalid>' default default never``.  Returns a
    :class:`GpgHome`; the directory and its gpg-agent are removed afterwards.
    """
    home = _new_gpg_directory()
    shutil.copytree(
        _gpg_key_template.path,
        home,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("S.*", "*.lock", ".#*"),
    )
    home.chmod(0o700)
    try:
        yield GpgHome(path=home, fingerprint=_gpg_key_template.fingerprint)
    finally:
        _stop_gpg_agent(home)
        shutil.rmtree(home, ignore_errors=True)
