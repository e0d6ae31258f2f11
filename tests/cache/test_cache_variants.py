"""One exchange per assertion ID, whatever its bytes: byte variants of one signed assertion,
other signed assertions reusing its ID, the cap at the assertion's end, and re-exchanges
after the upstream refused a token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from lxml import etree

from gateway.cache import TokenCache
from gateway.devkit.idp import DemoIdP
from gateway.errors import InvalidAssertion
from gateway.saml import PinnedKey, TrustPolicy, assertion_digest, parse_xml, validate_assertion

from .helpers import T0, Clock, Exchange, MemoryShared, assertion, settings

ISSUER = "https://idp.variants.test"
AUDIENCE = "https://as.variants.test"
RECIPIENT = "https://as.variants.test/token"
NOW = datetime.now(UTC).replace(microsecond=0)  # the IdP's certificate is valid from now
SKEW = timedelta(seconds=120)


@pytest.fixture(scope="module")
def idp() -> DemoIdP:
    return DemoIdP.generate(ISSUER, "rsa")


@pytest.fixture(scope="module")
def policy(idp: DemoIdP) -> TrustPolicy:
    return TrustPolicy(
        keys=(PinnedKey.from_certificate(idp.certificate, "test"),),
        issuers=frozenset({ISSUER}),
        audience=AUDIENCE,
        recipients=frozenset({RECIPIENT}),
        clock_skew=SKEW,
    )


def byte_variants(raw: bytes) -> list[bytes]:
    """Six encodings of one signed assertion: the signature stays valid for each."""
    declaration = b'<?xml version="1.0" encoding="UTF-8"?>'
    return [
        raw,
        raw + b"\n",
        raw + b"  \n\t ",
        declaration + raw,
        declaration + b"\n" + raw + b"\n",
        b"<?xml version='1.0'?>\r\n" + raw,
    ]


def test_every_byte_variant_has_the_fingerprint_of_what_was_signed(
    idp: DemoIdP, policy: TrustPolicy
) -> None:
    raw = idp.issue(
        "alice@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW, assertion_id="_v1"
    )
    validated = [validate_assertion(v, policy, NOW) for v in byte_variants(raw)]
    assert len({a.digest for a in validated}) == 6  # six hot-path keys ...
    assert len({a.fingerprint for a in validated}) == 1  # ... one signed assertion
    assert len(validated[0].fingerprint) == 32
    # In a samlp:Response envelope it is still the same signed assertion.
    signed = parse_xml(raw)
    envelope = etree.tostring(idp.build_response([signed], destination=RECIPIENT, now=NOW))
    wrapped = validate_assertion(envelope, policy, NOW)
    assert wrapped.digest == assertion_digest(envelope) != validated[0].digest
    assert wrapped.fingerprint == validated[0].fingerprint
    # Another signed assertion with the same ID is not.
    other = idp.issue(
        "bob@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW, assertion_id="_v1"
    )
    assert validate_assertion(other, policy, NOW).fingerprint != validated[0].fingerprint


def test_accepted_until_is_where_validation_stops(idp: DemoIdP, policy: TrustPolicy) -> None:
    raw = idp.issue("alice@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    validated = validate_assertion(raw, policy, NOW)
    assert validated.accepted_until == NOW + timedelta(seconds=300) + SKEW
    last = validated.accepted_until - timedelta(seconds=1)
    assert validate_assertion(raw, policy, last).id == validated.id
    with pytest.raises(InvalidAssertion) as raised:
        validate_assertion(raw, policy, validated.accepted_until)
    assert raised.value.reason == "expired"


# --- the cache -----------------------------------------------------------------------


async def test_byte_variants_share_one_token() -> None:
    cache, exchange = TokenCache(settings(), clock=Clock()), Exchange()
    variants = [assertion("_share", variant=" " * n) for n in range(6)]
    entries = [await cache.obtain("as", v, exchange) for v in variants]
    assert exchange.calls == ["_share"]
    assert {e.token.access_token for e in entries} == {"tok-1"}
    # each validated variant now hits the hot path (a few per ID at most)
    hits = [cache.lookup("as", v.digest) for v in variants]
    assert hits[:5] == [entries[0]] * 5 and hits[5] is None
    assert len(cache) == 1


async def test_invalid_grant_is_remembered_for_every_byte_variant() -> None:
    exchange = Exchange()
    exchange.error = InvalidAssertion("invalid_grant", "refused")
    cache = TokenCache(settings(negative_ttl=30), clock=Clock())
    for n in range(6):
        with pytest.raises(InvalidAssertion) as raised:
            await cache.obtain("as", assertion("_bad", variant="\n" * n), exchange)
        assert raised.value.reason == "invalid_grant"
    assert exchange.calls == ["_bad"]
    assert cache.negative_hits == 5


async def test_once_its_token_is_no_longer_served_the_assertion_is_spent() -> None:
    clock, exchange = Clock(), Exchange(expires_in=60)
    cache = TokenCache(settings(refresh_margin=0), clock=clock)
    presented = assertion("_short", not_on_or_after=T0 + 3600)
    await cache.obtain("as", presented, exchange)
    clock.advance(61)  # the token is over, the assertion still valid for an hour
    for same in (presented, assertion("_short", variant="\n", not_on_or_after=T0 + 3600)):
        assert cache.lookup("as", same.digest) is None
        with pytest.raises(InvalidAssertion) as raised:
            await cache.obtain("as", same, exchange)
        assert raised.value.reason == "spent"
    assert exchange.calls == ["_short"]  # the AS never sees the ID twice


async def test_another_signed_assertion_reusing_the_id_is_a_replay_after_the_token() -> None:
    clock, exchange = Clock(), Exchange(expires_in=60)
    cache = TokenCache(settings(refresh_margin=0), clock=clock)
    await cache.obtain("as", assertion("_reused", not_on_or_after=T0 + 3600), exchange)
    clock.advance(120)
    with pytest.raises(InvalidAssertion) as raised:
        await cache.obtain("as", assertion("_reused", body="mallory"), exchange)
    assert raised.value.reason == "replay" and cache.replays == 1
    assert exchange.calls == ["_reused"]


async def test_failed_exchange_leaves_the_assertion_usable() -> None:
    exchange = Exchange()
    exchange.error = InvalidAssertion("invalid_grant", "refused")
    cache = TokenCache(settings(negative_ttl=0), clock=Clock())
    presented = assertion("_retry")
    with pytest.raises(InvalidAssertion):
        await cache.obtain("as", presented, exchange)
    exchange.error = None
    assert (await cache.obtain("as", presented, exchange)).token.access_token == "tok-2"
    # but the ID stays bound to it
    with pytest.raises(InvalidAssertion) as raised:
        await cache.obtain("as", assertion("_retry", body="mallory"), exchange)
    assert raised.value.reason == "replay"


async def test_cap_to_assertion_uses_the_validation_skew() -> None:
    clock, exchange = Clock(), Exchange()
    cache = TokenCache(settings(cap_to_assertion=True), clock=clock)
    # NotOnOrAfter passed a minute ago; validation still accepts it for another minute.
    during_skew = assertion("_skew", not_on_or_after=T0 - 60, clock_skew=120)
    entries = [await cache.obtain("as", during_skew, exchange) for _ in range(10)]
    assert len(exchange.calls) == 1
    assert entries[0].expires_at == T0 + 60  # never born expired
    assert cache.ttl(entries[0]) == 60
    assert cache.lookup("as", during_skew.digest) is entries[0]


async def test_an_upstream_refusal_allows_one_more_exchange() -> None:
    """The pipeline purges a token the upstream refused (at most once per
    proxy.reexchange_interval): its assertion, otherwise spent, may be exchanged once more."""
    clock, exchange = Clock(), Exchange()
    cache = TokenCache(settings(), clock=clock)
    presented = assertion("_refused")
    entry = await cache.obtain("as", presented, exchange)
    assert await cache.purge(entry) is True
    assert await cache.purge(entry) is False  # already dropped
    renewed = await cache.obtain("as", presented, exchange)
    assert renewed.token.access_token == "tok-2"
    assert await cache.obtain("as", presented, exchange) is renewed  # served, not exchanged
    clock.advance(3600)  # the renewed token is over too: spent again
    with pytest.raises(InvalidAssertion) as raised:
        await cache.obtain("as", presented, exchange)
    assert raised.value.reason == "spent"
    assert len(exchange.calls) == 2


# --- through a shared store (as two replicas would) ----------------------------------


async def test_a_variant_on_another_replica_shares_the_token() -> None:
    clock = Clock()
    shared, exchange = MemoryShared(clock), Exchange()
    first, second = (TokenCache(settings(), shared=shared, clock=clock) for _ in range(2))
    await first.obtain("as", assertion("_rep"), exchange)
    entry = await second.obtain("as", assertion("_rep", variant="\n"), exchange)
    assert entry.token.access_token == "tok-1" and exchange.calls == ["_rep"]


async def test_another_replica_refuses_a_reused_id_without_asking_the_as() -> None:
    clock = Clock()
    shared, exchange = MemoryShared(clock), Exchange(expires_in=60)
    first, second = (
        TokenCache(settings(refresh_margin=0), shared=shared, clock=clock) for _ in range(2)
    )
    await first.obtain("as", assertion("_rep2", not_on_or_after=T0 + 3600), exchange)
    clock.advance(120)
    shared.entries.pop(("as", "_rep2"))  # the token expired in the store too
    with pytest.raises(InvalidAssertion) as raised:
        await second.obtain("as", assertion("_rep2", body="mallory"), exchange)
    assert raised.value.reason == "replay"
    with pytest.raises(InvalidAssertion) as raised:
        await second.obtain("as", assertion("_rep2", variant="\n"), exchange)
    assert raised.value.reason == "spent"
    assert exchange.calls == ["_rep2"]


async def test_a_store_that_forgot_the_binding_still_gets_the_replica_s_own() -> None:
    clock = Clock()
    shared, exchange = MemoryShared(clock), Exchange()
    cache = TokenCache(settings(), shared=shared, clock=clock)
    await cache.obtain("as", assertion("_mem"), exchange)
    shared.bindings.clear()  # Redis restarted empty
    with pytest.raises(InvalidAssertion) as raised:
        await cache.obtain("as", assertion("_mem", body="mallory"), exchange)
    assert raised.value.reason == "replay"
