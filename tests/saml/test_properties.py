"""Property: whatever arrives, only the gateway's own errors come out."""

from __future__ import annotations

import base64
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway.config import AssertionSettings
from gateway.devkit.idp import DemoIdP
from gateway.errors import GatewayError
from gateway.saml import (
    PinnedKey,
    TrustPolicy,
    extract_assertion,
    parse_xml,
    validate_assertion,
)

from .helpers import AUDIENCE, ISSUER, NOW, RECIPIENT

_IDP = DemoIdP.generate(ISSUER, "ec")  # EC keeps signing fast for the mutation corpus
_POLICY = TrustPolicy(
    keys=(PinnedKey.from_certificate(_IDP.certificate, "test"),),
    issuers=frozenset({ISSUER}),
    audience=AUDIENCE,
    recipients=frozenset({RECIPIENT}),
    clock_skew=timedelta(seconds=120),
    allow_sha1=True,
)
_VALID = _IDP.issue("fuzz@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
_RESPONSE = _IDP.issue_response(
    "fuzz@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW, sign_response=True
)
_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _outcome(raw: bytes) -> str:
    try:
        validate_assertion(raw, _POLICY, NOW)
    except GatewayError as exc:
        return exc.reason
    return "accepted"


def test_the_corpus_is_valid() -> None:
    assert _outcome(_VALID) == "accepted"
    assert _outcome(_RESPONSE) == "accepted"


@_FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(raw: bytes) -> None:
    assert _outcome(raw) != "accepted"


@_FUZZ
@given(
    st.sampled_from([_VALID, _RESPONSE]),
    st.lists(
        st.tuples(
            st.integers(min_value=0), st.integers(min_value=0, max_value=3), st.binary(max_size=8)
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_byte_mutations_of_valid_documents(doc: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    mutated = doc
    for position, cut, insert in edits:
        at = position % (len(mutated) + 1)
        mutated = mutated[:at] + insert + mutated[at + cut :]
    outcome = _outcome(mutated)
    # A mutation may land in ignorable whitespace or a Response's unsigned part; anything
    # accepted must then still carry the signed identity.
    if outcome == "accepted":
        assert validate_assertion(mutated, _POLICY, NOW).subject == "fuzz@example.test"


@_FUZZ
@given(st.sampled_from([_VALID, _RESPONSE]), st.data())
def test_structural_mutations_of_valid_documents(doc: bytes, data: st.DataObject) -> None:
    root = parse_xml(doc)
    elements = list(root.iter(etree.Element))
    victim = data.draw(st.sampled_from(elements[1:]))
    action = data.draw(st.sampled_from(["drop", "duplicate", "move-to-root", "retag", "attr"]))
    parent = victim.getparent()
    if action == "drop":
        parent.remove(victim)
    elif action == "duplicate":
        parent.append(etree.fromstring(etree.tostring(victim)))  # noqa: TID251 - test corpus
    elif action == "move-to-root":
        root.append(victim)
    elif action == "retag":
        victim.tag = data.draw(st.sampled_from(["{urn:x}Evil", victim.tag + "x"]))
    else:
        victim.set(data.draw(st.sampled_from(["ID", "Id", "URI", "Algorithm"])), "#x")
    outcome = _outcome(etree.tostring(root))
    if outcome == "accepted":
        assert validate_assertion(etree.tostring(root), _POLICY, NOW).subject == (
            "fuzz@example.test"
        )


@_FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["Authorization", "X-SAML-Assertion", "x-saml-assertion"]),
        st.text(max_size=300),
    )
)
def test_arbitrary_headers(headers: dict[str, str]) -> None:
    try:
        raw = extract_assertion(headers, AssertionSettings().headers, 200)
    except GatewayError:
        return
    if raw is not None:
        assert isinstance(raw, bytes)
        assert _outcome(raw) != "accepted"


def test_header_of_valid_assertion_round_trips() -> None:
    header = {"X-SAML-Assertion": base64.urlsafe_b64encode(_VALID).decode().rstrip("=")}
    assert extract_assertion(header, AssertionSettings().headers, 65536) == _VALID
