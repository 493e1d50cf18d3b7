"""The webhook paths of the issue over HTTP, through the gateway: each answers, errors name fields.

The receiver is a real aiohttp server on loopback; the test event it gets verifies with the
`standardwebhooks` library and the secret the create answer showed (and no later answer shows).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from standardwebhooks import Webhook as Verifier

from tests.gateway.rest import assert_status_json, call
from tests.support.webhook_receiver import Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A receiver answering 200."""
    started = await Receiver().start()
    yield started
    await started.close()


async def test_webhook_paths_answer_over_http(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str], receiver: Receiver
) -> None:
    hooks = f"{rest_base_url}/api/v1/webhooks"
    created = await call(
        http, "POST", hooks, json={"url": receiver.url, "eventTypes": ["sent"]}, headers=auth
    )
    assert created.status == 200, created.json
    secret = created.json["secret"]
    assert secret.startswith("whsec_")
    one = f"{hooks}/{created.json['id']}"
    listed = await call(http, "GET", hooks, headers=auth)
    assert [w["id"] for w in listed.json["webhooks"]] == [created.json["id"]]
    fetched = await call(http, "GET", one, headers=auth)
    assert fetched.json["eventTypes"] == ["sent"]
    replaced = await call(
        http, "PUT", one, json={"url": receiver.url, "description": "orders"}, headers=auth
    )
    assert replaced.status == 200, replaced.json
    assert replaced.json["eventTypes"] == []
    tested = await call(http, "POST", f"{one}/test", json={}, headers=auth)
    assert tested.status == 200, tested.json
    assert tested.json["success"] is True
    (request,) = receiver.requests
    assert Verifier(secret).verify(request.body, request.headers)["type"] == "webhook.test"
    deliveries = await call(http, "GET", f"{one}/deliveries", headers=auth)
    (delivery,) = deliveries.json["deliveries"]
    assert delivery["state"] == "WEBHOOK_DELIVERY_STATE_SUCCEEDED"
    replayed = await call(
        http, "POST", f"{one}/deliveries/{delivery['id']}/replay", json={}, headers=auth
    )
    assert replayed.status == 200, replayed.json
    assert replayed.json["state"] == "WEBHOOK_DELIVERY_STATE_PENDING"
    rotated = await call(http, "POST", f"{one}/rotate-secret", json={}, headers=auth)
    assert rotated.json["secret"].startswith("whsec_")
    for answer in (listed, fetched, replaced, tested, deliveries, replayed):
        assert secret not in answer.body.decode()
    deleted = await call(http, "DELETE", one, headers=auth)
    assert deleted.status == 200
    gone = await call(http, "GET", one, headers=auth)
    assert_status_json(gone, http_status=404, code=5)
    assert gone.error_info["reason"] == "WEBHOOK_NOT_FOUND"


async def test_webhook_validation_errors_name_the_json_field(
    http: aiohttp.ClientSession, rest_base_url: str, auth: dict[str, str]
) -> None:
    hooks = f"{rest_base_url}/api/v1/webhooks"
    bad_type = await call(
        http,
        "POST",
        hooks,
        json={"url": "https://hooks.example/", "eventTypes": ["sent", "opened"]},
        headers=auth,
    )
    assert_status_json(bad_type, http_status=400, code=3)
    assert "eventTypes[1]" in bad_type.violations
    bad_url = await call(http, "POST", hooks, json={"url": "gopher://x"}, headers=auth)
    assert_status_json(bad_url, http_status=400, code=3)
    assert "url" in bad_url.violations
