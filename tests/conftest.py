"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
import sys
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


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without interpreter teardown, keeping pytest's exit status.

    Ray's native client threads can outlive ``ray.shutdown()`` and crash while the interpreter
    tears down, after every test has run and been reported (seen here as exit 139 in one full
    run of five); nothing of the suite's result depends on that teardown.
    """
    session = getattr(config, "_serve_app_session", None)
    if session is None:  # pytest stopped before the session began (e.g. a usage error)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remember the session so ``pytest_unconfigure`` can read its final exit status."""
    session.config._serve_app_session = session  # type: ignore[attr-defined]
