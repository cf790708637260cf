"""A named backend as a mapping: its URL, its own retention, its password file."""

from __future__ import annotations

from pathlib import Path

import pytest

from virt_dup.config.load import parse_config
from virt_dup.errors import ConfigError

PATH = Path("/etc/virt-dup/virt-dup.yml")


def test_a_backend_may_carry_its_own_retention_and_password_file() -> None:
    config = parse_config(
        "backends:\n  local: file:///srv/b\n  offsite:\n    url: sftp://u@h//b\n"
        "    full_retention: 6\n    max_age: 1Y\n    password_file: /etc/virt-dup/offsite.pw\n",
        PATH,
    )
    assert config.backends == {"local": "file:///srv/b", "offsite": "sftp://u@h//b"}
    offsite = config.backend_settings_of("sftp://u@h//b")
    assert (offsite.retention.full_retention, offsite.retention.max_age) == (6, "1Y")
    assert offsite.retention.incremental_retention is None  # the job's
    assert offsite.password_file == Path("/etc/virt-dup/offsite.pw")
    assert config.backend_settings_of("file:///srv/b").retention.full_retention is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("    full_retention: 2\n", "backends.offsite.url: expected the backend's duplicity URL"),
        ("    url: sftp://u@h//b\n    retention: 2\n", "backends.offsite.retention: unknown key"),
        ("    url: sftp://u@h//b\n    full_retention: -1\n", "full_retention"),
        ("    url: sftp://u@h//b\n    password_file: relative\n", "an absolute path"),
        (
            "    url: sftp://u:pw@h//b\n    password_file: /etc/p\n",
            "no password in the URL when password_file or password_credential is set",
        ),
        ("    url: file:///srv/b\n", "a different URL for each backend"),
    ],
)
def test_bad_backend_entries_are_refused_with_one_line(entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"backends:\n  local: file:///srv/b\n  offsite:\n{entry}", PATH)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert "pw@" not in str(caught.value)


def test_a_password_may_come_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(
        "backends:\n  offsite:\n    url: sftp://u@h//b\n    password_credential: offsite-pw\n",
        PATH,
    )
    settings = config.backend_settings_of("sftp://u@h//b")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match=r"LoadCredential=offsite-pw:"):
        settings.password("backends.offsite")
    credential = tmp_path / "offsite-pw"
    credential.write_text("s3cret")
    credential.chmod(0o400)  # as systemd makes it
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert settings.password("backends.offsite") == "s3cret"


@pytest.mark.parametrize(
    "entry",
    [
        "    password_credential: ../etc/shadow\n",
        "    password_credential: a\n    password_file: /etc/p\n",
    ],
)
def test_bad_credential_entries(entry: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(f"backends:\n  offsite:\n    url: sftp://u@h//b\n{entry}", PATH)
