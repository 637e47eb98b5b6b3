"""API keys: where they come from, how a request proves it holds one, and each key's limits.

Keys come from an environment variable and/or a file named in config, never from the repository.
Both hold the same format: keys separated by newlines or commas, each ``secret`` or
``name:secret``; blank lines and lines starting with ``#`` are ignored. Limits are keyed by a key's
name, so configs and logs never need the secret.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

_BEARER_SCHEME = "bearer"  # auth schemes are case-insensitive (RFC 9110, section 11.1)


class KeyLimits(BaseModel):
    """Per-minute limits of one API key; None means unlimited."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(
        default=None, ge=1, description="Most requests a key may start per minute; None: no limit."
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Most tokens (prompt + max_tokens, reserved up front) a key may use per "
        "minute; None: no limit.",
    )


class AuthConfig(BaseModel):
    """Where API keys come from and what each key may do."""

    model_config = ConfigDict(extra="forbid")

    api_keys_env: str = Field(
        default="SERVE_APP_API_KEYS",
        min_length=1,
        description="Name of the environment variable holding API keys (unset or empty: none).",
    )
    api_keys_file: Path | None = Field(
        default=None, description="A file holding more API keys, one per line; None: no file."
    )
    default_limits: KeyLimits = Field(
        default_factory=KeyLimits, description="Limits of every key not named in `limits`."
    )
    limits: dict[str, KeyLimits] = Field(
        default_factory=dict, description="Limits by key name (not secret), overriding the default."
    )
    rate_limit_timeout_s: float = Field(
        default=0.25,
        gt=0,
        description="Seconds to wait for the rate limiter before it counts as unavailable.",
    )
    rate_limit_fail_open: bool = Field(
        default=True,
        description="When the rate limiter is unavailable: true lets requests through "
        "(availability over strictness; API keys still apply), false answers 503 with "
        "Retry-After until it is back.",
    )


@dataclass(frozen=True)
class ApiKey:
    """One API key: a name safe to log, and a secret that no repr shows."""

    name: str
    secret: str = field(repr=False)


def parse_api_keys(text: str, first_index: int = 1) -> list[ApiKey]:
    """The keys in ``text``; unnamed keys are called ``key-<n>``, counting from ``first_index``."""
    keys: list[ApiKey] = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        for item in line.split(","):
            entry = item.strip()
            if entry:
                keys.append(_parse_entry(entry, f"key-{first_index + len(keys)}"))
    return keys


def _parse_entry(entry: str, default_name: str) -> ApiKey:
    # The first colon separates the name, so a secret may contain colons only when it is named.
    name, colon, secret = entry.partition(":")
    if not colon:
        return ApiKey(default_name, entry)
    name, secret = name.strip(), secret.strip()
    if not name or not secret:
        raise ValueError(f"API key entry for {name or default_name!r} needs both a name and secret")
    return ApiKey(name, secret)


def load_api_keys(config: AuthConfig, environ: Mapping[str, str]) -> list[ApiKey]:
    """The keys of the environment variable, then those of the file; names and secrets unique."""
    keys = parse_api_keys(environ.get(config.api_keys_env, ""))
    if config.api_keys_file is not None:
        keys += parse_api_keys(config.api_keys_file.read_text(encoding="utf-8"), len(keys) + 1)
    _check_unique(keys)
    return keys


def _check_unique(keys: list[ApiKey]) -> None:
    names = [key.name for key in keys]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"API key names must be unique; repeated: {', '.join(repeated)}")
    if len({key.secret for key in keys}) < len(keys):
        # Say nothing about which secret: the error message may end up in logs.
        raise ValueError("two API keys share one secret")


class ApiKeyRegistry:
    """The configured API keys: authenticates requests and looks up their limits."""

    def __init__(self, config: AuthConfig, environ: Mapping[str, str] | None = None) -> None:
        self._config = config
        self._keys = load_api_keys(config, os.environ if environ is None else environ)
        self._secrets = [(key, key.secret.encode("utf-8")) for key in self._keys]
        _warn_unknown_limit_names(config, {key.name for key in self._keys})

    @property
    def enabled(self) -> bool:
        """Whether any key is configured; without keys every request is let in."""
        return bool(self._keys)

    @property
    def api_keys_env(self) -> str:
        """The environment variable the keys were read from."""
        return self._config.api_keys_env

    def authenticate(self, authorization_header: str | None) -> ApiKey | None:
        """The key that ``Authorization: Bearer <token>`` names, or None if it names none."""
        token = _bearer_token(authorization_header)
        if token is None:
            return None
        candidate = token.encode("utf-8")
        match: ApiKey | None = None
        # Compare with every key, without stopping at a match, so timing says nothing about which.
        for key, secret in self._secrets:
            if hmac.compare_digest(candidate, secret):
                match = key
        return match

    def limits_for(self, key: ApiKey) -> KeyLimits:
        """The limits of ``key``: its own entry in the config, else the default."""
        return self._config.limits.get(key.name, self._config.default_limits)


def _warn_unknown_limit_names(config: AuthConfig, names: set[str]) -> None:
    # A typo in a key name would otherwise silently give that key the default limits.
    unknown = sorted(set(config.limits) - names)
    if unknown:
        logger.warning("limits name API keys that are not configured: %s", ", ".join(unknown))


def _bearer_token(authorization_header: str | None) -> str | None:
    if authorization_header is None:
        return None
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != _BEARER_SCHEME or not token:
        return None
    return token


def warn_if_open(registry: ApiKeyRegistry, logger: logging.Logger) -> None:
    """Log one warning when no API key is configured, so an open service is never silent."""
    if not registry.enabled:
        logger.warning(
            "no API keys configured (set %s or api_keys_file): serving WITHOUT authentication",
            registry.api_keys_env,
        )
