"""The fake authorization server refuses what a real one refuses (so passing tests mean it)."""

from __future__ import annotations

import base64

from gateway.config import GRANT_TYPE_SAML2_BEARER
from gateway.oauth.client_auth import b64url, basic_authorization

from .helpers import StartAs, assertion
from .helpers import post_form as _post


def _grant(raw: bytes) -> dict[str, str]:
    return {"grant_type": GRANT_TYPE_SAML2_BEARER, "assertion": b64url(raw)}


async def test_credentials_sent_two_ways_are_refused(start_as: StartAs) -> None:
    fake = await start_as()
    form = {**_grant(assertion().raw), "client_secret": "s3cret"}
    status, body = await _post(
        fake.token_url, form, {"Authorization": basic_authorization("gateway", "s3cret")}
    )
    assert (status, body["error"]) == (400, "invalid_request")
    assert fake.issued == []


async def test_wrong_grant_type_and_unpadded_check(start_as: StartAs) -> None:
    fake = await start_as()
    auth = {"Authorization": basic_authorization("gateway", "s3cret")}
    status, body = await _post(fake.token_url, {"grant_type": "password", "assertion": "x"}, auth)
    assert (status, body["error"]) == (400, "unsupported_grant_type")
    padded = base64.urlsafe_b64encode(assertion().raw + b"x").decode()
    assert padded.endswith("=")
    status, body = await _post(
        fake.token_url, {"grant_type": GRANT_TYPE_SAML2_BEARER, "assertion": padded}, auth
    )
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = await _post(fake.token_url, _grant(assertion("_ok").raw), auth)
    assert status == 200 and body["access_token"] == fake.issued[0]
    assert fake.assertion_ids == ["_ok"]


async def test_one_time_use_and_bad_secret(start_as: StartAs) -> None:
    fake = await start_as(one_time_use=True)
    good = {"Authorization": basic_authorization("gateway", "s3cret")}
    bad = {"Authorization": basic_authorization("gateway", "guess")}
    used = assertion().raw
    assert (await _post(fake.token_url, _grant(used), bad))[0] == 401
    assert (await _post(fake.token_url, _grant(used), good))[0] == 200
    status, body = await _post(fake.token_url, _grant(used), good)
    assert (status, body["error"]) == (400, "invalid_grant")
