"""Header extraction and decoding: the cache key's hot path."""

from __future__ import annotations

import base64
import hashlib

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import AssertionSettings, HeaderSource
from gateway.errors import BadRequest, InvalidAssertion
from gateway.saml import assertion_digest, extract_assertion

DOC = b"<saml:Assertion ID='x'>\xc3\xa9 some bytes that need padding</saml:Assertion>"
SOURCES = AssertionSettings().headers
CAP = 64 * 1024


def std(raw: bytes = DOC) -> str:
    return base64.b64encode(raw).decode()


def url(raw: bytes = DOC) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize(
    "value",
    [
        std(),
        std().rstrip("="),
        url(),
        url().rstrip("="),
        f"  {std()}\t\r\n",
    ],
    ids=["standard", "standard-unpadded", "url", "url-unpadded", "whitespace"],
)
def test_encodings_of_x_saml_assertion(value: str) -> None:
    assert extract_assertion({"X-SAML-Assertion": value}, SOURCES, CAP) == DOC


def test_encodings_really_differ() -> None:
    raw = bytes(range(256))
    assert std(raw) != url(raw)
    assert extract_assertion({"X-SAML-Assertion": url(raw).rstrip("=")}, SOURCES, CAP) == raw


def test_authorization_saml_scheme_case_insensitive() -> None:
    assert extract_assertion({"Authorization": f"saml {std()}"}, SOURCES, CAP) == DOC
    assert extract_assertion({"Authorization": f"SAML  {url()}"}, SOURCES, CAP) == DOC


@pytest.mark.parametrize("value", ["Bearer abc", "SAMLx abc", "SAML", "Basic dTpw"])
def test_other_authorization_schemes_count_as_absent(value: str) -> None:
    assert extract_assertion({"Authorization": value}, SOURCES, CAP) is None


def test_no_source_present() -> None:
    assert extract_assertion({"Accept": "*/*"}, SOURCES, CAP) is None


def test_sources_in_order_and_bearer_falls_through() -> None:
    headers = {"Authorization": "Bearer t", "X-SAML-Assertion": std()}
    assert extract_assertion(headers, SOURCES, CAP) == DOC


def test_plain_dict_is_looked_up_case_insensitively() -> None:
    assert extract_assertion({"x-saml-assertion": std()}, SOURCES, CAP) == DOC


def test_aiohttp_style_case_insensitive_mapping() -> None:
    headers = CIMultiDictProxy(CIMultiDict({"X-Saml-ASSERTION": std()}))
    assert extract_assertion(headers, SOURCES, CAP) == DOC


def test_configured_source() -> None:
    sources = (HeaderSource(name="X-Token", scheme="SAML2"),)
    assert extract_assertion({"X-Token": f"SAML2 {std()}"}, sources, CAP) == DOC
    assert extract_assertion({"X-SAML-Assertion": std()}, sources, CAP) is None


def test_size_cap_applies_before_decoding() -> None:
    # not even base64, yet "size" wins: the cap is checked before any decoding work
    with pytest.raises(InvalidAssertion) as caught:
        extract_assertion({"X-SAML-Assertion": "!" * 101}, SOURCES, 100)
    assert caught.value.reason == "size"
    assert extract_assertion({"X-SAML-Assertion": std(b"a" * 75)}, SOURCES, 100) == b"a" * 75


def test_oversized_header_at_default_cap() -> None:
    value = std(b"x" * (CAP // 4 * 3 + 3))
    with pytest.raises(InvalidAssertion) as caught:
        extract_assertion({"X-SAML-Assertion": value}, SOURCES, AssertionSettings().max_size)
    assert caught.value.reason == "size"


@pytest.mark.parametrize(
    "value",
    [
        "not base64!",
        "abcde",
        "ab=c",
        "é" * 8,
        "",
        "   ",
        "a" * 4 + "=",
        "YQ==YQ==",
        "0000000000000000/-",  # both alphabets at once (found by hypothesis)
        "ab+_",
    ],
)
def test_not_base64_is_a_bad_request(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        extract_assertion({"X-SAML-Assertion": value}, SOURCES, CAP)
    assert caught.value.reason == "malformed"
    assert caught.value.status == 400


def test_digest_is_sha256_of_the_decoded_bytes() -> None:
    assert assertion_digest(DOC) == hashlib.sha256(DOC).digest()
