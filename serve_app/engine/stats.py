"""What one engine step did, for metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepStats:
    """Occupancy after a step and the work it did."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    decoded: int  # sequences that got a token from the decode pass
    queue_times_s: list[float] = field(default_factory=list)  # of the admitted sequences
    prefix_cache_queries: int = 0  # prompt tokens of admitted sequences looked up for reuse
    prefix_cache_hits: int = 0  # of those, tokens whose KV was reused
