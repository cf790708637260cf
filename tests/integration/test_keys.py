"""``virt-dup init``, ``export-key`` and ``check-config`` against real gpg and duplicity.

A new admin's path: examples/virt-dup.yml as installed (its placeholder key
fails check-config and add-job), ``init`` makes the key in virt-dup's own
GnuPG home and writes it into the file with the comments kept, check-config
then proves it; ``export-key``'s file alone lets a fresh host restore.
virt-dup runs as its own process, as an admin runs it.
"""

from __future__ import annotations

import difflib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
import yaml
from harness.backups import BackupEnvironment, error_lines
from test_restore import backups_json, chain_of, guest_view, prepared, same_guest_view

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "virt-dup.yml"
PLACEHOLDER = "0123456789ABCDEF0123456789ABCDEF01234567"
PASSPHRASE = "correct horse battery staple"


class Host:
    """One host's virt-dup: virt-dup.yml made from the example, a state directory
    (with the own GnuPG home init makes), a cache, a file:// backend."""

    def __init__(self, root: Path, backend: Path) -> None:
        self.root = root
        self.config = root / "virt-dup.yml"
        self.state = root / "state"
        self.backend = backend
        self.passphrase_file = root / "passphrase"

    @property
    def gnupg_home(self) -> Path:
        return self.state / "gnupg"

    def install_example(self) -> None:
        text = EXAMPLE.read_text()
        text = text.replace("file:///srv/backups/virt-dup", f"file://{self.backend}")
        text = text.replace("# state_dir: /var/lib/virt-dup", f"state_dir: {self.state}")
        text = text.replace("# cache_dir: /var/cache/virt-dup", f"cache_dir: {self.root}/cache")
        self.config.write_text(text)

    def write_passphrase(self, passphrase: str) -> None:
        self.passphrase_file.write_text(passphrase + "\n")
        self.passphrase_file.chmod(0o600)

    def virt_dup(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        finished = subprocess.run(
            [sys.executable, "-m", "virt_dup", "--config", str(self.config), *arguments],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "TMPDIR": str(self.root)},
        )
        if check and finished.returncode != 0:
            raise AssertionError(
                f"virt-dup {' '.join(arguments)} exited {finished.returncode}:\n{finished.stderr}"
            )
        return finished

    def settings(self) -> dict:
        return yaml.safe_load(self.config.read_text())

    def environment(self) -> BackupEnvironment:
        """The same host as the restore tests' harness sees it."""
        settings = self.settings()["encryption"]
        return BackupEnvironment(
            root=self.root,
            config=self.config,
            backend=self.backend,
            state=self.state,
            cache=self.root / "cache",
            gnupg_home=Path(settings["gnupg_home"]),
            fingerprint=settings["keys"][0],
        )

    def stop_agents(self) -> None:
        subprocess.run(
            ["gpgconf", "--homedir", str(self.gnupg_home), "--kill", "all"],
            capture_output=True,
            check=False,
        )


