"""What the decision scripts answer, as values (no Redis here: policy code reads them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    reason: str  # budget_exceeded | killed | reservation_gone | state_store_unavailable
    window: str
    limit_nano: int
    used_nano: int
    resets_at: int  # epoch seconds, 0 = never
    first_in_window: bool = False  # the first refusal in this window (for webhooks)


@dataclass(frozen=True)
class LoopRefusal:
    kind: str  # loop | near_loop | velocity
    hit_count: int
    retry_after_ms: int


@dataclass(frozen=True)
class Reservation:
    granted_nano: int
    crossed_threshold: tuple[str, ...]  # windows that just crossed the alert threshold
