"""The gateway's own settings, on top of the suite's `Settings`.

`Settings` already holds what the gateway shares with the services (PORT, the three service
targets, LOG_LEVEL, shutdown grace). What only the gateway needs is read here, from variables
prefixed ``AZORA_GATEWAY_`` (plus ``AZORA_SWAGGER_UI_DIR``), with the same fail-at-start-up rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from services.core.server import MAX_MESSAGE_BYTES
from services.core.settings import Settings, SettingsError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DESCRIPTOR_PATH = REPO_ROOT / "gen" / "azora.binpb"
DEFAULT_OPENAPI_PATH = REPO_ROOT / "gen" / "openapi" / "azora.swagger.json"
DEFAULT_SWAGGER_UI_DIR = REPO_ROOT / "node_modules" / "swagger-ui-dist"
# The services' gRPC receive limit (and Envoy's max_request_body_size): a JSON body is never
# smaller than its protobuf encoding, so nothing accepted here is refused by a service.
DEFAULT_MAX_BODY_BYTES = MAX_MESSAGE_BYTES
DEFAULT_DEADLINE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Gateway-only configuration.

    Attributes:
        descriptor_path: the FileDescriptorSet to transcode from (AZORA_GATEWAY_DESCRIPTOR).
        openapi_path: the generated OpenAPI document served at /api-docs/openapi.json
            (AZORA_GATEWAY_OPENAPI); read at request time, so it may appear later.
        swagger_ui_dir: the swagger-ui-dist package directory (AZORA_SWAGGER_UI_DIR).
        max_body_bytes: largest accepted request body (AZORA_GATEWAY_MAX_BODY_BYTES; default
            the services' AZORA_GRPC_MAX_MESSAGE_BYTES, itself 64 MiB by default).
        deadline_seconds: deadline of every upstream call (AZORA_GATEWAY_DEADLINE, seconds).
        cors_origins: origins allowed to call from a browser (AZORA_CORS_ORIGINS, comma-
            separated, exact match); empty = CORS off.
        upstreams: gRPC service full name -> "host:port" of the process serving it; None
            takes the targets of `Settings` (see `upstream_targets`). A service of the
            descriptor set without a target answers 501.
    """

    descriptor_path: Path = DEFAULT_DESCRIPTOR_PATH
    openapi_path: Path = DEFAULT_OPENAPI_PATH
    swagger_ui_dir: Path = DEFAULT_SWAGGER_UI_DIR
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS
    upstreams: Mapping[str, str] | None = None
    cors_origins: tuple[str, ...] = ()

    def with_overrides(self, **changes: object) -> GatewayConfig:
        """A copy with some fields changed (tests)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GatewayConfig:
        """Read the gateway variables.

        Raises:
            SettingsError: a value is malformed.
        """
        errors: list[str] = []

        def number(name: str, default: float, *, integer: bool) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw) if integer else float(raw)
            except ValueError:
                errors.append(f"{name} must be a {'whole ' if integer else ''}number, got {raw!r}")
                return default
            if value <= 0:
                errors.append(f"{name} must be > 0, got {raw!r}")
                return default
            return value

        def path(name: str, default: Path) -> Path:
            raw = env.get(name, "").strip()
            return Path(raw) if raw else default

        config = cls(
            descriptor_path=path("AZORA_GATEWAY_DESCRIPTOR", DEFAULT_DESCRIPTOR_PATH),
            openapi_path=path("AZORA_GATEWAY_OPENAPI", DEFAULT_OPENAPI_PATH),
            swagger_ui_dir=path("AZORA_SWAGGER_UI_DIR", DEFAULT_SWAGGER_UI_DIR),
            # By default the services' own gRPC limit, so a body the gateway accepts is never
            # refused by a service as RESOURCE_EXHAUSTED (which would read as a 429).
            max_body_bytes=int(
                number(
                    "AZORA_GATEWAY_MAX_BODY_BYTES",
                    number("AZORA_GRPC_MAX_MESSAGE_BYTES", DEFAULT_MAX_BODY_BYTES, integer=True),
                    integer=True,
                )
            ),
            deadline_seconds=number(
                "AZORA_GATEWAY_DEADLINE", DEFAULT_DEADLINE_SECONDS, integer=False
            ),
            cors_origins=tuple(
                o.strip().rstrip("/")
                for o in env.get("AZORA_CORS_ORIGINS", "").split(",")
                if o.strip()
            ),
        )
        if errors:
            raise SettingsError("; ".join(errors))
        return config


def upstream_targets(settings: Settings) -> dict[str, str]:
    """Which process serves which gRPC service (the clusters of gateway/envoy.yaml)."""
    return {
        "azora.domain.v1.DomainService": settings.domain_service_target,
        "azora.iam.v1.ApiKeyService": settings.domain_service_target,
        "azora.health.v1.SuiteHealthService": settings.domain_service_target,
        "azora.smtp.v1.SmtpService": settings.smtp_service_target,
        "azora.mail.v1.MailService": settings.mail_service_target,
        "azora.mail.v1.WebhookService": settings.mail_service_target,
    }
