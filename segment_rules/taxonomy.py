"""The IAB Tech Lab Audience Taxonomy 1.1, loaded from its TSV (the user gives the path).

Format: tab-separated, the first column empty, then Unique ID, Parent ID, Condensed Name,
Tier 1..Tier 6 and Extension Notes; a header line first. Nothing here ships the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from segment_rules.errors import RuleError, RuleFileError

_HEADER_ID = "Unique ID"


@dataclass(frozen=True)
class TaxonomyNode:
    id: int
    parent: int | None
    tiers: tuple[str, ...]

    @property
    def name(self) -> str:
        """'Purchase Intent* | Automotive Ownership | New Vehicles'."""
        return " | ".join(self.tiers)


class Taxonomy:
    """Ids, names and the parent tree of one taxonomy version."""

    def __init__(self, nodes: dict[int, TaxonomyNode], source: str = "") -> None:
        self.nodes = nodes
        self.source = source
        self._children: dict[int, list[int]] = {}
        for node in nodes.values():
            if node.parent is not None:
                self._children.setdefault(node.parent, []).append(node.id)

    def __contains__(self, taxonomy_id: object) -> bool:
        return taxonomy_id in self.nodes

    def __len__(self) -> int:
        return len(self.nodes)

    def name(self, taxonomy_id: int) -> str:
        return self.nodes[taxonomy_id].name

    def children(self, taxonomy_id: int) -> list[int]:
        return list(self._children.get(taxonomy_id, ()))

    def descendants(self, taxonomy_id: int) -> frozenset[int]:
        """The id itself and every id below it."""
        found: set[int] = set()
        stack = [taxonomy_id]
        while stack:
            current = stack.pop()
            if current in found:
                continue
            found.add(current)
            stack.extend(self._children.get(current, ()))
        return frozenset(found)

    def ancestors(self, taxonomy_id: int) -> Iterator[int]:
        parent = self.nodes[taxonomy_id].parent
        while parent is not None and parent in self.nodes:
            yield parent
            parent = self.nodes[parent].parent


def load_taxonomy(path: str | Path) -> Taxonomy:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError([RuleError(str(p), 1, 1, f"cannot read the taxonomy: {exc}")]) from None
    return parse_taxonomy(text, str(p))


def parse_taxonomy(text: str, file: str = "<taxonomy>") -> Taxonomy:
    """Parse the TSV; every malformed line is reported with its number."""
    nodes: dict[int, TaxonomyNode] = {}
    errors: list[RuleError] = []
    parents: dict[int, tuple[int, int]] = {}  # id -> (parent, line)
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        cells = [c.strip() for c in raw.split("\t")]
        if len(cells) < 5:
            errors.append(
                RuleError(file, number, 1, "expected tab-separated IAB Audience Taxonomy columns")
            )
            continue
        if cells[1] == _HEADER_ID:
            continue
        try:
            node_id = int(cells[1])
            parent = int(cells[2]) if cells[2] else None
        except ValueError:
            errors.append(
                RuleError(file, number, 1, f"ids must be whole numbers, got {cells[1:3]!r}")
            )
            continue
        if node_id in nodes:
            errors.append(RuleError(file, number, 1, f"duplicate taxonomy id {node_id}"))
            continue
        tiers = tuple(c for c in cells[4:10] if c)
        if not tiers:
            tiers = tuple(p for p in (s.strip() for s in cells[3].split("|")) if p)
        nodes[node_id] = TaxonomyNode(node_id, parent, tiers)
        if parent is not None:
            parents[node_id] = (parent, number)
    for node_id, (parent, number) in parents.items():
        if parent not in nodes:
            errors.append(
                RuleError(file, number, 1, f"id {node_id} names parent {parent}, which is absent")
            )
    if not nodes and not errors:
        errors.append(RuleError(file, 1, 1, "the taxonomy file has no rows"))
    if errors:
        raise RuleFileError(errors)
    return Taxonomy(nodes, file)
