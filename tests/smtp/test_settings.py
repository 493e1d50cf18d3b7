"""The SMTP service's settings: SSRF default per environment, overlap, CA file, cache."""

from __future__ import annotations

import pytest

from services.core.settings import SettingsError
from services.smtp.settings import SmtpSettings

PRODUCTION = {
    "AZORA_ENV": "production",
    "JWT_SECRET": "p" * 40,
    "AZORA_SERVICE_TOKEN_SECRET": "q" * 40,
    "AZORA_SECRETS_KEY": "c2VjcmV0cy1rZXktZm9yLXRoZS10ZXN0LXN1aXRlISE=",
}


def test_private_relays_are_allowed_outside_production_only() -> None:
    # Development and tests may use local relays; production refuses them unless told.
    assert SmtpSettings.from_env({}).smtp_allow_private_hosts
    assert SmtpSettings.from_env({"AZORA_ENV": "test"}).smtp_allow_private_hosts
    assert not SmtpSettings.from_env(PRODUCTION).smtp_allow_private_hosts
    allowed = SmtpSettings.from_env({**PRODUCTION, "AZORA_SMTP_ALLOW_PRIVATE_HOSTS": "true"})
    assert allowed.smtp_allow_private_hosts
    assert not SmtpSettings.from_env(
        {"AZORA_SMTP_ALLOW_PRIVATE_HOSTS": "off"}
    ).smtp_allow_private_hosts


def test_smtp_settings_are_read() -> None:
    # Every SMTP variable is read with its unit.
    settings = SmtpSettings.from_env(
        {
            "AZORA_SMTP_CA_FILE": " /etc/ssl/relay-ca.pem ",
            "AZORA_DKIM_ROTATION_OVERLAP": "86400",
            "AZORA_DKIM_CHECK_INTERVAL": "120",
            "AZORA_DOMAIN_CACHE_TTL": "2.5",
        }
    )
    assert settings.smtp_ca_file == "/etc/ssl/relay-ca.pem"
    assert settings.dkim_rotation_overlap == 86400
    assert settings.dkim_check_interval == 120
    assert settings.domain_cache_ttl == 2.5
    defaults = SmtpSettings.from_env({})
    assert defaults.dkim_rotation_overlap == 7 * 24 * 3600
    assert defaults.smtp_ca_file == ""


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AZORA_SMTP_ALLOW_PRIVATE_HOSTS", "maybe"),
        ("AZORA_DKIM_ROTATION_OVERLAP", "a week"),
        ("AZORA_DKIM_CHECK_INTERVAL", "-1"),
    ],
)
def test_malformed_values_stop_start_up(name: str, value: str) -> None:
    # A typo in a setting is a start-up error naming the variable.
    with pytest.raises(SettingsError, match=name):
        SmtpSettings.from_env({name: value})
