"""parse_xml: the one hardened parser."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidAssertion
from gateway.saml import parse_xml


def test_comment_removal_joins_the_text() -> None:
    root = parse_xml(b"<a><n>paul@<!-- x -->spstest2.com</n></a>")
    assert root[0].text == "paul@spstest2.com"


def test_processing_instruction_removal_joins_the_text() -> None:
    assert parse_xml(b"<n>a<?pi x?>b</n>").text == "ab"


@pytest.mark.parametrize(
    "raw",
    [
        b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>',
        b'<!DOCTYPE a [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><a/>',
        b'<!DOCTYPE a SYSTEM "http://127.0.0.1:9/x.dtd"><a/>',
        b"<!DOCTYPE a><a/>",
        '<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>'.encode("utf-16"),
    ],
    ids=["xxe-file", "parameter-entity", "external-dtd", "bare-doctype", "utf16"],
)
def test_any_doctype_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidAssertion) as caught:
        parse_xml(raw)
    assert caught.value.reason == "dtd"


@pytest.mark.parametrize("raw", [b"", b"<a>", b"<a></b>", b"\x00\x01", b"<a>&undefined;</a>"])
def test_malformed(raw: bytes) -> None:
    with pytest.raises(InvalidAssertion) as caught:
        parse_xml(raw)
    assert caught.value.reason == "malformed"