def short_directory(prefix: str) -> Path:
    # gpg-agent's socket lives in the GnuPG home: its path must stay under 108 bytes.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    """``make(backend)``-style list: each test appends the hosts it makes; their
    directories and gpg-agents are removed afterwards, whatever happened."""
    made: list[Host] = []
    yield made
    for host in made:
        host.stop_agents()
        shutil.rmtree(host.root, ignore_errors=True)


def new_host(hosts: list[Host], backend: Path | None = None) -> Host:
    root = short_directory("vdk-")
    host = Host(root, backend or root / "backend")
    hosts.append(host)
    host.install_example()
    return host


def gpg_secret_fingerprints(home: Path) -> list[str]:
    listing = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--with-colons", "--list-secret-keys"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    records = listing.splitlines()
    return [
        line.split(":")[9]
        for previous, line in itertools.pairwise(records)
        if previous.startswith("sec:") and line.startswith("fpr:")
    ]


def test_init_turns_the_example_into_a_working_setup(hosts) -> None:
    host = new_host(hosts)
    host.backend.mkdir()
    before = host.config.read_text()

    # as installed, the example's placeholder key fails, with the fix
    checked = host.virt_dup("check-config", check=False)
    assert checked.returncode == 1
    (line,) = error_lines(checked.stderr)
    assert PLACEHOLDER in line and "placeholder" in line and "virt-dup init" in line

    host.write_passphrase(PASSPHRASE)
    started = time.monotonic()
    made = host.virt_dup("init", "--passphrase-file", str(host.passphrase_file))
    print(f"init (key made, probed, virt-dup.yml written): {time.monotonic() - started:.1f} s")

    (fingerprint,) = gpg_secret_fingerprints(host.gnupg_home)
    assert f"key {fingerprint}" in made.stdout and "created" in made.stdout
    assert (host.gnupg_home.stat().st_mode & 0o777) == 0o700
    # the admin is told, once and prominently, to get the secret key off the host
    assert made.stderr.count("virt-dup export-key") == 1
    assert "IMPORTANT" in made.stderr
    # virt-dup.yml: the key and where it lives, every comment and line of the admin kept
    settings = host.settings()["encryption"]
    assert settings == {
        "keys": [fingerprint],
        "gnupg_home": str(host.gnupg_home),
        "passphrase_file": str(host.passphrase_file),
    }
    after = host.config.read_text()
    changes = [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="")
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]
    assert changes == [
        f"-    - {PLACEHOLDER}",
        f"+    - {fingerprint}",
        f"+  gnupg_home: {host.gnupg_home}",
        f"+  passphrase_file: {host.passphrase_file}",
    ]
    # the passphrase is in no argument gpg was given: init read it from the file
    assert PASSPHRASE not in made.stdout + made.stderr

    # a second init says what exists and changes nothing
    again = host.virt_dup("init", "--passphrase-file", str(host.passphrase_file))
    assert "nothing changed" in again.stdout and "exists" in again.stdout
    assert "export-key" not in again.stderr
    assert host.config.read_text() == after
    assert gpg_secret_fingerprints(host.gnupg_home) == [fingerprint]

    # now everything check-config tries works
    started = time.monotonic()
    good = host.virt_dup("check-config")
    print(f"check-config, all probes: {time.monotonic() - started:.1f} s")
    assert f"key {fingerprint}: in {host.gnupg_home}, encrypts" in good.stdout
    assert f"decrypts with the passphrase of {host.passphrase_file}" in good.stdout
    assert "backend local (" in good.stdout and "reachable and writable" in good.stdout
    assert "duplicity 3." in good.stdout
    assert list(host.backend.iterdir()) == []  # the write probe left nothing

    # a wrong passphrase is caught, even right after the right one unlocked the key
    host.write_passphrase("not the passphrase")
    wrong = host.virt_dup("check-config", check=False)
    assert wrong.returncode == 1
    (line,) = error_lines(wrong.stderr)
    assert str(host.passphrase_file) in line and "does not unlock" in line
    assert "not the passphrase" not in wrong.stderr + wrong.stdout


def test_init_refuses_what_it_must_not_change(hosts, gpg_home) -> None:
    host = new_host(hosts)
    host.config.write_text(host.config.read_text().replace(PLACEHOLDER, gpg_home.fingerprint))
    before = host.config.read_bytes()
    # keys named already, whose secret key is not in the home: no silent new key
    refused = host.virt_dup("init", check=False)
    assert refused.returncode == 2
    (line,) = error_lines(refused.stderr)
    assert gpg_home.fingerprint in line and "--import" in line and "--force" in line
    # no terminal and no passphrase file: asked for one, nothing made
    forced = host.virt_dup("init", "--force", check=False)
    assert forced.returncode == 2
    (line,) = error_lines(forced.stderr)
    assert "--passphrase-file" in line
    # a passphrase file others can read is refused
    host.write_passphrase(PASSPHRASE)
    host.passphrase_file.chmod(0o644)
    readable = host.virt_dup(
        "init", "--force", "--passphrase-file", str(host.passphrase_file), check=False
    )
    assert readable.returncode == 2
    assert "chmod 600" in error_lines(readable.stderr)[0]
    assert host.config.read_bytes() == before
    assert not host.gnupg_home.exists()


def test_check_config_names_a_missing_key_and_an_unwritable_or_unreachable_backend(
    hosts, gpg_home, require
) -> None:
    require(shutil.which("unshare") is not None, "unshare not installed (util-linux)")
    host = new_host(hosts)
    read_only = host.root / "read-only"
    read_only.mkdir()
    other_key = "FEDCBA9876543210FEDCBA9876543210FEDCBA98"
    host.config.write_text(
        f"backends:\n  nas: file://{read_only}\n"
        "  offsite: sftp://backup:s3cret-pw@127.0.0.1:1/srv/virt-dup\n"
        f"encryption:\n  keys: [{gpg_home.fingerprint}, {other_key}]\n"
        f"  gnupg_home: {gpg_home.path}\n"
        f"state_dir: {host.state}\n"
    )
    # the file:// backend on a read-only file system, as a read-only mount would be
    finished = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount -t tmpfs -o ro tmpfs "{read_only}" && exec "$@"',
            "sh",
            sys.executable,
            "-m",
            "virt_dup",
            "--config",
            str(host.config),
            "check-config",
        ],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert finished.returncode == 1, finished.stderr
    problems = error_lines(finished.stderr)
    assert len(problems) == 3, finished.stderr
    missing, unwritable, unreachable = problems
    assert other_key in missing and str(gpg_home.path) in missing and "virt-dup init" in missing
    assert f"backend nas (file://{read_only})" in unwritable
    assert "Read-only file system" in unwritable
    assert "backend offsite (sftp://backup:***@127.0.0.1:1/srv/virt-dup)" in unreachable
    assert "s3cret-pw" not in finished.stderr + finished.stdout
    # the key that is there was proven
    assert f"key {gpg_home.fingerprint}: in {gpg_home.path}, encrypts" in finished.stdout
    # --syntax-only tries nothing and passes
    assert host.virt_dup("check-config", "--syntax-only").returncode == 0


def test_check_config_proves_an_sftp_backend_through_duplicity(
    hosts, gpg_home, sftp_server, tmp_path
) -> None:
    host = new_host(hosts)
    remote = tmp_path / "remote"
    remote.mkdir()
    host.config.write_text(
        f"backends:\n  offsite: {sftp_server}{remote}\n"
        f"encryption:\n  keys: [{gpg_home.fingerprint}]\n  gnupg_home: {gpg_home.path}\n"
        f"state_dir: {host.state}\n"
    )
    checked = subprocess.run(
        [sys.executable, "-m", "virt_dup", "--config", str(host.config), "check-config"],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert checked.returncode == 0, checked.stderr
    assert "backend offsite (sftp://" in checked.stdout
    assert "reachable and writable" in checked.stdout
    assert list(remote.iterdir()) == []  # the probe file was deleted again


def test_add_job_refuses_a_key_the_keyring_does_not_hold(hosts, make_domain) -> None:
    host = new_host(hosts)
    vm = make_domain(chain=["vm"], running=False)
    before = vm.domain.XMLDesc()
    placeholder = host.virt_dup("add-job", vm.name, check=False)
    assert placeholder.returncode == 2
    (line,) = error_lines(placeholder.stderr)
    assert PLACEHOLDER in line and "virt-dup init" in line
    missing = host.virt_dup("add-job", vm.name, "--encryption-key", "FEDCBA9876543210", check=False)
    assert missing.returncode == 2
    (line,) = error_lines(missing.stderr)
    assert "FEDCBA9876543210" in line and "is not in the GnuPG home" in line
    assert vm.domain.XMLDesc() == before


def test_export_key_alone_restores_on_a_fresh_host(hosts, make_domain, tmp_path) -> None:
    old = new_host(hosts)
    old.write_passphrase(PASSPHRASE)
    old.virt_dup("init", "--passphrase-file", str(old.passphrase_file))
    vm = prepared(make_domain, running=True)
    base, top = vm.images["vda"]
    job = old.virt_dup("add-job", vm.name).stdout.strip()
    old.virt_dup("run", job)
    view = guest_view(top, tmp_path / "view.qcow2")

    exported = old.root / "virt-dup-key.asc"
    old.virt_dup("export-key", "--output", str(exported))
    assert (exported.stat().st_mode & 0o777) == 0o600
    text = exported.read_text()
    assert "BEGIN PGP PRIVATE KEY BLOCK" in text and "BEGIN PGP PUBLIC KEY BLOCK" in text
    assert PASSPHRASE not in text  # the key stays protected by its passphrase
    # an existing file is never overwritten
    assert old.virt_dup("export-key", "--output", str(exported), check=False).returncode == 2
    # to standard output too
    assert "BEGIN PGP PRIVATE KEY BLOCK" in old.virt_dup("export-key").stdout

    # the host is lost: the domain, its images, the state (with the GnuPG home), the cache
    key_file = short_directory("vdk-key-") / "virt-dup-key.asc"
    shutil.copy(exported, key_file)
    vm.domain.destroy()
    # lost with the host: its checkpoints too
    vm.domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    old.stop_agents()
    for directory in (vm.directory, old.state, old.root / "cache"):
        shutil.rmtree(directory)
    assert not top.exists() and not old.gnupg_home.exists()

    # a fresh host: the example configuration, the key file and the passphrase
    fresh = new_host(hosts, backend=old.backend)
    fresh.write_passphrase(PASSPHRASE)
    try:
        imported = fresh.virt_dup(
            "init", "--import", str(key_file), "--passphrase-file", str(fresh.passphrase_file)
        )
    finally:
        shutil.rmtree(key_file.parent)
    fingerprint = old.environment().fingerprint
    assert f"key {fingerprint}" in imported.stdout and "imported" in imported.stdout
    assert gpg_secret_fingerprints(fresh.gnupg_home) == [fingerprint]
    assert fresh.settings()["encryption"]["keys"] == [fingerprint]
    assert fresh.virt_dup("check-config").returncode == 0

    backend = f"file://{old.backend}"
    (found,) = backups_json(fresh.environment(), "--backend", backend)
    assert found["job"] == job
    started = time.monotonic()
    restored = fresh.virt_dup("restore", vm.name, "--backend", backend, "--define")
    print(f"fresh-host restore from the exported key: {time.monotonic() - started:.1f} s")
    assert f"defined domain {vm.name}" in restored.stdout
    assert same_guest_view(top, view)
    assert [entry["filename"] for entry in chain_of(top)] == [str(top), str(base)]
