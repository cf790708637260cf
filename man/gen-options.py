#!/usr/bin/env python3
"""Print the roff of the job option table (virt_dup.config.options.OPTIONS).

virt-dup(8) and virt-dup.yml(5) carry this output between the lines
``.\\" BEGIN GENERATED JOB OPTIONS`` and ``.\\" END GENERATED JOB OPTIONS``;
tests/unit/test_man_pages.py fails when they differ from what this script
prints now.  After changing the option table, refresh both pages with::

    .venv/bin/python man/gen-options.py --update man/virt-dup.8 man/virt-dup.yml.5
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from virt_dup.config.options import BUILTIN_DEFAULTS, OPTIONS, Option, format_value

BEGIN = '.\\" BEGIN GENERATED JOB OPTIONS (man/gen-options.py): do not edit by hand'
END = '.\\" END GENERATED JOB OPTIONS'


def escape(text: str) -> str:
    """Text safe on a roff text line: backslashes kept, minus signs and flags as minus."""
    text = text.replace("\\", "\\e")
    # A hyphen that starts a word is a minus sign or a flag (-N, --depth):
    # write it as \- so it renders (and copies) as an ASCII minus.
    text = re.sub(r"(?:(?<=^)|(?<=[\s(=]))-+", lambda m: "\\-" * len(m.group(0)), text)
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def metavar(option: Option) -> str:
    """Upper-case metavars are placeholders (italic); lower-case ones literal words (bold)."""
    font = "I" if option.metavar == option.metavar.upper() else "B"
    return f"\\f{font}{escape(option.metavar)}\\fR"


def default_text(option: Option) -> str:
    value = getattr(BUILTIN_DEFAULTS, option.name)
    if value is None:
        return "not set"
    return f"\\fB{escape(format_value(value))}\\fR"


def render() -> str:
    lines = [BEGIN]
    for option in OPTIONS:
        lines.append(".TP")
        lines.append(f"\\fB\\%{option.name}\\fR = {metavar(option)}")
        lines.append(escape(option.description))
        lines.append(".br")
        lines.append(".na")
        flag_text = option.command_line_flag.replace("-", "\\-")
        flag = f"add\\-job flag: \\fB\\%{flag_text}\\fR {metavar(option)}"
        if option.repeatable:
            flag += (
                " (once per value; in XML a comma-separated list,"
                " in YAML a list or a comma-separated string)"
            )
        lines.append(flag)
        lines.append(".br")
        lines.append(f'Example: \\fB\\%{option.name}=\\:"{escape(option.example)}"\\fR')
        lines.append(".br")
        lines.append(f"Built-in default: {default_text(option)}")
        if option.legacy_names:
            lines.append(".br")
            names = ", ".join(f"\\fB\\%{name}\\fR" for name in option.legacy_names)
            lines.append(f"Also read as {names} (an older spelling; never written)")
        lines.append(".ad")
    lines.append(END)
    return "\n".join(lines) + "\n"


def generated_section(page: str) -> str | None:
    """The generated block of a man page's text (markers included), or None."""
    start = page.find(BEGIN)
    stop = page.find(END, start)
    if start < 0 or stop < 0:
        return None
    return page[start : stop + len(END)] + "\n"


def update(path: Path) -> bool:
    """Replace the generated block of ``path``; True when the file changed."""
    page = path.read_text(encoding="utf-8")
    old = generated_section(page)
    if old is None:
        raise SystemExit(f"{path}: no generated job option block (markers missing)")
    new_page = page.replace(old, render(), 1)
    if new_page == page:
        return False
    path.write_text(new_page, encoding="utf-8")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--update",
        nargs="+",
        metavar="PAGE",
        type=Path,
        help="rewrite the generated block of these man pages instead of printing",
    )
    arguments = parser.parse_args()
    if not arguments.update:
        sys.stdout.write(render())
        return 0
    for path in arguments.update:
        print(f"{path}: {'updated' if update(path) else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
