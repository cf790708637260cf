"""Changing virt-dup.yml the way its admin would: only the values asked for.

virt-dup.yml is the admin's file, with their comments and layout.  ruamel.yaml
reads it as a round-trip document (comments, order, quoting and flow style
kept), the values are set in place, and the result is validated by
:func:`virt_dup.config.load.parse_config` before it replaces the file
atomically, with the file's own mode.
"""

from __future__ import annotations

import copy
import io
import stat
from collections.abc import Mapping
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.tokens import CommentToken

from virt_dup.config.load import Config, parse_config
from virt_dup.errors import ConfigError
from virt_dup.files import write_atomically

#: Mode of a virt-dup.yml this creates (it names secret files, holds none).
NEW_FILE_MODE = 0o600


def _round_trip() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    # The layout of examples/virt-dup.yml: "keys:\n    - KEY" under "encryption:".
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096  # never fold a long line the admin wrote on one
    return yaml


def with_encryption(text: str, path: Path, values: Mapping[str, object]) -> tuple[str, Config]:
    """``text`` (a virt-dup.yml) with ``encryption.KEY`` set to each of ``values``
    (a list for ``keys``, text for the others), everything else as it was.

    Returns the new text and the configuration it loads as.  Raises
    :class:`ConfigError` when ``text`` is no YAML mapping, or the result would
    not load (then nothing may be written).
    """
    yaml = _round_trip()
    try:
        document = yaml.load(text) if text.strip() else None
    except YAMLError as error:
        raise ConfigError(f"{path}: cannot be edited: {error}") from None
    if document is None:
        document = CommentedMap()
    if not isinstance(document, CommentedMap):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    section = document.get("encryption")
    if section is None:
        section = CommentedMap()
        document["encryption"] = section
        if len(document) > 1:
            document.yaml_set_comment_before_after_key(
                "encryption", before="\nThe GPG keys duplicity uses (written by virt-dup init)."
            )
    if not isinstance(section, CommentedMap):
        raise ConfigError(f"{path}: encryption: expected a mapping, got {section!r}")
    added = [key for key in values if key not in section]
    # What follows the section's last value (commented-out keys, the next
    # section's comment) moves below the keys added after it.
    moved = _take_following_lines(section) if added and len(section) else None
    for key, value in values.items():
        section[key] = _value(section.get(key), value)
    if moved is not None:
        section.ca.items[added[-1]] = [None, None, moved, None]
    stream = io.StringIO()
    yaml.dump(document, stream)
    new_text = stream.getvalue()
    return new_text, parse_config(new_text, path)


def _take_following_lines(node: object) -> CommentToken | None:
    """Take the comment lines that follow the last value inside ``node`` (not an
    end-of-line comment, which stays with its line); None when there are none."""
    if isinstance(node, CommentedMap) and len(node):
        last: object = list(node)[-1]
        slot = 2
    elif isinstance(node, CommentedSeq) and len(node):
        last, slot = len(node) - 1, 0
    else:
        return None
    deeper = _take_following_lines(node[last])
    if deeper is not None:
        return deeper
    comments = node.ca.items.get(last)
    token = comments[slot] if comments and len(comments) > slot else None
    if not isinstance(token, CommentToken):
        return None
    end_of_line, _newline, following = token.value.partition("\n")
    if not following:
        return None
    moved = copy.copy(token)
    moved.value = "\n" + following
    token.value = end_of_line + "\n"
    return moved


def _value(old: object, new: object) -> object:
    """``new`` as it goes into the document: a list into the old list object when
    there is one (its style and comments stay), else as it is."""
    if isinstance(new, list | tuple):
        if isinstance(old, CommentedSeq):
            del old[len(new) :]
            for index, item in enumerate(new):
                if index < len(old):
                    old[index] = item
                else:
                    old.append(item)
            return old
        return CommentedSeq(new)
    return new


def update_encryption(path: Path, values: Mapping[str, object]) -> Config:
    """Set ``encryption.KEY`` in the file at ``path`` (created when missing) to
    each of ``values``; returns the configuration as it now loads.

    The file is replaced atomically with its own mode.  Raises
    :class:`ConfigError` (nothing written) when the file cannot be read or
    the result would not load.
    """
    try:
        text = path.read_text(encoding="utf-8")
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        text, mode = "", NEW_FILE_MODE
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    new_text, config = with_encryption(text, path, values)
    try:
        write_atomically(path, new_text, mode, directory_mode=0o755)
    except OSError as error:
        raise ConfigError(f"{path}: cannot write: {error.strerror}") from None
    return config
