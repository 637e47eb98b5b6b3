"""A progress bar over a tool's named stages, for library calls that report no progress."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from tqdm import tqdm


class StageBar:
    """A tqdm bar that advances once per stage and records how long each stage took."""

    def __init__(self, title: str, total: int) -> None:
        self._bar = tqdm(total=total, desc=title, unit="stage")
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Show `name` while the block runs, then advance the bar."""
        self._bar.set_postfix_str(name)
        started = time.monotonic()
        yield
        self.seconds[name] = time.monotonic() - started
        self._bar.update()

    def __enter__(self) -> StageBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._bar.close()
