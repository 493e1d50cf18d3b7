"""Typed keys of the gateway's aiohttp application and request storage.

aiohttp warns (NotAppKeyWarning) about plain string keys; typed keys also let mypy check the
values stored under them.
"""

from __future__ import annotations

from aiohttp import web

# The route template that answered (e.g. "/api/v1/emails/{id}"), for the access log.
ROUTE_KEY = web.RequestKey("azora_route", str)
# "Service/Method" of the transcoded rpc, for the access log.
RPC_KEY = web.RequestKey("azora_rpc", str)
# The request id the response carries (the service's, once it answered).
REQUEST_ID_KEY = web.RequestKey("azora_request_id", str)
