"""The cache's bookkeeping on its own: synchronous, no event loop, a hand-driven clock."""

from __future__ import annotations

import pytest

from gateway.cache.entry import CachedToken
from gateway.cache.table import CacheTable
from gateway.errors import InvalidAssertion
from gateway.saml.assertion import Assertion
from gateway.values import Token

from .helpers import Clock, assertion, settings

KEY = "idp\x1fas\x1f0123456789abcdef"


def table(clock: Clock, **overrides: object) -> CacheTable:
    return CacheTable(settings(**overrides), clock=clock, rng=lambda: 0.0)


def obtained(
    t: CacheTable, presented: Assertion, token: str = "tok", expires_in: float = 3600
) -> CachedToken:
    """What TokenCache does around one successful exchange."""
    generation = t.admit(KEY, presented)
    entry = t.entry(KEY, presented, Token(access_token=token, expires_in=expires_in))
    return t.keep(presented, entry, generation)


def test_an_obtained_token_is_found_by_its_bytes_and_by_its_id() -> None:
    clock = Clock()
    t = table(clock)
    presented = assertion()
    assert t.served(KEY, presented) is None  # nothing bound yet: may be exchanged
    entry = obtained(t, presented)
    assert t.lookup(KEY, presented.digest) is entry
    assert t.lookup("other", presented.digest) is None  # the cache key is part of the key
    assert t.served(KEY, presented) is entry
    assert (t.hits, t.misses, len(t)) == (1, 1, 1)


def test_a_byte_variant_is_served_after_validation_and_then_on_the_hot_path() -> None:
    t = table(Clock())
    first = assertion("_v1")
    entry = obtained(t, first)
    variant = assertion("_v1", variant="\n")
    assert t.lookup(KEY, variant.digest) is None  # not validated here yet
    assert t.served(KEY, variant) is entry
    assert t.lookup(KEY, variant.digest) is entry


def test_another_signed_assertion_under_a_bound_id_is_a_replay() -> None:
    t = table(Clock())
    obtained(t, assertion("_r1", body="alice"))
    with pytest.raises(InvalidAssertion) as caught:
        t.served(KEY, assertion("_r1", body="mallory"))
    assert caught.value.reason == "replay"
    assert t.replays == 1


def test_an_expired_token_is_never_served_and_its_assertion_is_spent() -> None:
    clock = Clock()
    t = table(clock, refresh_margin=0)
    presented = assertion("_s1")
    obtained(t, presented, expires_in=60)
    clock.advance(60)
    assert t.lookup(KEY, presented.digest) is None
    with pytest.raises(InvalidAssertion) as caught:
        t.served(KEY, presented)
    assert caught.value.reason == "spent"


def test_the_binding_lapses_where_validation_stops_accepting_the_assertion() -> None:
    clock = Clock()
    t = table(clock, refresh_margin=0)
    presented = assertion("_l1", not_on_or_after=clock.now + 120)
    obtained(t, presented, expires_in=60)
    clock.advance(121)
    assert t.served(KEY, presented) is None  # no longer bound: validation decides now


def test_the_token_is_capped_where_validation_stops_accepting_the_assertion() -> None:
    clock = Clock()
    presented = assertion("_c1", not_on_or_after=clock.now + 100, clock_skew=30)
    capped = table(clock, refresh_margin=0, cap_to_assertion=True)
    assert obtained(capped, presented, expires_in=3600).expires_at == clock.now + 130
    uncapped = table(clock, refresh_margin=0)  # the default: the token's own life
    assert obtained(uncapped, presented, expires_in=3600).expires_at == clock.now + 3600


def test_a_remembered_refusal_lasts_negative_ttl() -> None:
    clock = Clock()
    t = table(clock, negative_ttl=30)
    presented = assertion("_n1")
    t.admit(KEY, presented)
    t.remember_refusal(KEY, presented.id)
    with pytest.raises(InvalidAssertion) as caught:
        t.admit(KEY, assertion("_n1", variant=" "))  # byte variants count as one
    assert caught.value.reason == "invalid_grant"
    assert t.negative_hits == 1
    clock.advance(30)
    t.admit(KEY, presented)  # asked again


def test_forget_drops_the_keys_tokens_and_what_an_older_exchange_brings_back() -> None:
    t = table(Clock())
    kept = obtained(t, assertion("_f1"))
    late = assertion("_f2")
    generation = t.admit(KEY, late)  # an exchange starts ...
    assert t.forget(KEY) == 1  # ... the trust changes meanwhile
    entry = t.entry(KEY, late, Token(access_token="late", expires_in=3600))
    assert t.keep(late, entry, generation) is entry  # handed to its caller ...
    assert t.lookup(KEY, late.digest) is None  # ... not kept
    assert t.lookup(KEY, kept.digest) is None
    assert len(t) == 0


def test_purge_allows_one_more_exchange() -> None:
    t = table(Clock())
    presented = assertion("_p1")
    entry = obtained(t, presented)
    assert not t.superseded(entry)
    assert t.purge(entry) is True
    assert t.lookup(KEY, presented.digest) is None
    assert t.served(KEY, presented) is None  # not spent: may be exchanged again
    assert t.purge(entry) is False  # once
    newer = obtained(t, presented, token="tok-2")
    assert t.superseded(entry) and not t.superseded(newer)


def test_the_lru_bound_evicts_bindings_with_their_hot_path_keys() -> None:
    t = table(Clock(), max_entries=2)
    first, second, third = assertion("_e1"), assertion("_e2"), assertion("_e3")
    for presented in (first, second, third):
        obtained(t, presented)
    assert t.lookup(KEY, first.digest) is None
    assert t.lookup(KEY, third.digest) is not None
    assert (t.evictions, len(t)) == (1, 2)


def test_hot_path_keys_per_id_are_bounded() -> None:
    t = table(Clock())
    obtained(t, assertion("_b1"))
    variants = [assertion("_b1", variant=" " * n) for n in range(1, 10)]
    for variant in variants:
        t.served(KEY, variant)
    found = [v for v in variants if t.lookup(KEY, v.digest) is not None]
    assert 0 < len(found) < len(variants)


def test_an_id_another_replica_bound_first_is_claimed_for_its_assertion() -> None:
    t = table(Clock())
    mine = assertion("_x1", body="alice")
    t.admit(KEY, mine)
    theirs = assertion("_x1", body="bob")
    refusal = t.replay_elsewhere(KEY, mine, theirs.fingerprint)
    assert refusal.reason == "replay"
    with pytest.raises(InvalidAssertion):
        t.served(KEY, mine)  # the ID is now known to belong to the other assertion
    assert t.served(KEY, theirs) is None
