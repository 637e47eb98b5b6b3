"""Request coalescing: identical requests in flight share one generation.

The first request of a key starts a *flight*: its stream runs in a task of its own, and every
item is kept. A request with the same key arriving while the flight runs follows it from its
first item (a late joiner replays what came before, then gets items as they come), so N
identical requests cost one generation. The flight belongs to no one caller: a follower that
goes away leaves the others be, and the generation stops only when the last one has gone. A
flight that fails gives every follower the same error (each of them would have met it too;
the error says whether to retry). Once a flight ends, its key is free: the next identical
request starts a new one (or, for the service, is answered by the response cache).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Generic, TypeVar

T = TypeVar("T")


class FlightCancelled(RuntimeError):
    """The shared generation was cancelled while followers still waited (shutdown)."""


class Coalescer(Generic[T]):
    """Streams by key, one generation per key at a time. Per process, in memory."""

    def __init__(self, on_join: Callable[[], None] = lambda: None) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self._on_join = on_join  # called for each request that joins a flight in progress

    def stream(self, key: str, start: Callable[[], AsyncIterator[T]]) -> AsyncGenerator[T, None]:
        """The items of ``key``'s generation from its first: the one in flight, or a new one
        ``start()`` begins. Iterate it at once and close it when done (``aclose``): the last
        follower to go stops the generation."""
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(start(), on_end=lambda: self._end(key, flight))
            self._flights[key] = flight
        else:
            self._on_join()
        flight.followers += 1  # counted now, so a flight is never stopped under a new follower
        return _follow(flight)

    def in_flight(self) -> int:
        """Generations running now."""
        return len(self._flights)

    def _end(self, key: str, flight: _Flight[T] | None) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]


class _Flight(Generic[T]):
    """One generation and everything it has yielded so far."""

    def __init__(self, source: AsyncIterator[T], on_end: Callable[[], None]) -> None:
        self.items: list[T] = []
        self.error: BaseException | None = None
        self.done = False
        self.followers = 0
        self._on_end = on_end
        self._changed = asyncio.Event()
        # A fresh context: Serve ties the calls a request makes to that request and cancels
        # them when its client goes away; this generation serves every follower, not just the
        # first. Closing the source when the last follower leaves cancels them instead.
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._pump(source), context=contextvars.Context())

    async def wait_for_change(self) -> None:
        """Until a new item, or the end, arrives."""
        await self._changed.wait()

    async def leave(self) -> None:
        """A follower is done; the last one to go stops a generation still running."""
        self.followers -= 1
        if self.followers == 0 and not self.done:
            self._task.cancel()
            await asyncio.wait({self._task})

    async def _pump(self, source: AsyncIterator[T]) -> None:
        try:
            async with aclosing(source):  # type: ignore[type-var]
                async for item in source:
                    self.items.append(item)
                    self._wake()
        except asyncio.CancelledError:
            self.error = FlightCancelled("the shared generation was cancelled")
            raise
        except Exception as exc:  # every follower re-raises it
            self.error = exc
        finally:
            self.done = True
            self._on_end()
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


async def _follow(flight: _Flight[T]) -> AsyncGenerator[T, None]:
    """One follower's view of a flight: every item from the first, then its end or error.
    An async generator, so that one dropped unclosed still leaves when it is collected."""
    try:
        following = 0
        while True:
            while following >= len(flight.items):
                if flight.done:
                    if flight.error is not None:
                        raise flight.error
                    return
                await flight.wait_for_change()
            yield flight.items[following]
            following += 1
    finally:
        await flight.leave()
