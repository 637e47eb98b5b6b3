"""Unit tests of API key loading, Bearer authentication and per-key limits (no Ray)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.api.auth import (
    ApiKey,
    ApiKeyRegistry,
    AuthConfig,
    KeyLimits,
    load_api_keys,
    parse_api_keys,
    warn_if_open,
)

ENV = "TEST_API_KEYS"


def registry(keys: str = "", **config: object) -> ApiKeyRegistry:
    return ApiKeyRegistry(AuthConfig.model_validate({"api_keys_env": ENV, **config}), {ENV: keys})


def test_env_keys_split_on_commas_and_newlines_with_default_names() -> None:
    keys = parse_api_keys("sk-one, alice:sk-two\nsk-three,,")
    assert keys == [
        ApiKey("key-1", "sk-one"),
        ApiKey("alice", "sk-two"),
        ApiKey("key-3", "sk-three"),
    ]


def test_named_secret_may_contain_colons() -> None:
    assert parse_api_keys("bob:sk:with:colons") == [ApiKey("bob", "sk:with:colons")]


def test_entry_with_empty_name_or_secret_is_an_error() -> None:
    with pytest.raises(ValueError, match="name and secret"):
        parse_api_keys("alice:")
    with pytest.raises(ValueError, match="name and secret"):
        parse_api_keys(":sk-secret")


def test_file_keys_skip_comments_and_blank_lines_and_follow_env_keys(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\n\ncarol:sk-c\n  # old: sk-revoked\nsk-d, dave:sk-e\n")
    config = AuthConfig(api_keys_env=ENV, api_keys_file=key_file)
    keys = load_api_keys(config, {ENV: "sk-env"})
    assert keys == [
        ApiKey("key-1", "sk-env"),
        ApiKey("carol", "sk-c"),
        ApiKey("key-3", "sk-d"),
        ApiKey("dave", "sk-e"),
    ]


def test_missing_key_file_fails_at_startup(tmp_path: Path) -> None:
    config = AuthConfig(api_keys_env=ENV, api_keys_file=tmp_path / "absent")
    with pytest.raises(FileNotFoundError):
        load_api_keys(config, {})


def test_repeated_names_or_secrets_are_errors_that_do_not_show_secrets() -> None:
    with pytest.raises(ValueError, match="repeated: alice"):
        registry("alice:sk-1,alice:sk-2")
    with pytest.raises(ValueError, match="share one secret") as error:
        registry("alice:sk-same,bob:sk-same")
    assert "sk-same" not in str(error.value)


def test_repr_and_str_hide_the_secret() -> None:
    key = ApiKey("alice", "sk-very-secret")
    assert "alice" in repr(key)
    assert "sk-very-secret" not in repr(key)
    assert "sk-very-secret" not in str(key)
    assert "sk-very-secret" not in repr([key])


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic sk-two",
        "sk-two",
        "Bearer sk-wrong",
        "Bearer sk-tw",
        "Bearer sk-two-and-more",
    ],
)
def test_authenticate_refuses_missing_malformed_or_wrong_credentials(header: str | None) -> None:
    assert registry("sk-one,alice:sk-two").authenticate(header) is None


@pytest.mark.parametrize("header", ["Bearer sk-two", "bearer sk-two", "  Bearer   sk-two  "])
def test_authenticate_returns_the_matching_key(header: str) -> None:
    assert registry("sk-one,alice:sk-two").authenticate(header) == ApiKey("alice", "sk-two")


def test_authenticate_accepts_non_ascii_tokens_without_error() -> None:
    keys = registry("alice:sk-été")
    assert keys.authenticate("Bearer sk-été") == ApiKey("alice", "sk-été")
    assert keys.authenticate("Bearer sk-ete") is None


def test_limits_for_uses_the_key_entry_else_the_default() -> None:
    keys = registry(
        "alice:sk-a,bob:sk-b",
        default_limits={"requests_per_minute": 10},
        limits={"alice": {"requests_per_minute": 100, "tokens_per_minute": 5000}},
    )
    alice, bob = keys.authenticate("Bearer sk-a"), keys.authenticate("Bearer sk-b")
    assert alice is not None and bob is not None
    assert keys.limits_for(alice) == KeyLimits(requests_per_minute=100, tokens_per_minute=5000)
    assert keys.limits_for(bob) == KeyLimits(requests_per_minute=10)


def test_limits_for_an_unconfigured_name_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="serve_app.api.auth"):
        registry("alice:sk-a", limits={"alcie": {"requests_per_minute": 1}})
    assert "alcie" in caplog.text


@pytest.mark.parametrize(
    "config",
    [
        {"unknown": 1},
        {"default_limits": {"requests_per_minute": 0}},
        {"limits": {"alice": {"tokens_per_minute": -5}}},
        {"rate_limit_timeout_s": 0},
    ],
)
def test_config_is_strict(config: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AuthConfig.model_validate(config)


def test_registry_reads_the_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SERVE_APP_API_KEYS", "ops:sk-from-env")
    keys = ApiKeyRegistry(AuthConfig())
    assert keys.enabled
    assert keys.authenticate("Bearer sk-from-env") == ApiKey("ops", "sk-from-env")


def test_warn_if_open_warns_once_without_keys(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.auth.open")
    keys = registry("")
    assert not keys.enabled
    with caplog.at_level(logging.WARNING, logger=logger.name):
        warn_if_open(keys, logger)
    warnings = [r for r in caplog.records if r.name == logger.name]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "without authentication" in warnings[0].getMessage().lower()
    assert ENV in warnings[0].getMessage()


def test_warn_if_open_is_silent_with_keys(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.auth.closed")
    keys = registry("alice:sk-a")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        warn_if_open(keys, logger)
    assert not [r for r in caplog.records if r.name == logger.name]
    assert "sk-a" not in caplog.text
