"""Settings from the environment.

The product spec's names and defaults, validation, and production's refusal to start
without secrets.
"""

from __future__ import annotations

import pytest

from services.core.context import Principal
from services.core.ratelimit import RateLimiter
from services.core.settings import (
    DEV_JWT_SECRET,
    DEV_SERVICE_TOKEN_SECRET,
    DEVELOPMENT_RATE_LIMIT_MAX,
    Environment,
    Settings,
    SettingsError,
    derived_service_token_secret,
)

GOOD_KEY = "c2VjcmV0cy1rZXktZm9yLXRoZS10ZXN0LXN1aXRlISE="
SERVICE_KEY = "service-token-secret-" + "v" * 32


def test_defaults_follow_the_product_spec() -> None:
    # With nothing set we run in development with the spec's defaults.
    settings = Settings.from_env({})
    assert settings.environment is Environment.DEVELOPMENT
    assert settings.port == 3006
    assert settings.log_level == "info"
    assert settings.smtp_timeout == 30.0
    assert settings.max_attachment_size == 10 * 1024 * 1024
    assert settings.rate_limit_window_ms == 900_000
    # The API budget is the spec's in production only (see the two tests below).
    assert settings.rate_limit_max == DEVELOPMENT_RATE_LIMIT_MAX
    assert settings.jwt_secret == DEV_JWT_SECRET
    assert len(settings.secrets_key_bytes()) == 32


def test_spec_variables_are_read() -> None:
    # Every product-spec variable keeps its name.
    settings = Settings.from_env(
        {
            "PORT": "8080",
            "MONGODB_URI": "mongodb://db:27017/",
            "JWT_SECRET": "s" * 40,
            "LOG_LEVEL": "DEBUG",
            "SMTP_TIMEOUT": "5000",
            "MAX_ATTACHMENT_SIZE": "1024",
            "RATE_LIMIT_WINDOW": "60000",
            "RATE_LIMIT_MAX": "7",
        }
    )
    assert (settings.port, settings.mongodb_uri, settings.jwt_secret) == (
        8080,
        "mongodb://db:27017/",
        "s" * 40,
    )
    assert settings.log_level == "debug"
    assert settings.smtp_timeout == 5.0
    assert (settings.max_attachment_size, settings.rate_limit_window_ms) == (1024, 60000)
    assert settings.rate_limit_max == 7


def test_node_env_is_an_alias() -> None:
    # NODE_ENV selects the environment when AZORA_ENV is absent.
    assert Settings.from_env({"NODE_ENV": "test"}).environment is Environment.TEST


def test_every_problem_is_reported_at_once() -> None:
    # Malformed values fail start-up with one message naming each variable.
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"PORT": "abc", "RATE_LIMIT_MAX": "0", "LOG_LEVEL": "loud"})
    message = str(caught.value)
    for name in ("PORT", "RATE_LIMIT_MAX", "LOG_LEVEL"):
        assert name in message


def test_unknown_environment_is_refused() -> None:
    # A typo in the environment name must not silently mean development.
    with pytest.raises(SettingsError, match="NODE_ENV"):
        Settings.from_env({"NODE_ENV": "prod"})


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"JWT_SECRET": "short", "AZORA_SECRETS_KEY": GOOD_KEY},
        {"JWT_SECRET": DEV_JWT_SECRET, "AZORA_SECRETS_KEY": GOOD_KEY},
        {"JWT_SECRET": "j" * 40},
        {"JWT_SECRET": "j" * 40, "AZORA_SECRETS_KEY": "not base64!"},
        {"JWT_SECRET": "j" * 40, "AZORA_SECRETS_KEY": "c2hvcnQ="},
        # The key of service tokens: missing, short, JWT_SECRET itself, or a development value.
        {"JWT_SECRET": "j" * 40, "AZORA_SECRETS_KEY": GOOD_KEY},
        {"JWT_SECRET": "j" * 40, "AZORA_SECRETS_KEY": GOOD_KEY, "AZORA_SERVICE_TOKEN_SECRET": "x"},
        {
            "JWT_SECRET": "j" * 40,
            "AZORA_SECRETS_KEY": GOOD_KEY,
            "AZORA_SERVICE_TOKEN_SECRET": "j" * 40,
        },
        {
            "JWT_SECRET": "j" * 40,
            "AZORA_SECRETS_KEY": GOOD_KEY,
            "AZORA_SERVICE_TOKEN_SECRET": derived_service_token_secret("j" * 40),
        },
        {
            "JWT_SECRET": "j" * 40,
            "AZORA_SECRETS_KEY": GOOD_KEY,
            "AZORA_SERVICE_TOKEN_SECRET": DEV_SERVICE_TOKEN_SECRET,
        },
    ],
)
def test_production_refuses_missing_or_weak_secrets(env: dict[str, str]) -> None:
    # Production will not start with a missing, short, default or malformed secret.
    with pytest.raises(SettingsError):
        Settings.from_env({"AZORA_ENV": "production", **env})


def test_production_starts_with_proper_secrets() -> None:
    # Strong secrets are accepted as given.
    settings = Settings.from_env(
        {
            "NODE_ENV": "production",
            "JWT_SECRET": "j" * 40,
            "AZORA_SECRETS_KEY": GOOD_KEY,
            "AZORA_SERVICE_TOKEN_SECRET": SERVICE_KEY,
        }
    )
    assert settings.is_production
    assert not settings.allow_anonymous_development
    assert settings.service_token_secret == SERVICE_KEY


def test_development_derives_a_distinct_service_token_key() -> None:
    # Outside production the key of service tokens is derived from JWT_SECRET (every process
    # of a suite agrees on it), never equal to it; a configured one is used as given.
    default = Settings.from_env({})
    assert default.service_token_secret == DEV_SERVICE_TOKEN_SECRET != DEV_JWT_SECRET
    own = Settings.from_env({"JWT_SECRET": "k" * 40})
    assert own.service_token_secret == derived_service_token_secret("k" * 40) != "k" * 40
    given = Settings.from_env({"AZORA_SERVICE_TOKEN_SECRET": SERVICE_KEY})
    assert given.service_token_secret == SERVICE_KEY


def test_production_keeps_the_spec_api_budget() -> None:
    # RATE_LIMIT_MAX=100 per RATE_LIMIT_WINDOW=15 min unless set, as the product spec says.
    settings = Settings.from_env(
        {
            "AZORA_ENV": "production",
            "JWT_SECRET": "j" * 40,
            "AZORA_SECRETS_KEY": GOOD_KEY,
            "AZORA_SERVICE_TOKEN_SECRET": SERVICE_KEY,
        }
    )
    assert (settings.rate_limit_max, settings.rate_limit_window_ms) == (100, 900_000)
    assert Settings.from_env({"RATE_LIMIT_MAX": "100"}).rate_limit_max == 100


async def test_development_budget_lets_the_setup_guide_poll_once_a_second() -> None:
    # A newcomer following the guide polls GET /api/v1/emails/{id} once a second for a whole
    # 15-minute window, from one address with one key, on top of the guide's own calls.
    limiter = RateLimiter.from_settings(Settings.from_env({}), None)
    principal = Principal("t", "user:newcomer", frozenset({"*"}))
    for _ in range(15 * 60 + 20):
        await limiter.admit(send=False, ip="127.0.0.1", principal=principal)
