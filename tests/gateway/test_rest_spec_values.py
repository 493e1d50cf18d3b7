"""REST users write the values the product spec and the RFCs use, and nothing is replaced.

Record types "A", "MX", ...; DMARC policies "none", "quarantine", "reject"; relay security
"none", "starttls", "tls" and the spec's `secure` boolean. Today's enum names still work, and a
value that is none of them is 400 naming the field and listing what is accepted.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import unique_domain
from tests.gateway.rest import assert_status_json, call
from tests.support.ports import closed_port


async def new_domain(http: aiohttp.ClientSession, base: str, auth: dict[str, str]) -> str:
    created = await call(
        http, "POST", f"{base}/api/v1/domains", json={"name": unique_domain()}, headers=auth
    )
    assert created.status == 200, created.json
    return str(created.json["id"])


def relay(**fields: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": closed_port(), **fields}


@pytest.mark.parametrize(
    ("fields", "stored"),
    [
        ({"security": "none"}, "SECURITY_MODE_NONE"),
        ({"security": "starttls"}, "SECURITY_MODE_STARTTLS_REQUIRED"),
        ({"security": "tls"}, "SECURITY_MODE_IMPLICIT_TLS"),
        ({"security": "TLS", "secure": True}, "SECURITY_MODE_IMPLICIT_TLS"),
        ({"secure": True}, "SECURITY_MODE_IMPLICIT_TLS"),
        ({"secure": False}, "SECURITY_MODE_STARTTLS_REQUIRED"),
        ({"security": "starttls_opportunistic"}, "SECURITY_MODE_STARTTLS_OPPORTUNISTIC"),
        ({"security": "SECURITY_MODE_NONE"}, "SECURITY_MODE_NONE"),
    ],
)
async def test_relay_security_is_stored_as_sent(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    auth: dict[str, str],
    fields: dict[str, Any],
    stored: str,
) -> None:
    config = f"{rest_base_url}/api/v1/smtp/domains/{await new_domain(http, rest_base_url, auth)}"
    put = await call(http, "PUT", f"{config}/config", json=relay(**fields), headers=auth)
    assert put.status == 200, put.json
    got = await call(http, "GET", f"{config}/config", headers=auth)
    assert got.json["security"] == stored
    assert got.json["secure"] is (stored == "SECURITY_MODE_IMPLICIT_TLS")


async def test_unknown_or_contradicting_security_is_refused(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    config = f"{rest_base_url}/api/v1/smtp/domains/{await new_domain(http, rest_base_url, auth)}"
    for fields, field in (
        ({"security": "ssl"}, "security"),
        ({"security": "none", "secure": True}, "secure"),
    ):
        reply = await call(http, "PUT", f"{config}/config", json=relay(**fields), headers=auth)
        assert_status_json(reply, http_status=400, code=3)
        assert list(reply.violations) == [field], reply.json
    unknown = await call(http, "PUT", f"{config}/config", json=relay(security="ssl"), headers=auth)
    assert "none, starttls, tls" in unknown.violations["security"]
    nothing = await call(http, "GET", f"{config}/config", headers=auth)
    assert_status_json(nothing, http_status=404, code=5)


async def test_record_types_as_rfcs_write_them(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    dns = f"{rest_base_url}/api/v1/domains/{await new_domain(http, rest_base_url, auth)}/dns"
    records = [
        {"type": "A", "name": "www", "value": "192.0.2.1"},
        {"type": "aaaa", "name": "www", "value": "2001:db8::1"},
        {"type": "MX", "name": "@", "value": "mx.example.net", "priority": 10},
        {"type": "DNS_RECORD_TYPE_TXT", "name": "@", "value": "hello"},
    ]
    put = await call(http, "PUT", dns, json={"records": records}, headers=auth)
    assert put.status == 200, put.json
    assert [r["type"] for r in put.json["dnsRecords"]] == ["A", "AAAA", "MX", "TXT"]
    bad = await call(
        http, "PUT", dns, json={"records": [*records, {"type": "SPF", "value": "x"}]}, headers=auth
    )
    assert_status_json(bad, http_status=400, code=3)
    assert "A, AAAA, CNAME, MX, TXT, SRV, PTR" in bad.violations["records[4].type"]


async def test_dmarc_policies_as_rfc_7489_writes_them(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    dmarc = f"{rest_base_url}/api/v1/smtp/domains/{await new_domain(http, rest_base_url, auth)}"
    for body, tags in (
        ({"policy": "reject"}, "p=reject"),
        ({"policy": "Quarantine", "subdomainPolicy": "none"}, "p=quarantine; sp=none"),
        ({"policy": "DMARC_POLICY_NONE"}, "p=none"),
    ):
        reply = await call(http, "POST", f"{dmarc}/dmarc", json=body, headers=auth)
        assert reply.status == 200, reply.json
        assert tags in reply.json["recordValue"]
    for body, field in (({"policy": "block"}, "policy"), ({}, "policy")):
        reply = await call(http, "POST", f"{dmarc}/dmarc", json=body, headers=auth)
        assert_status_json(reply, http_status=400, code=3)
        assert "none, quarantine" in reply.violations[field], reply.json
    sub = await call(
        http,
        "POST",
        f"{dmarc}/dmarc",
        json={"policy": "none", "subdomainPolicy": "x"},
        headers=auth,
    )
    assert list(sub.violations) == ["subdomainPolicy"]


async def test_dkim_spf_and_alignment_values_as_their_rfcs_write_them(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    # k= (RFC 6376/8463), SPF qualifiers (RFC 7208) and adkim=/aspf= (RFC 7489): as written in
    # the records, and refused naming the field when they are none of the accepted values.
    smtp = f"{rest_base_url}/api/v1/smtp/domains/{await new_domain(http, rest_base_url, auth)}"
    key = await call(http, "POST", f"{smtp}/dkim", json={"algorithm": "ed25519"}, headers=auth)
    assert key.status == 200, key.json
    assert key.json["recordValue"].startswith("v=DKIM1; k=ed25519; p=")
    spf = {"mechanisms": [{"kind": "ip4", "value": "192.0.2.1", "qualifier": "-"}], "all": "-"}
    spf_reply = await call(http, "POST", f"{smtp}/spf", json=spf, headers=auth)
    assert spf_reply.status == 200, spf_reply.json
    assert "-ip4:192.0.2.1" in spf_reply.json["recordValue"]
    assert spf_reply.json["recordValue"].endswith(" -all")
    dmarc = {"policy": "none", "dkimAlignment": "s", "spfAlignment": "strict"}
    dmarc_reply = await call(http, "POST", f"{smtp}/dmarc", json=dmarc, headers=auth)
    assert dmarc_reply.status == 200, dmarc_reply.json
    assert "adkim=s; aspf=s" in dmarc_reply.json["recordValue"]
    for path, body, field in (
        ("dkim", {"algorithm": "dsa"}, "algorithm"),
        ("spf", {"all": "fail!"}, "all"),
        ("spf", {"mechanisms": [{"kind": "mx", "qualifier": "x"}]}, "mechanisms[0].qualifier"),
        ("dmarc", {"policy": "none", "spfAlignment": "loose"}, "spfAlignment"),
    ):
        reply = await call(http, "POST", f"{smtp}/{path}", json=body, headers=auth)
        assert_status_json(reply, http_status=400, code=3)
        assert list(reply.violations) == [field], reply.json
