"""Redis keys of one destination's export state."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DestinationKeys:
    """One destination's state shares a hash tag, so its commit is one transaction."""

    prefix: str
    state_prefix: str
    partner_id: str

    @property
    def tag(self) -> str:
        return f"{self.prefix}:{{{self.state_prefix}:{self.partner_id}}}"

    @property
    def cursor(self) -> str:
        """Hash: change-stream key -> last exported entry id; `#seq` -> last batch number;
        `#live` -> the live segments the destination exports under (JSON list)."""
        return f"{self.tag}:cursor"

    @property
    def pending(self) -> str:
        """Hash: the batch written but not yet known to be delivered (seq, body, cursors)."""
        return f"{self.tag}:pending"

    @property
    def switch(self) -> str:
        """Hash: a switch of live sets under way (old, new, cut per stream, chunks, next)."""
        return f"{self.tag}:switch"

    def switch_chunk(self, n: int) -> str:
        """JSON list of the switch's partner changes, one batch's worth: [uid, add, remove]."""
        return f"{self.tag}:switch:{n}"

    @property
    def switch_building(self) -> str:
        """Chunks of a switch being stored so far (gone once ``switch`` is written)."""
        return f"{self.tag}:switch:building"
