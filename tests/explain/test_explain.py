"""``saml-gateway explain``: every refusal reason the validator has, accepted assertions in
every encoding and envelope, ``-`` for stdin, ``--at``, ``--json``; never a secret."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree

from gateway.devkit.idp import SAML_NS, DemoIdP, instant

from .helpers import (
    AUDIENCE,
    ISSUER,
    NOW,
    OTHER_AUDIENCE,
    OTHER_TOKEN_URL,
    SUBJECT,
    TOKEN_URL,
    Explain,
    Result,
    b64,
    b64url,
    cli,
    secrets_of,
    write_config,
)

SAML = f"{{{SAML_NS}}}"


def issue(idp: DemoIdP, **kwargs: object) -> bytes:
    kwargs.setdefault("audience", AUDIENCE)
    kwargs.setdefault("recipient", TOKEN_URL)
    kwargs.setdefault("now", NOW)
    return idp.issue(SUBJECT, **kwargs)  # type: ignore[arg-type]


def signed_with(idp: DemoIdP, edit: Callable[[etree._Element], None], **kwargs: object) -> bytes:
    unsigned = idp.build_assertion(
        SUBJECT,
        audience=str(kwargs.pop("audience", AUDIENCE)),
        recipient=TOKEN_URL,
        now=NOW,
        **kwargs,  # type: ignore[arg-type]
    )
    edit(unsigned)
    return etree.tostring(idp.sign(unsigned))


def assert_nothing_secret(result: Result, raw: bytes, sent: str | bytes) -> None:
    text = result.out + result.err
    for secret in secrets_of(raw):
        assert secret not in text
    sample = sent if isinstance(sent, str) else sent.decode(errors="replace")
    assert sample.strip()[:60] not in text  # not the input, in whatever encoding
    assert "<saml:" not in text and "<ds:" not in text  # nor the document


# --- accepted ---------------------------------------------------------------------------


def test_accepted_bare_base64_prints_every_check(explain: Explain, idp: DemoIdP) -> None:
    raw = issue(idp)
    result = explain(b64(raw))
    assert result.code == 0, result.out + result.err
    assert result.last == "accepted"
    names = [line.split("] ", 1)[1] for line in result.out.splitlines() if line.startswith("[")]
    assert names == [
        "input",
        "parse",
        "structure",
        "signature profile",
        "signature",
        "issuer",
        "Conditions NotBefore",
        "Conditions NotOnOrAfter",
        "audience",
        "subject",
        "bearer confirmation",
        "recipient",
        "SubjectConfirmationData NotOnOrAfter",
    ]
    assert all(line.startswith("[ok]") for line in result.out.splitlines() if line[:1] == "[")
    assert result.check("input")["found"].startswith("base64, padded")
    assert result.check("audience") == {
        "mark": "ok",
        "expected": f"'{AUDIENCE}'",
        "found": f"'{AUDIENCE}'",
    }
    assert result.check("recipient")["found"] == f"'{TOKEN_URL}'"
    assert result.check("issuer")["found"] == f"'{ISSUER}'"
    profile = result.check("signature profile")["found"]
    assert "RSA_SHA256, digest SHA256" in profile
    # which pinned certificate verified it: by subject and SHA-256 fingerprint
    fingerprint = hashlib.sha256(idp.certificate.public_bytes(Encoding.DER)).hexdigest().upper()
    signature = result.check("signature")["found"]
    assert "CN=explain-test-idp" in signature
    assert ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)) in signature
    assert "identity_providers.corp.certificates[0]" in signature
    assert "(verified)" in result.out
    assert "cache: not looked up" in result.out and "memory" in result.out
    assert_nothing_secret(result, raw, b64(raw))


def test_accepted_base64url_response_from_stdin(config: Path, idp: DemoIdP) -> None:
    raw = idp.issue_response(
        SUBJECT, audience=AUDIENCE, recipient=TOKEN_URL, now=NOW, sign_response=True
    )
    result = cli("explain", "-c", str(config), "-", stdin=b64url(raw).encode())
    assert result.code == 0, result.out + result.err
    assert result.last == "accepted"
    assert result.check("input")["found"].startswith("base64url, unpadded")
    assert "samlp:Response holding one saml:Assertion" in result.check("structure")["found"]
    assert result.check("Response signature")["mark"] == "ok"
    assert result.check("Response signature profile")["mark"] == "ok"
    assert_nothing_secret(result, raw, b64url(raw))


def test_accepted_xml_and_line_wrapped_base64(explain: Explain, idp: DemoIdP) -> None:
    raw = issue(idp)
    as_xml = explain(raw)
    assert (as_xml.code, as_xml.last) == (0, "accepted")
    assert as_xml.check("input")["found"].startswith(f"XML, {len(raw)} bytes")
    encoded = b64(raw)
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + "\n"
    as_wrapped = explain(wrapped)
    assert (as_wrapped.code, as_wrapped.last) == (0, "accepted")
    assert "line breaks removed" in as_wrapped.check("input")["found"]


def test_route_option_picks_that_routes_trust(explain: Explain, idp: DemoIdP) -> None:
    raw = issue(idp, audience=OTHER_AUDIENCE, recipient=OTHER_TOKEN_URL)
    assert explain(b64(raw)).last == "refused: audience"  # the first route by default
    result = explain(b64(raw), "--route", "legacy")
    assert (result.code, result.last) == (0, "accepted")
    assert "route: 'legacy'" in result.out
    assert explain(b64(raw), "--route", "/legacy").last == "accepted"  # by path prefix too


def test_two_pinned_certificates_say_which_one_verified(
    tmp_path: Path, explain: Explain, idp: DemoIdP, stranger: DemoIdP
) -> None:
    folder = tmp_path / "two"
    config = write_config(folder, idp)
    stranger.write_certificate(folder / "old.pem")
    data = yaml.safe_load(config.read_text())
    data["identity_providers"]["corp"]["certificates"] = ["old.pem", "idp.pem"]
    config.write_text(yaml.safe_dump(data))
    result = explain(b64(issue(idp)), config_path=config)
    assert result.code == 0, result.out + result.err
    found = result.check("signature")["found"]
    assert "CN=explain-test-idp" in found and "certificates[1]" in found
    assert "CN=stranger" not in found
    assert "CN=stranger" in result.out  # listed among the pinned ones


# --- --at and --json --------------------------------------------------------------------


def test_at_checks_a_captured_assertion_at_its_own_time(explain: Explain, idp: DemoIdP) -> None:
    issued = NOW - timedelta(hours=3)
    raw = issue(idp, now=issued, lifetime=300)
    now = explain(b64(raw))
    assert (now.code, now.last) == (1, "refused: expired")
    then = explain(b64(raw), "--at", instant(issued + timedelta(seconds=60)))
    assert (then.code, then.last) == (0, "accepted")
    assert "(--at)" in then.out
    # an offset other than Z is the same instant
    local = (issued + timedelta(seconds=60)).astimezone().isoformat()
    assert explain(b64(raw), "--at", local).last == "accepted"
    early = explain(b64(raw), "--at", instant(issued - timedelta(minutes=10)))
    assert early.last == "refused: not_yet_valid"


def test_json_is_one_object_with_the_verdict_and_the_evidence(
    explain: Explain, idp: DemoIdP
) -> None:
    raw = issue(idp, audience="https://elsewhere.example")
    result = explain(b64(raw), "--json")
    assert result.code == 1
    body = json.loads(result.out)  # the whole output is one JSON object
    assert body["verdict"] == "refused" and body["reason"] == "audience"
    assert body["summary"] == "refused: audience"
    failed = body["checks"][-1]
    assert failed == {
        "name": "audience",
        "passed": False,
        "expected": f"'{AUDIENCE}'",
        "found": "'https://elsewhere.example'",
        "reason": "audience",
    }
    assert all(check["passed"] for check in body["checks"][:-1])
    assert body["detail"] == f"audience: expected '{AUDIENCE}', found 'https://elsewhere.example'"
    assert body["assertion_id"].startswith("_") and body["verified"] is False
    assert_nothing_secret(result, raw, b64(raw))
    accepted = json.loads(explain(b64(issue(idp)), "--json").out)
    assert accepted["verdict"] == "accepted" and accepted["reason"] is None
    assert accepted["verified"] is True


# --- every refusal reason ---------------------------------------------------------------


def _response_with_two(idp: DemoIdP) -> bytes:
    first = idp.sign(idp.build_assertion(SUBJECT, audience=AUDIENCE, recipient=TOKEN_URL, now=NOW))
    second = idp.sign(idp.build_assertion(SUBJECT, audience=AUDIENCE, recipient=TOKEN_URL, now=NOW))
    return etree.tostring(idp.build_response([first, second], destination=TOKEN_URL, now=NOW))


def _no_bearer(a: etree._Element) -> None:
    a.find(f"{SAML}Subject/{SAML}SubjectConfirmation").set("Method", "urn:x:holder")


def _expired_confirmation(a: etree._Element) -> None:
    data = a.find(f"{SAML}Subject/{SAML}SubjectConfirmation/{SAML}SubjectConfirmationData")
    data.set("NotOnOrAfter", instant(NOW - timedelta(hours=1)))


def _tampered(idp: DemoIdP) -> bytes:
    return issue(idp).replace(SUBJECT.encode(), b"mallory@explain.test")


def _with_issuer(idp: DemoIdP) -> bytes:
    unsigned = idp.build_assertion(
        SUBJECT, audience=AUDIENCE, recipient=TOKEN_URL, now=NOW, issuer="https://evil.test"
    )
    return etree.tostring(idp.sign(unsigned))


# (reason, the document, the failed check, what its expected / found lines hold)
CASES: dict[str, tuple[str, Callable[[DemoIdP, DemoIdP], bytes], str, str, str]] = {
    "expired": (
        "expired",
        lambda idp, _: issue(idp, now=NOW - timedelta(hours=1)),
        "Conditions NotOnOrAfter",
        "+ 120 s skew",
        "after it",
    ),
    "expired-confirmation": (
        "expired",
        lambda idp, _: signed_with(idp, _expired_confirmation),
        "SubjectConfirmationData NotOnOrAfter",
        "+ 120 s skew",
        "after it",
    ),
    "not_yet_valid": (
        "not_yet_valid",
        lambda idp, _: issue(idp, now=NOW + timedelta(hours=1)),
        "Conditions NotBefore",
        "− 120 s skew",
        "before it",
    ),
    "audience": (
        "audience",
        lambda idp, _: issue(idp, audience="https://wrong.example"),
        "audience",
        f"'{AUDIENCE}'",
        "'https://wrong.example'",
    ),
    "issuer": (
        "issuer",
        lambda idp, _: _with_issuer(idp),
        "issuer",
        f"one of '{ISSUER}'",
        "'https://evil.test'",
    ),
    "recipient": (
        "recipient",
        lambda idp, _: issue(idp, recipient="https://evil.test/token"),
        "recipient",
        f"one of '{TOKEN_URL}'",
        "'https://evil.test/token'",
    ),
    "subject_confirmation": (
        "subject_confirmation",
        lambda idp, _: signed_with(idp, _no_bearer),
        "bearer confirmation",
        "urn:oasis:names:tc:SAML:2.0:cm:bearer",
        "none",
    ),
    "signature-tampered": (
        "signature",
        lambda idp, _: _tampered(idp),
        "signature",
        "pinned certificate",
        "digest mismatch",
    ),
    "signature-other-key": (
        "signature",
        lambda _, stranger: issue(stranger),
        "signature",
        "pinned certificate",
        "none verified it (identity_providers.corp.certificates[0]: InvalidSignature",
    ),
    "signature-unsigned": (
        "signature",
        lambda idp, _: etree.tostring(
            idp.build_assertion(
                SUBJECT, audience=AUDIENCE, recipient=TOKEN_URL, now=NOW, placeholder=False
            )
        ),
        "structure",
        "a ds:Signature in the assertion",
        "the assertion is not signed",
    ),
    "wrapping": (
        "wrapping",
        lambda idp, _: _response_with_two(idp),
        "structure",
        "exactly one",
        "a Response holding 2",
    ),
    "algorithm": (
        "algorithm",
        lambda idp, _: issue(idp, algorithm="rsa-sha1"),
        "signature profile",
        "SHA-256 or better",
        "signature method RSA_SHA1",
    ),
    "malformed": (
        "malformed",
        lambda *_: b"<saml:Assertion xmlns:saml='urn:oasis:names:tc:SAML:2.0:assertion'>",
        "parse",
        "",
        "not well-formed XML",
    ),
    "dtd": (
        "dtd",
        lambda idp, _: b"<!DOCTYPE saml:Assertion>" + issue(idp),
        "parse",
        "",
        "a DOCTYPE is not allowed",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refusal_names_the_reason_and_what_was_expected_and_found(
    case: str, explain: Explain, idp: DemoIdP, stranger: DemoIdP
) -> None:
    reason, make, check, expected, found = CASES[case]
    raw = make(idp, stranger)
    result = explain(b64(raw))
    assert result.code == 1, result.out + result.err
    assert result.last == f"refused: {reason}"
    block = result.check(check)
    assert block["mark"] == f"FAILED ({reason})"
    assert expected in block.get("expected", ""), result.out
    assert found in block["found"], result.out
    # the failed check is the last one printed, and the detail is the access log's words
    marks = [line for line in result.out.splitlines() if line.startswith("[")]
    assert marks[-1].endswith(f"] {check}")
    assert f"detail (as in the access log): {check}: " in result.out
    assert_nothing_secret(result, raw, b64(raw))


def test_refused_assertion_shows_its_id_as_unverified(explain: Explain, idp: DemoIdP) -> None:
    raw = issue(idp, audience="https://wrong.example", assertion_id="_captured-0042")
    result = explain(b64(raw))
    assert "assertion ID: '_captured-0042' (unverified: the assertion was refused)" in result.out
    assert f"issuer: '{ISSUER}' (unverified)" in result.out


def test_over_the_size_cap(tmp_path: Path, explain: Explain, idp: DemoIdP) -> None:
    config = write_config(tmp_path / "small", idp, max_size=1024)
    result = explain(b64(issue(idp)), config_path=config)
    assert (result.code, result.last) == (1, "refused: size")
    assert "cap 1024" in result.check("input")["found"]


def test_not_base64_is_malformed_input(explain: Explain) -> None:
    result = explain("this is not base64!")
    assert (result.code, result.last) == (1, "refused: malformed")
    assert result.check("input")["mark"] == "FAILED (malformed)"


def test_hostile_values_are_escaped_and_bounded(explain: Explain, idp: DemoIdP) -> None:
    # a value that would start a forged line in a text log, and one far too long
    audience = "https://evil.example/\u2028level=info reason=ok\t" + "x" * 500
    result = explain(b64(issue(idp, audience=audience)))
    assert result.last == "refused: audience"
    found = result.check("audience")["found"]
    assert "\u2028" not in result.out and "\t" not in result.out
    assert "\\x2028" in found and "\\x09" in found
    assert len(found) < 200 and found.endswith("…'")


# --- bad usage and config: exit 2 -------------------------------------------------------


def test_bad_usage_and_config_exit_2(tmp_path: Path, config: Path, idp: DemoIdP) -> None:
    captured = tmp_path / "a.txt"
    captured.write_text(b64(issue(idp)))
    unknown = cli("explain", "-c", str(config), "--route", "nope", str(captured))
    assert unknown.code == 2 and "no route named 'nope'" in unknown.err
    assert "'api'" in unknown.err and "'legacy'" in unknown.err
    bad_at = cli("explain", "-c", str(config), "--at", "yesterday", str(captured))
    assert bad_at.code == 2 and "not ISO 8601" in bad_at.err
    missing = cli("explain", "-c", str(config), str(tmp_path / "absent.txt"))
    assert missing.code == 2 and "cannot read" in missing.err
    broken = tmp_path / "broken.yaml"
    broken.write_text("routes: []\n")
    assert cli("explain", "-c", str(broken), str(captured)).code == 2
    assert cli("explain", str(captured)).code == 2  # -c is required
