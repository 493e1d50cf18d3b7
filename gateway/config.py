"""The gateway's own settings, on top of the suite's `Settings`.

`Settings` already holds what the gateway shares with the services (PORT, the three service
targets, LOG_LEVEL, shutdown grace). What only the gateway needs is read here, from variables
prefixed ``AZORA_GATEWAY_`` (plus ``AZORA_SWAGGER_UI_DIR`` and ``AZORA_CORS_ORIGINS``), declared
and validated like every setting (`services.core.settings.setting`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Self

from pydantic import BeforeValidator

from services.core.server import MAX_MESSAGE_BYTES
from services.core.settings import Settings, SettingsModel, setting

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DESCRIPTOR_PATH = REPO_ROOT / "gen" / "azora.binpb"
DEFAULT_OPENAPI_PATH = REPO_ROOT / "gen" / "openapi" / "azora.swagger.json"
DEFAULT_SWAGGER_UI_DIR = REPO_ROOT / "node_modules" / "swagger-ui-dist"
# The services' gRPC receive limit (and Envoy's max_request_body_size): a JSON body is never
# smaller than its protobuf encoding, so nothing accepted here is refused by a service.
DEFAULT_MAX_BODY_BYTES = MAX_MESSAGE_BYTES
DEFAULT_DEADLINE_SECONDS = 30.0


def _origins(value: object) -> object:
    """A comma-separated list of origins, compared without a trailing slash."""
    if isinstance(value, str):
        return tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    return value


class GatewayConfig(SettingsModel):
    """Gateway-only configuration."""

    descriptor_path: Path = setting(
        DEFAULT_DESCRIPTOR_PATH,
        "AZORA_GATEWAY_DESCRIPTOR",
        "the FileDescriptorSet to transcode from",
        shown="`gen/azora.binpb`",
    )
    openapi_path: Path = setting(
        DEFAULT_OPENAPI_PATH,
        "AZORA_GATEWAY_OPENAPI",
        "the generated OpenAPI document served at /api-docs/openapi.json; read at request time, "
        "so it may appear later",
        shown="`gen/openapi/azora.swagger.json`",
    )
    swagger_ui_dir: Path = setting(
        DEFAULT_SWAGGER_UI_DIR,
        "AZORA_SWAGGER_UI_DIR",
        "the swagger-ui-dist package directory",
        shown="`node_modules/swagger-ui-dist`",
    )
    # By default the services' own gRPC limit, so a body the gateway accepts is never refused by
    # a service as RESOURCE_EXHAUSTED (which would read as a 429).
    max_body_bytes: int = setting(
        DEFAULT_MAX_BODY_BYTES,
        ("AZORA_GATEWAY_MAX_BODY_BYTES", "AZORA_GRPC_MAX_MESSAGE_BYTES"),
        "largest accepted request body (bytes); unset = the services' "
        "`AZORA_GRPC_MAX_MESSAGE_BYTES`",
        gt=0,
    )
    deadline_seconds: float = setting(
        DEFAULT_DEADLINE_SECONDS,
        "AZORA_GATEWAY_DEADLINE",
        "deadline of every upstream call (seconds)",
        gt=0,
    )
    # gRPC service full name -> "host:port" of the process serving it; None takes the targets
    # of `Settings` (see `upstream_targets`). A service of the descriptor set without a target
    # answers 501.
    upstreams: Mapping[str, str] | None = setting(
        None, None, "which process serves which gRPC service (tests)"
    )
    cors_origins: Annotated[tuple[str, ...], BeforeValidator(_origins)] = setting(
        (),
        "AZORA_CORS_ORIGINS",
        "origins allowed to call from a browser (comma-separated, exact match); empty = CORS off",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Self:
        """Read the gateway variables.

        Raises:
            SettingsError: a value is malformed.
        """
        return cls.validated(cls.values_from_env(env, production=False))


def upstream_targets(settings: Settings) -> dict[str, str]:
    """Which process serves which gRPC service (the clusters of gateway/envoy.yaml)."""
    return {
        "azora.domain.v1.DomainService": settings.domain_service_target,
        "azora.domain.v1.RouteService": settings.domain_service_target,
        "azora.iam.v1.ApiKeyService": settings.domain_service_target,
        "azora.health.v1.SuiteHealthService": settings.domain_service_target,
        "azora.smtp.v1.SmtpService": settings.smtp_service_target,
        "azora.mail.v1.MailService": settings.mail_service_target,
        "azora.mail.v1.EventService": settings.mail_service_target,
        "azora.mail.v1.SuppressionService": settings.mail_service_target,
        "azora.mail.v1.WebhookService": settings.mail_service_target,
        "azora.mail.v1.InboundService": settings.mail_service_target,
    }
