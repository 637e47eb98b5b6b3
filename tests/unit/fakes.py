"""Test doubles shared by the unit tests."""

from __future__ import annotations

import asyncio
from typing import Any


class HangingResponse:
    """A handle response whose replica never answers."""

    def __init__(self) -> None:
        self.cancelled = False

    def __await__(self) -> Any:
        return asyncio.get_running_loop().create_future().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class HangingHandle:
    """A deployment handle whose every call hangs; it records the calls made."""

    def __init__(self) -> None:
        self.responses: list[HangingResponse] = []

    def __getattr__(self, method: str) -> Any:
        handle = self

        class _Method:
            def remote(self, *args: Any) -> HangingResponse:
                handle.responses.append(HangingResponse())
                return handle.responses[-1]

        return _Method()
