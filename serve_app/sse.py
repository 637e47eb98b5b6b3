"""Server-sent events framing, shared by every streaming route."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from serve_app.errors import to_api_error

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel) -> str:
    """One server-sent event."""
    return f"data: {payload.model_dump_json()}\n\n"


async def framed(
    chunks: AsyncIterator[BaseModel],
    source: AsyncIterator[Any],
    request_id: str,
    on_close: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[str]:
    """One event per chunk, then ``[DONE]``.

    An error after the stream has begun goes out as one final error event, then the stream
    closes: the status line was already sent. Closing this closes ``source``, which cancels
    generation when the client went away.
    """
    try:
        async for chunk in chunks:
            yield event(chunk)
        yield DONE
    except Exception as exc:
        yield event(to_api_error(exc, request_id).body())
    finally:
        await source.aclose()  # type: ignore[attr-defined]
        if on_close is not None:
            await on_close()


def streaming_response(body: AsyncIterator[str], headers: dict[str, str]) -> StreamingResponse:
    """A ``text/event-stream`` response."""
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)
