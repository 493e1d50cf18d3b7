"""/api/v1/events and /api/v1/suppressions over real HTTP through the local gateway."""

from __future__ import annotations

from urllib.parse import quote

import aiohttp

from tests.gateway.rest import call


async def test_suppressions_over_rest(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    # POST, GET (list and one, the address in the path), DELETE, with the JSON names of the
    # API; errors are 400 naming the field in its JSON spelling, 404 for an unknown address.
    base = f"{rest_base_url}/api/v1/suppressions"
    added = await call(http, "POST", base, json={"addresses": ["Ann@Example.ORG"]}, headers=auth)
    assert added.status == 200, added.json
    (entry,) = added.json["suppressions"]
    assert entry["address"] == "Ann@example.org"
    assert entry["reason"] == "manual"
    assert added.json["addedCount"] == 1
    one = await call(http, "GET", f"{base}/{quote('Ann@example.org')}", headers=auth)
    assert one.status == 200
    assert one.json["createTime"] == entry["createTime"]
    listed = await call(http, "GET", f"{base}?domain=example.org&reason=manual", headers=auth)
    assert [s["address"] for s in listed.json["suppressions"]] == ["Ann@example.org"]
    too_many = await call(
        http,
        "POST",
        base,
        json={"addresses": [f"u{n}@example.org" for n in range(1001)]},
        headers=auth,
    )
    assert too_many.status == 400
    (violation,) = next(
        d["fieldViolations"] for d in too_many.json["details"] if "fieldViolations" in d
    )
    assert violation["field"] == "addresses"
    bad = await call(
        http,
        "POST",
        base,
        json={"expireTime": "2000-01-01T00:00:00Z", "addresses": ["a@example.org"]},
        headers=auth,
    )
    assert bad.status == 400
    assert "expireTime" in str(bad.json)
    gone = await call(http, "DELETE", f"{base}/Ann@example.org", headers=auth)
    assert gone.status == 200
    missing = await call(http, "GET", f"{base}/Ann@example.org", headers=auth)
    assert missing.status == 404
    assert "SUPPRESSION_NOT_FOUND" in str(missing.json)


async def test_events_over_rest(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    # GET /api/v1/events answers a page (empty for a new tenant); an unknown type is 400 on
    # `type`, and an unknown query parameter is refused, not ignored.
    base = f"{rest_base_url}/api/v1/events"
    page = await call(http, "GET", f"{base}?type=bounced&pageSize=5", headers=auth)
    assert page.status == 200, page.json
    assert page.json["events"] == []
    bad = await call(http, "GET", f"{base}?type=opened", headers=auth)
    assert bad.status == 400
    (violation,) = next(d["fieldViolations"] for d in bad.json["details"] if "fieldViolations" in d)
    assert violation["field"] == "type"
    unknown = await call(http, "GET", f"{base}?typo=1", headers=auth)
    assert unknown.status == 400
