"""/api/v1/domains/{id}/routes and /api/v1/inbound over real HTTP through the local gateway."""

from __future__ import annotations

import aiohttp

from services.core.ids import new_id
from tests.conftest import unique_domain
from tests.gateway.rest import call


async def test_routes_over_rest(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    # CRUD with the JSON names of the API; a bad value is 400 naming the field as the client
    # spelled it, an unknown field 400, an action not available yet 400 FAILED_PRECONDITION.
    domain = await call(
        http,
        "POST",
        f"{rest_base_url}/api/v1/domains",
        json={"name": unique_domain()},
        headers=auth,
    )
    assert domain.status == 200, domain.json
    base = f"{rest_base_url}/api/v1/domains/{domain.json['id']}/routes"
    created = await call(
        http,
        "POST",
        base,
        json={"match": "*", "priority": 5, "action": "reject", "rejectText": "Go away"},
        headers=auth,
    )
    assert created.status == 200, created.json
    route = created.json
    assert (route["match"], route["rejectText"], route["domainId"]) == (
        "*",
        "Go away",
        domain.json["id"],
    )
    listed = await call(http, "GET", base, headers=auth)
    assert [r["id"] for r in listed.json["routes"]] == [route["id"]]
    updated = await call(
        http,
        "PUT",
        f"{base}/{route['id']}",
        json={"match": "help", "action": "store"},
        headers=auth,
    )
    assert updated.status == 200, updated.json
    assert (updated.json["match"], updated.json["rejectText"]) == ("help", "")
    bad = await call(
        http, "POST", base, json={"match": "*", "action": "store", "rejectText": "x"}, headers=auth
    )
    assert bad.status == 400
    assert "rejectText" in bad.violations
    unknown = await call(
        http, "POST", base, json={"match": "*", "action": "store", "mach": "x"}, headers=auth
    )
    assert unknown.status == 400
    later = await call(
        http,
        "POST",
        base,
        json={"match": "*", "action": "webhook", "webhookUrl": "https://h.example/in"},
        headers=auth,
    )
    assert later.status == 400
    assert "webhookUrl" in later.violations
    assert "webhookId" in later.violations
    no_target = await call(
        http, "POST", base, json={"match": "*", "action": "forward", "forwardTo": []}, headers=auth
    )
    assert no_target.status == 400
    assert "forwardTo" in no_target.violations
    gone = await call(http, "DELETE", f"{base}/{route['id']}", headers=auth)
    assert gone.status == 200
    missing = await call(http, "GET", f"{base}/{route['id']}", headers=auth)
    assert missing.status == 404
    assert missing.error_info["reason"] == "INBOUND_ROUTE_NOT_FOUND"


async def test_inbound_messages_over_rest(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    # A new tenant has received nothing; unknown ids are 404, malformed ones 400 on `id`.
    base = f"{rest_base_url}/api/v1/inbound"
    listed = await call(http, "GET", base, headers=auth)
    assert listed.status == 200, listed.json
    assert listed.json["messages"] == []
    for path in (f"{base}/{new_id()}", f"{base}/{new_id()}/raw"):
        missing = await call(http, "GET", path, headers=auth)
        assert missing.status == 404
        assert missing.error_info["reason"] == "INBOUND_MESSAGE_NOT_FOUND"
    malformed = await call(http, "GET", f"{base}/not-an-id", headers=auth)
    assert malformed.status == 400
    assert "id" in malformed.violations
    bad_page = await call(http, "GET", f"{base}?pageToken=garbage", headers=auth)
    assert bad_page.status == 400
    assert "pageToken" in bad_page.violations
