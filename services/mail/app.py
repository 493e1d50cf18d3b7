"""Composition root of the mail service process.

The mail service's contract (azora.mail.v1) is defined and served with health and reflection;
its rpcs answer UNIMPLEMENTED until the mail delivery issue implements them.
"""

from __future__ import annotations

from azora.mail.v1 import mail_pb2, mail_pb2_grpc

from services.core.runtime import Database, RunningService, start_service
from services.core.settings import Settings
from services.iam.servicer import remote_api_key_resolver

SERVICE_NAME = "mail-service"
MAIL_SERVICE = mail_pb2.DESCRIPTOR.services_by_name["MailService"].full_name


async def build(settings: Settings, *, bind: str | None = None) -> RunningService:
    """Wire and start the mail service process."""
    database = Database.connect(settings)
    api_keys, domain_channel = remote_api_key_resolver(settings)
    server = await start_service(
        settings=settings,
        database=database,
        bind=bind or f"{settings.host}:{settings.mail_grpc_port}",
        service_names=(MAIL_SERVICE,),
        registrars=(
            lambda s: mail_pb2_grpc.add_MailServiceServicer_to_server(
                # The generated base answers UNIMPLEMENTED for every rpc (see module doc).
                mail_pb2_grpc.MailServiceServicer(),  # type: ignore[abstract]
                s,
            ),
        ),
        api_keys=api_keys,
        indexes=(),
    )
    return RunningService(server, database, [domain_channel])
