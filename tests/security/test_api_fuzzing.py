"""API fuzzing: every operation of the generated OpenAPI, through the gateway, authenticated.

No 5xx, every answer as the document declares it, and afterwards the tenant's data is still
consistent across the three services' collections. `make fuzz` runs the same test longer.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from services.core.mongo import Document
from tests.conftest import Tenant, unique_domain
from tests.gateway.conftest import bearer
from tests.security import fuzzing


async def _seed(http: aiohttp.ClientSession, base_url: str, tenant: Tenant) -> list[str]:
    """Two domains with SMTP data, so ids in paths sometimes name real objects."""
    ids = []
    for _ in range(2):
        async with http.post(
            f"{base_url}/api/v1/domains", json={"name": unique_domain()}, headers=bearer(tenant)
        ) as response:
            assert response.status == 200, await response.text()
            ids.append((await response.json())["id"])
    async with http.post(
        f"{base_url}/api/v1/smtp/domains/{ids[0]}/dkim", json={}, headers=bearer(tenant)
    ) as response:
        assert response.status == 200, await response.text()
    return ids


async def check_consistency(db: AsyncDatabase[Document], tenant_id: str) -> list[str]:
    """Every broken invariant of one tenant's stored data, described (empty when consistent).

    * ownership claims name an existing, active (or suspended) domain of the tenant with the
      claim's name, and every active domain holds its claim;
    * SMTP configs, DKIM keyrings and SPF/DMARC records belong to existing domains of the
      tenant (a deleted domain's SMTP data is purged with it);
    * API keys are the tenant's and carry no plaintext secret.
    """
    problems: list[str] = []
    domains = {d["_id"]: d async for d in db["domains"].find({"tenant_id": tenant_id})}
    names = [d["name"] for d in domains.values()]
    if len(names) != len(set(names)):
        problems.append(f"duplicate domain names: {sorted(names)}")
    claims = [c async for c in db["domain_claims"].find({"tenant_id": tenant_id})]
    claimed = {c["domain_id"] for c in claims}
    for claim in claims:
        domain = domains.get(claim["domain_id"])
        if domain is None:
            problems.append(f"claim on {claim['_id']} names missing domain {claim['domain_id']}")
        elif domain["name"] != claim["_id"] or domain["status"] not in ("active", "suspended"):
            problems.append(f"claim on {claim['_id']} does not match its domain {domain}")
    for domain_id, domain in domains.items():
        if domain["status"] == "active" and domain_id not in claimed:
            problems.append(f"active domain {domain['name']} holds no claim")
    for collection in ("smtp_configs", "dkim_keyrings", "auth_records"):
        async for doc in db[collection].find({"tenant_id": tenant_id}, {"_id": 1}):
            if doc["_id"] not in domains:
                problems.append(f"{collection} of deleted or unknown domain {doc['_id']}")
    # A document stored under another tenant's domain id would also be an orphan of ours.
    for collection in ("smtp_configs", "dkim_keyrings", "auth_records"):
        async for doc in db[collection].find(
            {"_id": {"$in": list(domains)}, "tenant_id": {"$ne": tenant_id}}, {"_id": 1}
        ):
            problems.append(f"{collection} of our domain {doc['_id']} stored for another tenant")
    return problems


# schemathesis' strategies call `random` inside Hypothesis, which Hypothesis deprecates (their
# problem, not a finding).
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_fuzzing_every_operation_finds_no_error(
    http: aiohttp.ClientSession,
    rest_base_url: str,
    tenant_a: Tenant,
    database: AsyncDatabase[Document],
) -> None:
    # Generated valid and invalid requests to every operation: no 5xx, no answer the document
    # does not allow, and the tenant's stored data stays consistent.
    domain_ids = await _seed(http, rest_base_url, tenant_a)
    assert await check_consistency(database, tenant_a.id) == []
    report = await asyncio.to_thread(
        fuzzing.run,
        base_url=rest_base_url,
        token=tenant_a.token,
        examples=fuzzing.examples_per_operation(),
        domain_ids=domain_ids,
        object_ids=[],
    )
    expected = set(fuzzing.operation_labels(fuzzing.load_schema()))
    assert set(report.requests_by_operation) == expected
    unreached = [op for op, count in report.requests_by_operation.items() if count == 0]
    assert unreached == [], "operations the fuzzer never called"
    assert report.findings == [], "\n".join(str(f) for f in report.findings[:20])
    assert not any(status >= 500 for status in report.statuses), report.statuses
    assert await check_consistency(database, tenant_a.id) == []
