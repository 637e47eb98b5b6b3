"""A model's variants as its replicas serve them: the model folders of a variants directory
(``VariantsConfig``), found when asked for and loaded on demand into the replica's LRU that
Serve's ``@serve.multiplexed`` keeps, reports and routes by (``deployments/model_server.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from serve_app.config import ModelSource, VariantsConfig, model_digest
from serve_app.model_versions import LoadedModel

logger = logging.getLogger("ray.serve")


class VariantNotFound(LookupError):
    """No folder of the variants directory has the requested name."""


class VariantNotLoadable(RuntimeError):
    """The variant's folder is there but cannot be served (it reads another tokenizer)."""


class VariantDirectory:
    """The variants of the model in ``base_path``: every folder of ``config.directory`` that
    holds a model (its ``config.json``), read at each call, so folders added while serving are
    found without a redeploy."""

    def __init__(self, config: VariantsConfig, base_path: Path) -> None:
        self.config = config
        self.base_tokenizer = base_path / "tokenizer.json"

    def listed(self) -> dict[str, float]:
        """Each variant's name and when its folder last changed (Unix time), by name."""
        if not self.config.directory.is_dir():
            return {}
        return {
            folder.name: folder.stat().st_mtime
            for folder in sorted(self.config.directory.iterdir())
            if (folder / "config.json").is_file()
        }

    def source(self, variant: str) -> ModelSource:
        """The folder and version of ``variant`` (a name ``config.split_variant`` accepted);
        ``VariantNotFound`` or ``VariantNotLoadable`` when it cannot be served."""
        folder = self.config.directory / variant
        if not (folder / "config.json").is_file():
            raise VariantNotFound(variant)
        # The Batcher tokenizes and detokenizes every variant with its model's tokenizer.
        tokenizer = folder / "tokenizer.json"
        if not tokenizer.is_file() or tokenizer.read_bytes() != self.base_tokenizer.read_bytes():
            raise VariantNotLoadable(
                f"the variant '{variant}' does not have its model's tokenizer.json; variants "
                "share their model's tokenizer"
            )
        return ModelSource(model_path=folder, model_version=f"{variant}-{model_digest(folder)}")


class LoadedVariant:
    """A variant's engine as the multiplexed loader hands it to Serve's LRU.

    Serve calls ``__del__`` when its LRU unloads it, from a worker thread; the unloading itself
    (``on_unload``: shut the engine down, or once its last stream ends) runs on the replica's
    event loop, where streams are counted.
    """

    def __init__(
        self,
        model: LoadedModel,
        loop: asyncio.AbstractEventLoop,
        on_unload: Callable[[LoadedModel], None],
    ) -> None:
        self.model = model
        self._loop = loop
        self._on_unload = on_unload
        self._unloaded = False

    def __del__(self) -> None:
        if self._unloaded:  # Serve's call, then the garbage collector's
            return
        self._unloaded = True
        logger.info("unloading variant %s", self.model.source.model_version)
        try:
            self._loop.call_soon_threadsafe(self._on_unload, self.model)
        except RuntimeError:  # the loop is closed: the replica is stopping
            self.model.engine.shutdown()
