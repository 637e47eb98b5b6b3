"""A deployment-handle double that calls a deployment's Python object in the caller's event loop.

``LocalHandle(obj).method.remote(*args)`` runs ``obj.method(*args)`` as Serve's
``DeploymentHandle`` would on a replica, minus Ray: the call starts at ``remote()``, awaiting the
response gives its result (or raises its exception), and ``cancel()`` cancels it.
``.options(stream=True)`` makes calls return the stream an async generator method yields.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from typing import Any


class LocalResponse:
    """A ``DeploymentResponse`` double: the call runs as a task started by ``remote()``."""

    def __init__(self, method: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._task = asyncio.ensure_future(_invoke(method, args))
        self.cancelled = False

    def __await__(self) -> Generator[Any, None, Any]:
        return self._task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()


class LocalResponseGenerator:
    """A ``DeploymentResponseGenerator`` double over what an async generator method yields.

    ``cancel()`` only records the call: the consumer cancelling its pending ``__anext__`` is
    what ends the generator here, as cancellation would on the replica.
    """

    def __init__(self, stream: AsyncIterator[Any]) -> None:
        self._stream = stream
        self.cancelled = False

    def __aiter__(self) -> LocalResponseGenerator:
        return self

    async def __anext__(self) -> Any:
        return await anext(self._stream)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(frozen=True)
class Call:
    """One ``remote()`` call a handle was sent, and the response it handed out."""

    method: str
    args: tuple[Any, ...]
    response: LocalResponse | LocalResponseGenerator


class LocalHandle:
    """A ``DeploymentHandle`` double over ``target`` that records every call."""

    def __init__(self, target: Any, *, stream: bool = False, calls: list[Call] | None = None):
        self.target = target
        self.stream = stream
        self.calls: list[Call] = [] if calls is None else calls

    def options(self, *, stream: bool = False, multiplexed_model_id: str = "") -> LocalHandle:
        """A view of the same target and call record whose calls stream (Serve's
        multiplexed model id only steers Serve's routing, which this does not do)."""
        return LocalHandle(self.target, stream=stream, calls=self.calls)

    @property
    def responses(self) -> list[LocalResponse | LocalResponseGenerator]:
        """Every response handed out, in call order."""
        return [call.response for call in self.calls]

    def calls_to(self, method: str) -> list[Call]:
        """The calls of ``method``, in order."""
        return [call for call in self.calls if call.method == method]

    def __getattr__(self, method: str) -> _LocalMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return _LocalMethod(self, method)


class _LocalMethod:
    def __init__(self, handle: LocalHandle, name: str) -> None:
        self._handle = handle
        self._name = name

    def remote(self, *args: Any) -> LocalResponse | LocalResponseGenerator:
        method = getattr(self._handle.target, self._name)
        response: LocalResponse | LocalResponseGenerator
        if self._handle.stream:
            response = LocalResponseGenerator(method(*args))
        else:
            response = LocalResponse(method, args)
        self._handle.calls.append(Call(self._name, args, response))
        return response


async def _invoke(method: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """Replica methods may be sync or async; either way the caller awaits the result."""
    result = method(*args)
    return await result if inspect.isawaitable(result) else result
