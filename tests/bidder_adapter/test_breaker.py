from __future__ import annotations

import pytest

from bidder_adapter.breaker import CircuitBreaker


def state(breaker: CircuitBreaker) -> str:
    # A call, not the attribute: mypy would keep the narrowing of one assert for the next.
    return breaker.state


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_n_consecutive_failures_and_half_opens_after_cool_down() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 10.0, clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    breaker.success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert state(breaker) == "open"
    assert not breaker.allow()
    clock.now += 9.99
    assert not breaker.allow()
    clock.now += 0.01
    assert state(breaker) == "half_open"
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # one probe at a time
    breaker.success()
    assert state(breaker) == "closed"
    assert breaker.allow()


def test_a_failed_probe_opens_again_for_a_full_cool_down() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 5.0, clock)
    breaker.allow()
    breaker.failure()
    clock.now += 5.0
    assert breaker.allow()
    breaker.failure()
    assert state(breaker) == "open"
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


@pytest.mark.parametrize(("threshold", "reset"), [(0, 1.0), (1, 0.0)])
def test_bad_settings_are_refused(threshold: int, reset: float) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - either message
        CircuitBreaker(threshold, reset)
