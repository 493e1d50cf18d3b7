"""Composition root of the SMTP service process.

The SMTP service's contract (azora.smtp.v1) is defined and served with health and reflection;
its rpcs answer UNIMPLEMENTED until the SMTP issue implements them.
"""

from __future__ import annotations

from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc

from services.core.runtime import Database, RunningService, start_service
from services.core.settings import Settings
from services.iam.servicer import remote_api_key_resolver

SERVICE_NAME = "smtp-service"
SMTP_SERVICE = smtp_pb2.DESCRIPTOR.services_by_name["SmtpService"].full_name


async def build(settings: Settings, *, bind: str | None = None) -> RunningService:
    """Wire and start the SMTP service process."""
    database = Database.connect(settings)
    api_keys, domain_channel = remote_api_key_resolver(settings)
    server = await start_service(
        settings=settings,
        database=database,
        bind=bind or f"{settings.host}:{settings.smtp_grpc_port}",
        service_names=(SMTP_SERVICE,),
        registrars=(
            lambda s: smtp_pb2_grpc.add_SmtpServiceServicer_to_server(
                # The generated base answers UNIMPLEMENTED for every rpc (see module doc).
                smtp_pb2_grpc.SmtpServiceServicer(),  # type: ignore[abstract]
                s,
            ),
        ),
        api_keys=api_keys,
        indexes=(),
    )
    return RunningService(server, database, [domain_channel])
