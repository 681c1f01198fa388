"""A circuit breaker: after N failures in a row stop calling; after a cool-down, probe once.

closed --N consecutive failures--> open --cool-down elapsed--> half-open
half-open --probe succeeds--> closed;  half-open --probe fails--> open (cool-down again)
While open, and while a half-open probe is in flight, callers get "no" at once: at bid
time an empty answer now is worth more than a late one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, Literal

State = Literal["closed", "open", "half_open"]
STATE_VALUES: Final[dict[State, int]] = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        reset_after_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_after_seconds <= 0:
            raise ValueError("reset_after_seconds must be > 0")
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after_seconds
        self.clock = clock
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> State:
        if self._state == "open" and self.clock() - self._opened_at >= self.reset_after:
            return "half_open"
        return self._state

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open, only one (the probe) at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probing:
            return False
        self._state = "half_open"
        self._probing = True
        return True

    def success(self) -> None:
        self._state = "closed"
        self._failures = 0
        self._probing = False

    def failure(self) -> None:
        self._probing = False
        if self._state == "half_open":
            self._open()
            return
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._state = "open"
        self._opened_at = self.clock()
        self._failures = 0
