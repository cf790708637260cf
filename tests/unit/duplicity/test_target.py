"""One job's duplicity target: its collection URL, keys, cache, passphrase and masking.

Configs are parsed from YAML text as virt-dup.yml would hold them; the
passphrase file is a real file in tmp_path (its mode is what is checked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from virt_dup.config.load import Config, parse_config, read_passphrase
from virt_dup.config.options import JobOptions
from virt_dup.duplicity.target import (
    Target,
    environment,
    isolated,
    job_backend_url,
    job_target,
    secrets,
    split_password,
)
from virt_dup.errors import ConfigError

JOB = "0e1f2a3b-1111-4222-8333-444455556666"
CONFIGURED_KEY = "0123456789ABCDEF0123456789ABCDEF01234567"
JOB_KEY = "AAAAAAAABBBBBBBB"
CACHE = Path("/var/cache/virt-dup-test")


def config_with(encryption: str = "", path: Path = Path("/etc/virt-dup/virt-dup.yml")) -> Config:
    text = f"cache_dir: {CACHE}\nbackends:\n  local: file:///srv/backups\n"
    if encryption:
        text += f"encryption:\n{encryption}"
    return parse_config(text, path)


def effective(config: Config, **options: Any) -> JobOptions:
    """The job's options over the config's defaults, as a run computes them."""
    return JobOptions(**options).over(config.defaults)


# -- the job's collection ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend", ["file:///srv/backups", "file:///srv/backups/", "sftp://u@h//srv/b//"]
)
def test_each_job_is_a_directory_named_by_its_uuid(backend: str) -> None:
    assert job_backend_url(backend, JOB) == backend.rstrip("/") + "/" + JOB


def test_a_gpg_job_target_from_the_config() -> None:
    config = config_with(
        f"  keys: [{CONFIGURED_KEY}]\n  sign_key: '0xcccccccc'\n  gnupg_home: /etc/virt-dup/gnupg\n"
    )

    target = job_target(config, JOB, effective(config, backends=("local",)), "file:///srv/backups")

    assert target.url == f"file:///srv/backups/{JOB}"
    assert target.name == JOB
    assert target.archive_dir == CACHE  # duplicity keeps <archive_dir>/<name>
    assert target.tempdir == CACHE / JOB  # volumes are staged in the job's own cache
    assert target.encryption == "gpg"
    assert target.encrypt_keys == (CONFIGURED_KEY,)
    assert target.sign_key == "CCCCCCCC"
    assert target.gnupg_home == Path("/etc/virt-dup/gnupg")
    assert target.passphrase is None


def test_the_jobs_own_keys_win_over_the_configs() -> None:
    config = config_with(f"  keys: [{CONFIGURED_KEY}]\n")
    options = effective(config, encryption_keys=(JOB_KEY,))
    assert job_target(config, JOB, options, "file:///b").encrypt_keys == (JOB_KEY,)


def test_encryption_none_uses_no_keys() -> None:
    config = config_with(f"  keys: [{CONFIGURED_KEY}]\n  sign_key: CCCCCCCC\n")
    options = effective(config, encryption="none", encryption_keys=(JOB_KEY,))

    target = job_target(config, JOB, options, "file:///b")

    assert (target.encryption, target.encrypt_keys, target.sign_key) == ("none", (), None)
    assert "PASSPHRASE" not in environment(target)


def test_a_gpg_job_without_keys_cannot_write() -> None:
    path = Path("/etc/virt-dup/site.yml")
    config = config_with(path=path)
    with pytest.raises(ConfigError) as caught:
        job_target(config, JOB, effective(config), "file:///b")
    message = str(caught.value)
    assert message.startswith(f"job {JOB}: backups are encrypted (encryption: gpg)")
    assert str(path) in message
    assert "\n" not in message


def test_reading_needs_no_recipient_key(tmp_path: Path) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("secret key passphrase\n")
    passphrase.chmod(0o600)
    config = config_with(f"  passphrase_file: {passphrase}\n")

    target = job_target(config, JOB, effective(config), "file:///b", writing=False)

    assert (target.encryption, target.encrypt_keys) == ("gpg", ())
    assert target.passphrase == "secret key passphrase"
    assert environment(target)["PASSPHRASE"] == "secret key passphrase"


def test_an_isolated_target_has_a_cache_of_its_own(tmp_path: Path) -> None:
    config = config_with(f"  keys: [{CONFIGURED_KEY}]\n")
    target = job_target(config, JOB, effective(config, backends=("local",)), "file:///srv/backups")

    alone = isolated(target, tmp_path / "scratch-cache")

    assert (alone.archive_dir, alone.tempdir) == (
        tmp_path / "scratch-cache",
        tmp_path / "scratch-cache" / JOB,
    )
    assert (alone.url, alone.name, alone.encrypt_keys) == (
        target.url,
        target.name,
        target.encrypt_keys,
    )
    assert target.archive_dir == CACHE  # the original is unchanged


def test_each_backend_of_a_job_has_a_cache_of_its_own() -> None:
    """duplicity makes a cache match the backend it is given: the job's first backend
    keeps the plain job uuid (the caches made before several backends existed), every
    other backend gets one named by its URL (not by its password)."""
    config = config_with(f"  keys: [{CONFIGURED_KEY}]\n")
    options = effective(config, backends=("local", "sftp://u@h/b"))
    first = job_target(config, JOB, options, "file:///srv/backups")
    other = job_target(config, JOB, options, "sftp://u@h/b")
    same_other = job_target(config, JOB, options, "sftp://u:pw@h/b")
    assert first.name == JOB and first.tempdir == CACHE / JOB
    assert other.name.startswith(JOB + ".") and other.name != first.name
    assert other.tempdir == CACHE / other.name
    assert same_other.name == other.name


def test_a_password_file_gives_the_backend_password(tmp_path: Path) -> None:
    password = tmp_path / "offsite.password"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    config = parse_config(
        f"cache_dir: {CACHE}\nencryption:\n  keys: [{CONFIGURED_KEY}]\nbackends:\n"
        f"  offsite:\n    url: sftp://backup@host/b\n    password_file: {password}\n"
        "    full_retention: 6\n",
        Path("/etc/virt-dup/virt-dup.yml"),
    )
    target = job_target(config, JOB, effective(config), "sftp://backup@host/b")
    assert environment(target)["FTP_PASSWORD"] == "s3cret"
    assert secrets(target) == ("s3cret",)
    assert "s3cret" not in repr(target)
    assert config.backend_settings_of("sftp://backup@host/b").retention.full_retention == 6
    password.chmod(0o640)
    with pytest.raises(ConfigError, match="readable by others"):
        job_target(config, JOB, effective(config), "sftp://backup@host/b")


# -- passwords in URLs -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "plain", "password"),
    [
        ("sftp://backup:s3cret@host//srv/b", "sftp://backup@host//srv/b", "s3cret"),
        ("sftp://backup:s3cret@host:2222/srv", "sftp://backup@host:2222/srv", "s3cret"),
        ("ftp://:s3cret@host/b", "ftp://host/b", "s3cret"),
        ("sftp://backup@host//srv/b", "sftp://backup@host//srv/b", None),
        ("file:///srv/backups", "file:///srv/backups", None),
    ],
)
def test_split_password(url: str, plain: str, password: str | None) -> None:
    assert split_password(url) == (plain, password)


def test_the_password_goes_to_the_environment_only() -> None:
    target = Target(
        url="sftp://backup:s3cret@host//srv/b", archive_dir=CACHE, name=JOB, encryption="none"
    )
    assert target.display_url == "sftp://backup:***@host//srv/b"
    assert environment(target)["FTP_PASSWORD"] == "s3cret"
    assert secrets(target) == ("s3cret",)
    plain = Target(url="sftp://backup@host//srv/b", archive_dir=CACHE, name=JOB, encryption="none")
    assert plain.display_url == "sftp://backup@host//srv/b"
    assert "FTP_PASSWORD" not in environment(plain)


def test_a_gpg_target_error_never_shows_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        Target(url="sftp://backup:s3cret@host//srv/b", archive_dir=CACHE, name=JOB)
    assert "s3cret" not in str(caught.value)
    assert "sftp://backup:***@host//srv/b" in str(caught.value)


def test_display_url_masks_only_the_password() -> None:
    target = Target(url="sftp://u:s@host/srv", archive_dir=CACHE, name=JOB, encryption="none")
    assert target.display_url == "sftp://u:***@host/srv"


def test_a_percent_encoded_password_reaches_duplicity_decoded() -> None:
    """duplicity unquotes a password in the URL but takes FTP_PASSWORD as it is."""
    target = Target(url="sftp://u:p%40ss@host/srv", archive_dir=CACHE, name=JOB, encryption="none")
    assert environment(target)["FTP_PASSWORD"] == "p@ss"


# -- the passphrase file --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610])
def test_a_passphrase_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("secret\n")
    passphrase.chmod(mode)
    config = config_with(f"  passphrase_file: {passphrase}\n")

    with pytest.raises(ConfigError) as caught:
        read_passphrase(config)

    message = str(caught.value)
    assert message == (
        f"{passphrase}: the passphrase file is readable by others (mode {mode:o}); chmod 600 it"
    )
    assert "secret" not in message.replace(str(passphrase), "")
    with pytest.raises(ConfigError, match="readable by others"):
        job_target(config, JOB, effective(config, encryption="none"), "file:///b")


def test_a_0600_passphrase_file_is_read_without_its_newline(tmp_path: Path) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    config = config_with(f"  passphrase_file: {passphrase}\n")

    assert read_passphrase(config) == "correct horse battery staple"
    passphrase.write_text("  spaces kept  ")
    assert read_passphrase(config) == "  spaces kept  "


def test_no_passphrase_file_means_no_passphrase(tmp_path: Path) -> None:
    assert read_passphrase(config_with()) is None
    missing = config_with(f"  passphrase_file: {tmp_path / 'missing'}\n")
    with pytest.raises(ConfigError, match="cannot read the passphrase file"):
        read_passphrase(missing)
