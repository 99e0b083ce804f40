"""Budget windows reset on the hour and at midnight UTC: a test whose spend straddles a reset
would see it vanish. Tests that spend against wall-clock windows start clear of the edge."""

from __future__ import annotations

import time

from signalbox.core.budget import HOUR


def clear_of_the_hour_edge(needed: float = 60.0) -> None:
    """Sleep past the next full hour if fewer than `needed` seconds are left before it."""
    left = HOUR - time.time() % HOUR
    if left < needed:
        time.sleep(left + 1)


def clear_of_the_minute_edge(needed: float = 15.0) -> None:
    """Sleep past the next full minute if fewer than `needed` seconds are left before it
    (requests and tokens per minute count in calendar minutes)."""
    left = 60 - time.time() % 60
    if left < needed:
        time.sleep(left + 0.5)
