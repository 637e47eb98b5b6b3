"""Server-sent events framing, shared by every streaming route: events, the final error event,
and keep-alive comments while a request waits in the queue or prefills."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import anyio
from pydantic import BaseModel

from serve_app.api.errors import ApiError, to_api_error

T = TypeVar("T")

DONE = "data: [DONE]\n\n"
KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see traffic


def event(payload: BaseModel) -> str:
    """One server-sent event."""
    return f"data: {payload.model_dump_json()}\n\n"


async def framed(
    chunks: AsyncIterator[BaseModel],
    source: AsyncIterator[Any],
    request_id: str,
    on_close: Callable[[], Awaitable[None]] | None = None,
    error_event: Callable[[ApiError], BaseModel] = ApiError.body,
) -> AsyncIterator[str]:
    """One event per chunk, then ``[DONE]``.

    An error after the stream has begun goes out as one final error event (the error shape,
    or what ``error_event`` makes of it), then the stream closes: the status line was already
    sent. Closing this closes ``source``, which cancels generation when the client went away.
    """
    try:
        async for chunk in chunks:
            yield event(chunk)
        yield DONE
    except Exception as exc:
        yield event(error_event(to_api_error(exc, request_id)))
    finally:
        await source.aclose()  # type: ignore[attr-defined]
        if on_close is not None:
            await on_close()


async def with_keep_alive(events: AsyncIterator[str], interval_s: float) -> AsyncIterator[str]:
    """``events``, with a ``: keep-alive`` comment every ``interval_s`` until the first one comes
    (the request waits in the queue or prefills); from then on they pass straight through, as
    decode steps are frequent and a timed read costs each event ~20 us.

    Closing this (the client went away) cancels the pending read and closes ``events``.
    """
    first: asyncio.Future[str] = asyncio.ensure_future(anext(events))
    pending: asyncio.Future[str] | None = first
    try:
        while not first.done():
            await asyncio.wait({first}, timeout=interval_s)
            if not first.done():
                yield KEEP_ALIVE
        pending = None
        try:
            item = first.result()
        except StopAsyncIteration:
            return
        yield item
        async for item in events:
            yield item
    finally:
        # Shielded: when the response was cancelled, Starlette's task group would cancel every
        # await here, and generation would be cancelled only after this returned.
        with anyio.CancelScope(shield=True):
            if pending is not None:
                pending.cancel()
                await asyncio.wait({pending})
            await events.aclose()  # type: ignore[attr-defined]


class DeferredStream(Generic[T]):
    """The items of a stream whose start had not come back when its response began: the first
    read waits for it, and a failure to start raises there (so it goes out as an error event)."""

    def __init__(self, started: asyncio.Task[tuple[bool, AsyncIterator[T]]]) -> None:
        self._started = started
        self._items: AsyncIterator[T] | None = None

    def __aiter__(self) -> DeferredStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._items is None:
            _, self._items = await self._started
        return await anext(self._items)

    async def aclose(self) -> None:
        """Cancel the start if it is still under way, else close the stream it gave."""
        if self._items is None:
            await _discard(self._started)
        else:
            await self._items.aclose()  # type: ignore[attr-defined]


async def _discard(started: asyncio.Task[tuple[bool, AsyncIterator[Any]]]) -> None:
    """Cancel a stream's start, or close the stream if it had started; shielded, so that
    generation has stopped when this returns even if the caller is being cancelled."""
    with anyio.CancelScope(shield=True):
        started.cancel()
        await asyncio.wait({started})
        if not started.cancelled() and started.exception() is None:
            _, items = started.result()
            await items.aclose()  # type: ignore[attr-defined]


async def started_within(
    start: Coroutine[Any, Any, tuple[bool, AsyncIterator[T]]], timeout_s: float
) -> tuple[bool, AsyncIterator[T]]:
    """``start``'s (cache hit, stream) if it comes back within ``timeout_s`` (its errors are then
    raised here, before any response), else (False, a ``DeferredStream`` of it): the response
    begins and keep-alive comments flow while the request waits in the queue or prefills."""
    started = asyncio.ensure_future(start)
    try:
        done, _ = await asyncio.wait({started}, timeout=timeout_s)
    except BaseException:
        await _discard(started)
        raise
    if done:
        return started.result()
    return False, DeferredStream(started)
