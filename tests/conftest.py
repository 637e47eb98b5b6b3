"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve_app import DEMO_MODEL_DIR
from serve_app.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The demo model the repository ships."""
    return Path(os.environ.get("DEV_MODEL", DEMO_MODEL_DIR))


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    """The demo model's tokenizer."""
    return Tokenizer(model_dir)
