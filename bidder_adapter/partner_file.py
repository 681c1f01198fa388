"""The partner YAML file: parsed with positions, validated whole, errors as file:line:column.

The located parser is the rule files' (segment_rules.yaml_source), so both kinds of config
report problems the same way; the value checks are parse_partner_profiles', whose messages
name a path (`partners[1].segtax`) that we turn back into a position in the file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bidder_adapter.profiles import PartnerProfileError, PartnerProfiles, parse_partner_profiles
from segment_rules.errors import RuleError, RuleFileError
from segment_rules.yaml_source import Loc, YNode, parse_yaml

_INDEX: Final = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class PartnerConfig:
    """One whole, validated version of the partner file; swapped in as one object."""

    profiles: PartnerProfiles
    version: str  # sha256 of the file's bytes
    source: str

    @property
    def short_version(self) -> str:
        return self.version[:12]


def empty_config() -> PartnerConfig:
    return PartnerConfig(PartnerProfiles([]), hashlib.sha256(b"").hexdigest(), "<none>")


class PartnerFileError(ValueError):
    """The partner file was refused whole; `errors` point at file:line:column."""

    def __init__(self, errors: list[RuleError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def load_partner_file(path: Path) -> PartnerConfig:
    """Read and validate the file; raises PartnerFileError (OSError as one located error)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PartnerFileError([RuleError(str(path), 1, 1, f"cannot read: {exc}")]) from None
    return parse_partner_bytes(raw, str(path))


def parse_partner_bytes(raw: bytes, file: str) -> PartnerConfig:
    version = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PartnerFileError([RuleError(file, 1, 1, f"not UTF-8: {exc}")]) from None
    if not _has_content(text):
        raise PartnerFileError([RuleError(file, 1, 1, "the file is empty; expected 'partners:'")])
    try:
        root = parse_yaml(text, file)
    except RuleFileError as exc:
        raise PartnerFileError(exc.errors) from None
    try:
        profiles = parse_partner_profiles(root.plain(), file)
    except PartnerProfileError as exc:
        raise PartnerFileError([_located(root, message) for message in exc.messages]) from None
    except ValueError as exc:  # PartnerProfiles' own consistency checks
        raise PartnerFileError(
            [RuleError(file, root.loc.line, root.loc.column, str(exc))]
        ) from None
    return PartnerConfig(profiles, version, file)


def _has_content(text: str) -> bool:
    return any(
        line.strip() and not line.lstrip().startswith("#") and line.strip() not in ("---", "...")
        for line in text.splitlines()
    )


def _located(root: YNode, message: str) -> RuleError:
    path, sep, _ = message.partition(": ")
    loc = locate(root, path) if sep else root.loc
    return RuleError(loc.file, loc.line, loc.column, message)


def locate(root: YNode, path: str) -> Loc:
    """Where `path` (`partners[0].segment_id_map.806`) is in the file.

    A key is located at the key itself; a path that runs out (a missing key) at the
    nearest enclosing value, which is where the key should be added.
    """
    node, loc, rest = root, root.loc, "" if path == "<document>" else path
    while rest:
        if rest.startswith("."):
            rest = rest[1:]
        index = _INDEX.match(rest)
        if index is not None:
            items = node.value if node.is_sequence else None
            position = int(index.group(1))
            if items is None or position >= len(items):
                return loc
            node = items[position]
            loc = node.loc
            rest = rest[index.end() :]
            continue
        if not node.is_mapping:
            return loc
        key = _longest_key(node, rest)
        if key is None:
            return loc
        loc = node.key_locs[key]
        node = node.value[key]
        rest = rest[len(key) :]
    return loc


def _longest_key(node: YNode, rest: str) -> str | None:
    # Keys may hold dots (segment ids), so take the longest key that ends where a separator is.
    fits = [
        key
        for key in node.value
        if rest.startswith(key) and (len(rest) == len(key) or rest[len(key)] in ".[")
    ]
    return max(fits, key=len, default=None)
