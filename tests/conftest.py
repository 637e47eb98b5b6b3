"""Fixtures shared by every test layer, and the tiers: each directory is one marker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from serve_app import DEMO_MODEL_DIR
from serve_app.text.tokenizer import Tokenizer

TESTS = Path(__file__).resolve().parent
# The tier of every test, by the directory it lives in (registered in pyproject.toml).
TIERS = {"unit": "unit", "engine": "engine", "tools": "tools", "gpu": "gpu", "e2e": "e2e"}
RAY_STARTED = pytest.StashKey[bool]()  # set by the fixtures that start Ray in this process


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The demo model the repository ships."""
    return Path(os.environ.get("DEV_MODEL", DEMO_MODEL_DIR))


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    """The demo model's tokenizer."""
    return Tokenizer(model_dir)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its directory's tier; tests beside this file are ``unit``."""
    for item in items:
        relative = Path(str(item.path)).resolve().relative_to(TESTS)
        tier = TIERS.get(relative.parts[0], "unit") if len(relative.parts) > 1 else "unit"
        item.add_marker(getattr(pytest.mark, tier))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """In the fast tier (``-m "not e2e"``), leave tests/e2e unimported: it would deselect every
    test there anyway, after seconds of importing Ray Serve and the clients they use."""
    fast_tier = " ".join(str(config.getoption("markexpr")).split()) == "not e2e"
    return True if fast_tier and collection_path == TESTS / "e2e" else None


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """In runs that started Ray: leave without interpreter teardown, keeping pytest's status.

    Ray's native client threads can outlive ``ray.shutdown()`` and crash while the interpreter
    tears down, after every test has run and been reported (seen here as exit 139 in one full
    run of five); nothing of the suite's result depends on that teardown.
    """
    session = getattr(config, "_serve_app_session", None)
    if session is None or not config.stash.get(RAY_STARTED, False):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remember the session so ``pytest_unconfigure`` can read its final exit status."""
    session.config._serve_app_session = session  # type: ignore[attr-defined]
