"""Load shedding at the ingress: an exact count of one model's generation streams in flight.

Serve's ``max_queued_requests`` bound on the Batcher is checked before the request is counted
as queued, so a burst arriving at once passes it together (docs/OPERATIONS.md, How to size
queues). This gate counts in the ingress's event loop, where no two requests can interleave,
and refuses before the rate limiter or the response cache is called, so a refusal costs the
least it can.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from serve_app.api.errors import at_capacity

RETRY_AFTER_S = 1


class AdmissionGate:
    """At most ``limit`` generation streams of one model in flight from this ingress replica
    (None: no bound); past it, requests are refused at once with 503 + ``Retry-After``."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"an admission limit is at least 1, got {limit}")
        self.limit = limit
        self.in_flight = 0

    def check(self) -> None:
        """Refuse now if the gate is full (before any work is spent on the request)."""
        if self.limit is not None and self.in_flight >= self.limit:
            raise at_capacity(RETRY_AFTER_S)

    @contextmanager
    def hold(self, streams: int) -> Iterator[None]:
        """Hold ``streams`` places while the body runs. A request wider than the whole limit
        is let in alone, so that it is slow under load rather than never served."""
        if self.limit is not None and self.in_flight and self.in_flight + streams > self.limit:
            raise at_capacity(RETRY_AFTER_S)
        self.in_flight += streams
        try:
            yield
        finally:
            self.in_flight -= streams
