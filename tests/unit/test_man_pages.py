"""The man pages and the example configuration never drift from the code.

* The JOB OPTIONS block of virt-dup(8) and virt-dup.yml(5) is what
  ``man/gen-options.py`` prints now (regenerate and compare).
* ``examples/virt-dup.yml`` loads without errors or notices and mentions every
  job option and every virt-dup.yml key.
* virt-dup.yml(5) documents every key and legacy spelling config.py accepts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from virt_dup.config import load as config_module
from virt_dup.config.load import load_config
from virt_dup.config.options import OPTIONS

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man"
GENERATOR = MAN / "gen-options.py"
PAGES = (MAN / "virt-dup.8", MAN / "virt-dup.yml.5")
EXAMPLE = ROOT / "examples" / "virt-dup.yml"
BEGIN = '.\\" BEGIN GENERATED JOB OPTIONS'
END = '.\\" END GENERATED JOB OPTIONS'


def generated_now() -> str:
    result = subprocess.run(
        [sys.executable, str(GENERATOR)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return result.stdout


def generated_block(page: Path) -> str:
    text = page.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1, f"{page.name}: expected one '{BEGIN}' line"
    assert text.count(END) == 1, f"{page.name}: expected one '{END}' line"
    start = text.index(BEGIN)
    stop = text.index(END) + len(END)
    return text[start:stop] + "\n"


def roff_plain(text: str) -> str:
    """Roff text with the escapes the pages use removed (for "is it mentioned")."""
    text = re.sub(r"\\f[BIRP]", "", text)
    return text.replace("\\-", "-").replace("\\%", "").replace("\\:", "").replace("\\&", "")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_job_options_section_is_generated_from_the_option_table(page: Path) -> None:
    expected = generated_now()
    assert generated_block(page) == expected, (
        f"{page.relative_to(ROOT)}: the JOB OPTIONS block differs from what "
        "man/gen-options.py prints; run "
        ".venv/bin/python man/gen-options.py --update man/virt-dup.8 man/virt-dup.yml.5"
    )


def test_generated_section_names_every_option_and_flag() -> None:
    text = roff_plain(generated_now())
    for option in OPTIONS:
        assert option.name in text
        assert option.command_line_flag in text
        assert option.description in text
        for legacy in option.legacy_names:
            assert legacy in text


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_page_renders_without_groff_warnings(page: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff not installed (Debian: groff-base)")
    result = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert result.stderr == ""


def test_man_page_documents_every_command() -> None:
    text = roff_plain((MAN / "virt-dup.8").read_text(encoding="utf-8"))
    for verb in (
        "add-job",
        "remove-job",
        "remove-all-jobs",
        "list-jobs",
        "jobs",
        "status",
        "check-config",
        "init",
        "export-key",
        "schedule explain",
        "backups",
        "restore",
        "verify",
        "help",
    ):
        assert verb in text, verb


def test_example_configuration_loads_cleanly() -> None:
    loaded = load_config(EXAMPLE)
    assert loaded.notices == ()
    assert loaded.path == EXAMPLE


def test_example_configuration_mentions_every_job_option() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for option in OPTIONS:
        assert re.search(rf"^\s*(?:#\s*)?{option.name}:", text, re.MULTILINE), (
            f"examples/virt-dup.yml does not mention defaults.{option.name}"
        )


def test_example_configuration_mentions_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = (
        *config_module._TOP_LEVEL,
        *config_module._LIBVIRT_KEYS,
        *config_module._ENCRYPTION_KEYS,
        *config_module._RESTORE_KEYS,
    )
    for key in keys:
        assert re.search(rf"^\s*(?:#\s*)?{key}:", text, re.MULTILINE), (
            f"examples/virt-dup.yml does not mention {key}"
        )


def test_configuration_page_documents_every_key_and_legacy_spelling() -> None:
    text = roff_plain((MAN / "virt-dup.yml.5").read_text(encoding="utf-8"))
    for key in config_module._TOP_LEVEL:
        assert re.search(rf"^\.BR? {key}\b", text, re.MULTILINE), f"no entry for {key}"
    for key in (
        *config_module._LIBVIRT_KEYS,
        *config_module._ENCRYPTION_KEYS,
        *config_module._RESTORE_KEYS,
    ):
        assert re.search(rf"^\.BR? {key}\b", text, re.MULTILINE), f"no entry for {key}"
    for legacy in (*config_module._LEGACY_TOP_LEVEL, *config_module._IGNORED_LEGACY):
        assert legacy in text, f"legacy spelling {legacy} is not documented"
