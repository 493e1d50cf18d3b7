"""The bounce mailbox: messages to the return paths of our outgoing mail, read and applied.

Every message the inbound server accepts for a return path (``bounce-<token>@<bounce
domain>``, services/mail/return_paths.py) comes here, and every one is stored
(`InboundStore.keep_report`, action ``bounce``) with what was done with it as its outcome:

* ``ignored: not an authentic return path``: the token does not verify (forged, altered, or
  made with a key we no longer know). Stored under no tenant (no email, hence no tenant, can be
  trusted from it), listed by no tenant's ``GET /api/v1/inbound``; the log line names its id.
* ``ignored: ...``: an authentic token whose email is gone (retention) or whose report is about
  recipients the token does not name, or a recipient the relay never accepted.
* ``unparsable: <reason>``: the token is authentic but the message is not a report
  `reports.parse_report` understands (an auto-reply, a human answer): kept for the email's
  tenant with the reason, listed by ``GET /api/v1/inbound``, never dropped.
* ``applied: bounced a@b (5.1.1)`` (or ``deferred``, ``complained``) / ``already applied: ...``:
  the report's entry for the recipient the token names went to `LateFeedback.apply`.

Who the report is about comes from the token, never from the report's text: a report's own
``Final-Recipient`` may name an address the message was forwarded to, so when the report lists
one recipient only, it is taken as the token's; with several, only the one the token names is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from services.mail.feedback.late_feedback import LateFeedback
from services.mail.inbound.reports import (
    RecipientReport,
    Report,
    ReportKind,
    UnparsableReport,
    parse_report,
)
from services.mail.inbound.store import InboundRecord, InboundStore, Received
from services.mail.models import FeedbackKind
from services.mail.repository import MongoEmailRepository
from services.mail.return_paths import ReturnPaths

log = logging.getLogger(__name__)

ACTION = "bounce"
# The tenant of records whose return path is not authentic: no tenant's listing shows them.
NO_TENANT = ""


class BounceMailbox:
    """Receives messages to return paths (see the module docstring)."""

    def __init__(
        self,
        *,
        store: InboundStore,
        feedback: LateFeedback,
        emails: MongoEmailRepository,
        return_paths: ReturnPaths,
    ) -> None:
        self._store = store
        self._feedback = feedback
        self._emails = emails
        self._return_paths = return_paths

    async def receive(self, received: Received) -> InboundRecord:
        """Read, apply and store one message to a return path; the stored record.

        Raises:
            InvalidArgument: no message, one over the size limit, no recipient.
            Conflict: the email is still being delivered (or changed concurrently): nothing
                is stored, the sender keeps the message and retries.
        """
        received = replace(received, action=ACTION, route_id="", domain_id="")
        token = self._return_paths.parse(received.recipient)
        if token is None:
            record = await self._store.keep_report(
                tenant_id=NO_TENANT,
                received=received,
                outcome="ignored: not an authentic return path (forged or altered token)",
            )
            log.warning(
                "message to a forged return path ignored",
                extra={"fields": {"record": record.id, "client": received.client_address}},
            )
            return record
        email = await self._emails.get_any(email_id=token.email_id)
        if email is None:
            return await self._store.keep_report(
                tenant_id=NO_TENANT,
                received=received,
                outcome=f"ignored: email {token.email_id} is no longer stored",
            )
        received = replace(received, domain_id=email.domain_id)
        ours = next((r.address for r in email.recipients if token.names(r.address)), None)
        outcome: str
        if ours is None:
            outcome = "ignored: the return path names no recipient of the email"
        else:
            try:
                report = parse_report(received.raw)
            except UnparsableReport as exc:
                outcome = f"unparsable: {exc.reason}"
            else:
                outcome = await self._apply(email.id, ours, token.names, report, received)
        return await self._store.keep_report(
            tenant_id=email.tenant_id, received=received, outcome=outcome
        )

    async def _apply(
        self,
        email_id: str,
        recipient: str,
        names: Callable[[str], bool],
        report: Report,
        received: Received,
    ) -> str:
        entries = _entries_for(report, names)
        if not entries:
            listed = ", ".join(r.address for r in report.recipients)
            return f"ignored: the report is about other recipients ({listed})"
        outcomes = []
        for entry in entries:
            result = await self._feedback.apply(
                email_id=email_id,
                recipient=recipient,
                kind=_kind(report, entry),
                status=entry.status,
                diagnostic=entry.diagnostic,
                source=_source(report, received),
            )
            outcomes.append(result.outcome)
        return "; ".join(dict.fromkeys(outcomes))


def _entries_for(report: Report, names: Callable[[str], bool]) -> list[RecipientReport]:
    """The report's entries about the token's recipient (see the module docstring)."""
    named = [r for r in report.recipients if names(r.address)]
    if named:
        return named
    return list(report.recipients) if len(report.recipients) == 1 else []


def _kind(report: Report, entry: RecipientReport) -> FeedbackKind:
    if report.kind is ReportKind.COMPLAINT:
        return FeedbackKind.COMPLAINT
    if entry.action == "failed" and entry.permanent:
        return FeedbackKind.BOUNCE
    return FeedbackKind.DELAY


def _source(report: Report, received: Received) -> str:
    """Who reported it: the reporting MTA the report names, else the client that sent it."""
    reporter = report.reporting_mta or received.helo or received.client_address or "unknown"
    if report.kind is ReportKind.COMPLAINT:
        return f"arf {report.feedback_type or 'complaint'} report from {reporter}"
    return f"dsn from {reporter}"


__all__ = ["ACTION", "NO_TENANT", "BounceMailbox"]
