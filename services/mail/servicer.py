"""gRPC servicer of azora.mail.v1.MailService: translates, calls the manager, translates."""

from __future__ import annotations

from typing import Any

import grpc
from azora.mail.v1 import mail_pb2, mail_pb2_grpc
from google.protobuf import empty_pb2

from services.core.context import current_principal
from services.core.protobuf import from_timestamp, json_field_path
from services.mail import mapping
from services.mail.manager import MailManager
from services.mail.raw_message import SubmitInput
from services.mail.template_manager import TemplateManager

Context = grpc.aio.ServicerContext[Any, Any]


class MailServicer(mail_pb2_grpc.MailServiceServicer):
    """MailService over a `MailManager`."""

    def __init__(self, manager: MailManager, templates: TemplateManager) -> None:
        self._manager = manager
        self._templates = templates

    async def SendEmail(
        self, request: mail_pb2.SendEmailRequest, context: Context
    ) -> mail_pb2.Email:
        """See the proto."""
        principal = current_principal()
        email = await self._manager.send(
            tenant_id=principal.tenant_id,
            test=principal.test,
            request=mapping.send_from_proto(request),
            template=mapping.template_use_from_proto(request),
        )
        return mapping.email_to_proto(email)

    async def SubmitMessage(
        self, request: mail_pb2.SubmitMessageRequest, context: Context
    ) -> mail_pb2.Email:
        """See the proto."""
        principal = current_principal()
        email = await self._manager.submit(
            tenant_id=principal.tenant_id,
            test=principal.test,
            submission=SubmitInput(
                raw=request.raw_message,
                envelope_from=request.envelope_from,
                envelope_to=list(request.envelope_to),
                client_address=request.client_address,
            ),
        )
        return mapping.email_to_proto(email)

    async def ListEmails(
        self, request: mail_pb2.ListEmailsRequest, context: Context
    ) -> mail_pb2.ListEmailsResponse:
        """See the proto."""
        page = await self._manager.list_emails(
            tenant_id=current_principal().tenant_id,
            filter=mapping.filter_from_proto(request),
            size=request.page_size,
            page_token=request.page_token,
        )
        return mail_pb2.ListEmailsResponse(
            emails=[mapping.email_to_proto(e) for e in page.emails],
            next_page_token=page.next_page_token,
        )

    async def GetEmailStats(
        self, request: mail_pb2.GetEmailStatsRequest, context: Context
    ) -> mail_pb2.EmailStats:
        """See the proto."""
        stats = await self._manager.stats(
            tenant_id=current_principal().tenant_id,
            start=from_timestamp(request.start_time) if request.HasField("start_time") else None,
            end=from_timestamp(request.end_time) if request.HasField("end_time") else None,
            domain_id=request.domain_id or None,
            test=request.test,
        )
        return mapping.stats_to_proto(stats)

    async def GetEmail(self, request: mail_pb2.GetEmailRequest, context: Context) -> mail_pb2.Email:
        """See the proto."""
        email = await self._manager.get(
            tenant_id=current_principal().tenant_id, email_id=request.id
        )
        return mapping.email_to_proto(email)

    async def ResendEmail(
        self, request: mail_pb2.ResendEmailRequest, context: Context
    ) -> mail_pb2.Email:
        """See the proto."""
        principal = current_principal()
        email = await self._manager.resend(
            tenant_id=principal.tenant_id, email_id=request.id, test=principal.test
        )
        return mapping.email_to_proto(email)

    async def RescheduleEmail(
        self, request: mail_pb2.RescheduleEmailRequest, context: Context
    ) -> mail_pb2.Email:
        """See the proto."""
        email = await self._manager.reschedule(
            tenant_id=current_principal().tenant_id,
            email_id=request.id,
            send_at=from_timestamp(request.send_at) if request.HasField("send_at") else None,
        )
        return mapping.email_to_proto(email)

    async def GetDeliveryHealth(
        self, request: mail_pb2.GetDeliveryHealthRequest, context: Context
    ) -> mail_pb2.DeliveryHealth:
        """See the proto."""
        return mapping.delivery_health_to_proto(await self._manager.delivery_health())

    async def DeleteEmail(
        self, request: mail_pb2.DeleteEmailRequest, context: Context
    ) -> empty_pb2.Empty:
        """See the proto."""
        await self._manager.delete(tenant_id=current_principal().tenant_id, email_id=request.id)
        return empty_pb2.Empty()

    async def CancelDomainEmails(
        self, request: mail_pb2.CancelDomainEmailsRequest, context: Context
    ) -> mail_pb2.CancelDomainEmailsResponse:
        """See the proto."""
        cancelled, in_delivery = await self._manager.cancel_domain(
            tenant_id=current_principal().tenant_id, domain_id=request.domain_id
        )
        return mail_pb2.CancelDomainEmailsResponse(
            cancelled_count=cancelled, in_delivery_count=in_delivery
        )

    async def SendEmailBatch(
        self, request: mail_pb2.SendEmailBatchRequest, context: Context
    ) -> mail_pb2.SendEmailBatchResponse:
        """See the proto."""
        principal = current_principal()
        results = await self._manager.send_batch(
            tenant_id=principal.tenant_id,
            test=principal.test,
            messages=mapping.batch_from_proto(request),
            all_or_nothing=request.all_or_nothing,
            idempotency_key=request.idempotency_key,
            field_name=lambda path: json_field_path(mail_pb2.SendEmailRequest.DESCRIPTOR, path),
        )
        return mail_pb2.SendEmailBatchResponse(
            results=[mapping.batch_result_to_proto(r) for r in results],
            accepted_count=sum(1 for r in results if r.error is None),
        )

    async def CreateTemplate(
        self, request: mail_pb2.CreateTemplateRequest, context: Context
    ) -> mail_pb2.Template:
        """See the proto."""
        template = await self._templates.create(
            tenant_id=current_principal().tenant_id, draft=mapping.draft_from_proto(request)
        )
        return mapping.template_to_proto(template)

    async def ListTemplates(
        self, request: mail_pb2.ListTemplatesRequest, context: Context
    ) -> mail_pb2.ListTemplatesResponse:
        """See the proto."""
        page = await self._templates.list(
            tenant_id=current_principal().tenant_id,
            size=request.page_size,
            page_token=request.page_token,
        )
        return mail_pb2.ListTemplatesResponse(
            templates=[mapping.template_to_proto(t) for t in page.templates],
            next_page_token=page.next_page_token,
        )

    async def GetTemplate(
        self, request: mail_pb2.GetTemplateRequest, context: Context
    ) -> mail_pb2.Template:
        """See the proto."""
        template = await self._templates.get(
            tenant_id=current_principal().tenant_id, ref=request.id
        )
        return mapping.template_to_proto(template)

    async def UpdateTemplate(
        self, request: mail_pb2.UpdateTemplateRequest, context: Context
    ) -> mail_pb2.Template:
        """See the proto."""
        template = await self._templates.update(
            tenant_id=current_principal().tenant_id,
            ref=request.id,
            draft=mapping.draft_from_proto(request),
        )
        return mapping.template_to_proto(template)

    async def DeleteTemplate(
        self, request: mail_pb2.DeleteTemplateRequest, context: Context
    ) -> empty_pb2.Empty:
        """See the proto."""
        await self._templates.delete(tenant_id=current_principal().tenant_id, ref=request.id)
        return empty_pb2.Empty()

    async def PublishTemplate(
        self, request: mail_pb2.PublishTemplateRequest, context: Context
    ) -> mail_pb2.TemplateVersion:
        """See the proto."""
        version = await self._templates.publish(
            tenant_id=current_principal().tenant_id, ref=request.id
        )
        return mapping.version_to_proto(version)

    async def ListTemplateVersions(
        self, request: mail_pb2.ListTemplateVersionsRequest, context: Context
    ) -> mail_pb2.ListTemplateVersionsResponse:
        """See the proto."""
        page = await self._templates.versions(
            tenant_id=current_principal().tenant_id,
            ref=request.id,
            size=request.page_size,
            page_token=request.page_token,
        )
        return mail_pb2.ListTemplateVersionsResponse(
            versions=[mapping.version_to_proto(v) for v in page.versions],
            next_page_token=page.next_page_token,
        )

    async def RenderTemplate(
        self, request: mail_pb2.RenderTemplateRequest, context: Context
    ) -> mail_pb2.RenderedTemplate:
        """See the proto."""
        preview = await self._templates.preview(
            tenant_id=current_principal().tenant_id,
            ref=request.id,
            version=request.version,
            variables=mapping.struct_to_dict(request.variables)
            if request.HasField("variables")
            else {},
        )
        return mapping.rendered_to_proto(preview.rendered, preview.version)
