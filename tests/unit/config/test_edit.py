"""virt-dup.yml edited by init: only the values asked for change (ruamel.yaml round trip)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from virt_dup.config.edit import update_encryption, with_encryption
from virt_dup.config.load import PLACEHOLDER_KEY, load_config
from virt_dup.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "virt-dup.yml"
KEY = "9CCFB781F2B8846A774E2032F5D9DCA16307D84A"
VALUES = {
    "keys": [KEY],
    "gnupg_home": "/var/lib/virt-dup/gnupg",
    "passphrase_file": "/etc/virt-dup/gpg-passphrase",
}


def changed_lines(before: str, after: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="")
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]


def test_the_example_keeps_every_comment_and_line_but_the_key() -> None:
    before = EXAMPLE.read_text()
    after, config = with_encryption(before, EXAMPLE, VALUES)
    assert changed_lines(before, after) == [
        f"-    - {PLACEHOLDER_KEY}",
        f"+    - {KEY}",
        "+  gnupg_home: /var/lib/virt-dup/gnupg",
        "+  passphrase_file: /etc/virt-dup/gpg-passphrase",
    ]
    assert config.encryption.keys == (KEY,)
    assert config.encryption.gnupg_home == Path("/var/lib/virt-dup/gnupg")


def test_values_set_already_are_replaced_where_they_are() -> None:
    before = "encryption:\n  gnupg_home: /old  # mine\n  keys: [AAAAAAAA]\nscope: system\n"
    after, _config = with_encryption(before, Path("/c.yml"), {"keys": [KEY], "gnupg_home": "/g"})
    assert after == f"encryption:\n  gnupg_home: /g    # mine\n  keys: [{KEY}]\nscope: system\n"


def test_a_file_without_encryption_gets_the_section_at_its_end() -> None:
    before = "# my host\nbackends:\n  local: file:///srv/b\n"
    after, config = with_encryption(before, Path("/c.yml"), {"keys": [KEY]})
    assert after.startswith(before)
    assert config.backends == {"local": "file:///srv/b"}
    assert config.encryption.keys == (KEY,)


def test_a_result_that_would_not_load_is_refused() -> None:
    with pytest.raises(ConfigError, match="gnupg_home: expected an absolute path"):
        with_encryption("scope: system\n", Path("/c.yml"), {"gnupg_home": "relative"})


def test_the_file_is_replaced_with_its_own_mode(tmp_path: Path) -> None:
    path = tmp_path / "virt-dup.yml"
    path.write_text(EXAMPLE.read_text())
    path.chmod(0o640)
    update_encryption(path, VALUES)
    assert path.stat().st_mode & 0o777 == 0o640
    assert load_config(path).encryption.keys == (KEY,)
    assert [entry.name for entry in tmp_path.iterdir()] == ["virt-dup.yml"]


def test_a_missing_file_is_made_root_only(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "virt-dup.yml"
    update_encryption(path, {"keys": [KEY]})
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_config(path).encryption.keys == (KEY,)
