"""gRPC servicer of azora.smtp.v1.SmtpService: translates, calls one of the managers, translates."""

from __future__ import annotations

from typing import Any

import grpc
from azora.smtp.v1 import smtp_pb2, smtp_pb2_grpc
from google.protobuf import empty_pb2

from services.core.context import current_principal
from services.core.errors import NotFound
from services.core.ids import check_id
from services.smtp import mapping
from services.smtp.dkim_manager import DkimManager
from services.smtp.domain_data import DomainDataRemover
from services.smtp.records_manager import RecordsManager
from services.smtp.relay_manager import RelayManager

Context = grpc.aio.ServicerContext[Any, Any]


class SmtpServicer(smtp_pb2_grpc.SmtpServiceServicer):
    """SmtpService over the relay, DKIM and records managers."""

    def __init__(
        self,
        *,
        relays: RelayManager,
        dkim: DkimManager,
        records: RecordsManager,
        remover: DomainDataRemover,
    ) -> None:
        self._relays = relays
        self._dkim = dkim
        self._records = records
        self._remover = remover

    async def GetSmtpConfig(
        self, request: smtp_pb2.GetSmtpConfigRequest, context: Context
    ) -> smtp_pb2.SmtpConfig:
        """See the proto."""
        config = await self._relays.get_config(
            tenant_id=current_principal().tenant_id, domain_id=request.domain_id
        )
        return mapping.config_to_proto(config)

    async def UpdateSmtpConfig(
        self, request: smtp_pb2.UpdateSmtpConfigRequest, context: Context
    ) -> smtp_pb2.SmtpConfig:
        """See the proto."""
        config = await self._relays.update_config(
            tenant_id=current_principal().tenant_id,
            domain_id=request.domain_id,
            settings=mapping.relay_from_proto(request),
        )
        return mapping.config_to_proto(config)

    async def TestSmtpConnection(
        self, request: smtp_pb2.TestSmtpConnectionRequest, context: Context
    ) -> smtp_pb2.TestSmtpConnectionResponse:
        """See the proto."""
        report = await self._relays.test_connection(
            tenant_id=current_principal().tenant_id,
            domain_id=request.domain_id,
            settings=mapping.relay_from_proto(request.config)
            if request.HasField("config")
            else None,
        )
        return mapping.report_to_proto(report)

    async def GenerateDkimKey(
        self, request: smtp_pb2.GenerateDkimKeyRequest, context: Context
    ) -> smtp_pb2.DkimKey:
        """See the proto."""
        ring, key = await self._dkim.generate_dkim_key(
            tenant_id=current_principal().tenant_id,
            domain_id=request.domain_id,
            selector=request.selector,
            algorithm=mapping.algorithm_from_proto(request.algorithm),
            key_bits=request.key_bits,
            auto_activate=request.auto_activate,
        )
        return mapping.key_to_proto(ring, key)

    async def ListDkimKeys(
        self, request: smtp_pb2.ListDkimKeysRequest, context: Context
    ) -> smtp_pb2.ListDkimKeysResponse:
        """See the proto."""
        ring, keys = await self._dkim.list_dkim_keys(
            tenant_id=current_principal().tenant_id,
            domain_id=request.domain_id,
            check_dns=request.check_dns,
        )
        return smtp_pb2.ListDkimKeysResponse(keys=[mapping.key_to_proto(ring, k) for k in keys])

    async def ActivateDkimKey(
        self, request: smtp_pb2.ActivateDkimKeyRequest, context: Context
    ) -> smtp_pb2.DkimKey:
        """See the proto."""
        ring, key = await self._dkim.activate_dkim_key(
            tenant_id=current_principal().tenant_id,
            domain_id=request.domain_id,
            selector=request.selector,
            overlap=request.overlap.ToTimedelta() if request.HasField("overlap") else None,
        )
        return mapping.key_to_proto(ring, key)

    async def GenerateSpfRecord(
        self, request: smtp_pb2.GenerateSpfRecordRequest, context: Context
    ) -> smtp_pb2.SpfRecord:
        """See the proto."""
        record = await self._records.generate_spf(
            tenant_id=current_principal().tenant_id,
            domain_id=request.domain_id,
            mechanisms=mapping.mechanisms_from_proto(request.mechanisms),
            all_qualifier=mapping.qualifier_from_proto(request.all, "all"),
            redirect=request.redirect,
            exclude_relay=request.exclude_relay,
        )
        return mapping.spf_to_proto(record)

    async def GenerateDmarcRecord(
        self, request: smtp_pb2.GenerateDmarcRecordRequest, context: Context
    ) -> smtp_pb2.DmarcRecord:
        """See the proto."""
        record = await self._records.generate_dmarc(
            tenant_id=current_principal().tenant_id,
            domain_id=request.domain_id,
            request=mapping.dmarc_from_proto(request),
        )
        return mapping.dmarc_to_proto(record)

    async def CheckDnsRecords(
        self, request: smtp_pb2.CheckDnsRecordsRequest, context: Context
    ) -> smtp_pb2.CheckDnsRecordsResponse:
        """See the proto."""
        checks = await self._records.check_dns(
            tenant_id=current_principal().tenant_id, domain_id=request.domain_id
        )
        return smtp_pb2.CheckDnsRecordsResponse(
            checks=[mapping.record_check_to_proto(c) for c in checks],
            all_ok=all(c.status.value == "ok" for c in checks),
        )

    # --- internal rpcs (internal_only in the proto: service tokens only, no REST route) ------

    async def GetRelayCredentials(
        self, request: smtp_pb2.GetRelayCredentialsRequest, context: Context
    ) -> smtp_pb2.RelayCredentials:
        """See the proto."""
        tenant_id = current_principal().tenant_id
        if request.tenant_id and request.tenant_id != tenant_id:
            # The token's tenant scopes the lookup; naming another tenant finds nothing there.
            raise NotFound("SmtpConfig", request.domain_id)
        config, password = await self._relays.relay_credentials(
            tenant_id=tenant_id, domain_id=request.domain_id
        )
        public = mapping.config_to_proto(config)  # one place converts enums and times
        return smtp_pb2.RelayCredentials(
            domain_id=config.domain_id,
            host=public.host,
            port=public.port,
            security=public.security,
            username=public.username,
            password=password or "",
            client_hostname=public.client_hostname,
            timeout=public.timeout,
            tls_skip_verify=public.tls_skip_verify,
            update_time=public.update_time,
        )

    async def GetSigningKey(
        self, request: smtp_pb2.GetSigningKeyRequest, context: Context
    ) -> smtp_pb2.SigningKey:
        """See the proto."""
        # signing_key skips the ownership round trip, so the id is validated here.
        domain_id = check_id(request.domain_id, field="domain_id")
        key = await self._dkim.signing_key(
            tenant_id=current_principal().tenant_id, domain_id=domain_id
        )
        if key is None:
            raise NotFound("SigningKey", request.domain_id)
        return smtp_pb2.SigningKey(
            domain_id=request.domain_id,
            domain=key.domain,
            selector=key.selector,
            algorithm=key.algorithm.signing_algorithm,
            private_key_pem=key.private_key_pem,
        )

    async def DeleteDomainData(
        self, request: smtp_pb2.DeleteDomainDataRequest, context: Context
    ) -> empty_pb2.Empty:
        """See the proto."""
        await self._remover.delete_domain_data(
            tenant_id=current_principal().tenant_id,
            domain_id=check_id(request.domain_id, field="domain_id"),
        )
        return empty_pb2.Empty()
