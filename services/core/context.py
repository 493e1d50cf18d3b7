"""Per-request context carried in contextvars: request id and the authenticated principal.

gRPC aio runs each call in its own task, so contextvars set by the interceptors are visible to
the servicer, the domain code and every log line of that call, and to nothing else.
"""

from __future__ import annotations

import contextvars
import secrets
from dataclasses import dataclass

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who makes a request: a subject of a tenant with scopes.

    Attributes:
        tenant_id: every resource the principal touches is filtered by it.
        subject: "user:<sub>" for a JWT, "apikey:<id>" for an API key, "dev" in development.
        scopes: granted scopes; "*" grants everything.
        credentials: the raw authorization value, forwarded on calls to other services so they
            authenticate the same principal (never logged).
        test: a test API key: the emails it sends are simulated, never handed to a relay, and
            count against no sending quota.
    """

    tenant_id: str
    subject: str
    scopes: frozenset[str]
    credentials: str = ""
    test: bool = False

    def has_scope(self, scope: str) -> bool:
        """Whether the principal may use a method that requires `scope`."""
        return not scope or "*" in self.scopes or scope in self.scopes

    def __repr__(self) -> str:  # keep credentials out of reprs and logs
        return (
            f"Principal(tenant_id={self.tenant_id!r}, subject={self.subject!r}, test={self.test})"
        )


principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "principal", default=None
)


def new_request_id() -> str:
    """A fresh random request id (used when the caller sent none)."""
    return secrets.token_hex(8)


def current_principal() -> Principal:
    """The principal of the running request.

    Raises:
        RuntimeError: called outside an authenticated request (a programming error).
    """
    principal = principal_var.get()
    if principal is None:
        raise RuntimeError("no authenticated principal in this context")
    return principal
