"""Editing `relay.urls` in a node's `config.toml` (SPEC.md §3.11: the only config the CLI writes).

The file is edited in place, line by line, so the user's other settings and comments survive:
the `urls` line of the `[relay]` table is replaced (or the table is appended). The result is
parsed again and must hold exactly the intended list, else nothing is written.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path

from spt.core.errors import ConfigError

_TABLE = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$")
_URLS = re.compile(r"^\s*urls\s*=")


def read_urls(config_file: Path) -> list[str] | None:
    """`relay.urls` as written, or None when the file or the key is absent."""
    try:
        raw = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(config_file), f"is not valid TOML: {exc}") from exc
    urls = raw.get("relay", {}).get("urls") if isinstance(raw.get("relay"), dict) else None
    if urls is None:
        return None
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ConfigError("relay.urls", f"expected a list of relay URLs, got {urls!r}")
    return list(urls)


def write_urls(config_file: Path, urls: Sequence[str]) -> None:
    """Set `relay.urls` to `urls`, keeping everything else in the file."""
    try:
        text = config_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    line = f"urls = {json.dumps(list(urls))}"
    lines = text.splitlines()
    out: list[str] = []
    section: str | None = None
    seen_table = replaced = False
    skipping = False
    for current in lines:
        if skipping:  # the rest of a multi-line array we replaced
            if "]" in current.split("#", 1)[0]:
                skipping = False
            continue
        match = _TABLE.match(current)
        if match:
            if section == "relay" and not replaced:
                out.append(line)
                replaced = True
            section = match.group(1)
            seen_table = seen_table or section == "relay"
        elif section == "relay" and _URLS.match(current):
            if not replaced:
                out.append(line)
                replaced = True
            value = current.split("=", 1)[1].split("#", 1)[0]
            skipping = value.count("[") > value.count("]")
            continue
        out.append(current)
    if section == "relay" and not replaced:
        out.append(line)
        replaced = True
    if not seen_table:
        out += ["", "[relay]", line]
    new_text = "\n".join(out).lstrip("\n") + "\n"
    try:
        parsed = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(config_file), f"could not edit relay.urls safely ({exc}); edit it by hand") from None
    if parsed.get("relay", {}).get("urls") != list(urls):
        raise ConfigError(str(config_file), "relay.urls is written in a form this command cannot edit; edit it by hand")
    tmp = config_file.with_name(config_file.name + ".tmp")
    config_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(new_text)
    os.replace(tmp, config_file)
