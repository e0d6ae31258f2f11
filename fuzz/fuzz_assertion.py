"""Fuzz target: assertion extraction from request headers, then full validation.

The property: whatever the headers hold, the path ends in an ``Assertion`` or in one of the
gateway's own errors (``gateway.errors.GatewayError``). Any other exception (or a crash in a
C extension: lxml, signxml, pybase64) is a finding.

atheris is not a dependency of ``make test``; install it by hand:

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_assertion.py -max_total_time=600 corpus/

Without atheris, ``--smoke N`` runs N seeded random mutations (tests/badinput runs this).

The input bytes are split into a header name selector, a mutation of a real signed
assertion (so the fuzzer starts deep inside the validator rather than at the base64
layer), and raw header text.
"""

from __future__ import annotations

import base64
import random
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.config import AssertionSettings, HeaderSource
from gateway.devkit.idp import DemoIdP
from gateway.errors import GatewayError
from gateway.saml import (
    PinnedKey,
    TrustPolicy,
    assertion_digest,
    extract_assertion,
    validate_assertion,
)

ISSUER = "https://idp.fuzz/saml"
AUDIENCE = "https://as.fuzz/oauth2"
RECIPIENT = "https://as.fuzz/oauth2/token"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)  # fixed: runs are reproducible
SOURCES = (*AssertionSettings().headers, HeaderSource(name="X-Alt-Assertion"))
MAX_SIZE = AssertionSettings().max_size
HEADER_NAMES = (
    "X-SAML-Assertion",
    "x-saml-assertion",
    "X_SAML_Assertion",
    "Authorization",
    "AUTHORIZATION",
    "X-Alt-Assertion",
)
SCHEMES = ("", "SAML ", "saml\t", "Bearer ", "SAML", " SAML  ")

_IDP = DemoIdP.generate(ISSUER, "ec")  # EC: fast to sign and verify
POLICY = TrustPolicy(
    keys=(PinnedKey.from_certificate(_IDP.certificate, "fuzz"),),
    issuers=frozenset({ISSUER}),
    audience=AUDIENCE,
    recipients=frozenset({RECIPIENT}),
    clock_skew=timedelta(seconds=120),
)
SEEDS = (
    _IDP.issue("fuzz@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW),
    _IDP.issue_response("fuzz@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW),
)


def check(data: bytes) -> str:
    """Run one input; returns the outcome ("accepted", "absent" or an error reason).

    Raises whatever escapes that is not a ``GatewayError``: that is the finding.
    """
    if len(data) < 3:
        return "absent"
    name = HEADER_NAMES[data[0] % len(HEADER_NAMES)]
    scheme = SCHEMES[data[1] % len(SCHEMES)]
    mode, body = data[2] % 4, data[3:]
    if mode == 0:  # raw header text, as a server would hand it over (surrogates included)
        value = body.decode("utf-8", "surrogateescape")
    else:  # a mutated real assertion, base64 (standard, url-safe or stripped padding)
        raw = _mutate(SEEDS[mode % 2], body)
        encoded = base64.b64encode(raw) if mode != 3 else base64.urlsafe_b64encode(raw)
        value = encoded.decode().rstrip("=" if mode == 3 else "")
    headers = {name: scheme + value}
    try:
        raw = extract_assertion(headers, SOURCES, MAX_SIZE)
        if raw is None:
            return "absent"
        assertion = validate_assertion(raw, POLICY, NOW, digest=assertion_digest(raw))
    except GatewayError as exc:
        return exc.reason
    if assertion.digest != assertion_digest(raw):
        raise AssertionError("an accepted assertion is bound to another digest")
    return "accepted"


def _mutate(seed: bytes, edits: bytes) -> bytes:
    """Apply edits read from ``edits`` (triples: operation, position, value) to ``seed``."""
    out = bytearray(seed)
    for i in range(0, len(edits) - 2, 3):
        op, where, value = edits[i], edits[i + 1], edits[i + 2]
        at = (where * len(out)) // 256 if out else 0
        if op % 4 == 0 and out:
            out[min(at, len(out) - 1)] = value
        elif op % 4 == 1:
            out.insert(at, value)
        elif op % 4 == 2 and out:
            del out[at : at + 1 + value % 16]
        else:
            out[at:at] = out[at : at + 1 + value % 64]  # duplicate a slice (nested elements)
    return bytes(out)


def smoke(runs: int, seed: int = 0) -> dict[str, int]:
    """Seeded random inputs, for environments without atheris; counts outcomes."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test inputs, not secrets
    outcomes: dict[str, int] = {}
    for _ in range(runs):
        data = bytes([rng.randrange(256) for _ in range(3)]) + rng.randbytes(rng.randrange(0, 31))
        if rng.random() < 0.15:
            data = data[:3] + rng.randbytes(rng.randrange(0, 3000))
        outcome = check(data)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--smoke":
        print(smoke(int(sys.argv[2])))
        return
    import atheris  # only for real fuzzing sessions

    with tempfile.TemporaryDirectory() as folder:
        seeds = Path(folder)
        for i, seed in enumerate(SEEDS):  # unmutated seeds: mode 1 and 2, no edits
            (seeds / f"seed{i}").write_bytes(bytes([0, 0, 1 + i]))
            (seeds / f"seed{i}-raw").write_bytes(bytes([0, 0, 0]) + base64.b64encode(seed))
        argv = [*sys.argv, folder] if len(sys.argv) == 1 else sys.argv
        atheris.Setup(argv, lambda data: check(bytes(data)))
        atheris.Fuzz()


if __name__ == "__main__":
    main()
