"""Every service's settings in one object, for tests and benchmarks that run several in one process.

Each process reads only its own class (`DomainSettings`, `SmtpSettings`, `MailSettings`, each the
shared `Settings` plus the service's own); a test that builds the domain, SMTP and mail services
side by side passes this one to all of them.
"""

from __future__ import annotations

from services.domain.settings import DomainSettings
from services.mail.settings import MailSettings
from services.smtp.settings import SmtpSettings


class SuiteSettings(DomainSettings, SmtpSettings, MailSettings):
    """The shared settings and those of the domain, health, SMTP and mail services."""


__all__ = ["SuiteSettings"]
