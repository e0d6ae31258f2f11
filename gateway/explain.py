"""``saml-gateway explain``: why one assertion is accepted or refused, check by check.

Rules this module owns:
- No rule of its own: the input is decoded by the proxy's ``decode_assertion`` (same size
  cap) and checked by the proxy's ``validate_assertion`` with the route's ``TrustPolicy``,
  built by the proxy's ``Pipeline``; the validator fills an ``Evidence`` as it goes. So the
  verdict and the reason word are the ones the access log and
  ``gateway_validation_failures_total{reason}`` would show.
- What is printed is what each check expected and found. Never the document, a
  SignatureValue, a NameID, a token or a secret.
- The token cache of a running gateway lives in its memory: a one-shot command cannot see
  it and says so. With ``cache.backend: redis`` an accepted assertion is looked up there.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gateway.config import Config, Route
from gateway.errors import GatewayError, InvalidAssertion
from gateway.saml import assertion_digest, decode_assertion, validate_assertion
from gateway.saml.evidence import Check, Evidence, duration_text, instant_text, key_text, printable

ACCEPTED, REFUSED = 0, 1

# The checks the validator runs when nothing fails (time bounds only when present), for the
# "not checked" line after a refusal.
_STAGES = (
    "input",
    "parse",
    "structure",
    "signature profile",
    "signature",
    "issuer",
    "audience",
    "subject",
    "bearer confirmation",
    "recipient",
)
_WHITESPACE = re.compile(rb"\s+")


@dataclass
class Report:
    route: str
    identity_provider: str
    authorization_server: str
    now: datetime
    clock: str  # where ``now`` came from
    clock_skew: int
    pinned: list[str]
    checks: list[Check] = field(default_factory=list)
    reason: str | None = None
    detail: str | None = None
    assertion_id: str | None = None
    assertion_id_verified: bool = False
    issuer: str | None = None
    not_on_or_after: datetime | None = None
    cache: str = ""

    @property
    def verdict(self) -> str:
        return "accepted" if self.reason is None else f"refused: {self.reason}"

    @property
    def exit_code(self) -> int:
        return ACCEPTED if self.reason is None else REFUSED


def find_route(config: Config, name: str | None) -> Route:
    """The route called ``name`` (its ``name`` or its label), or the first one."""
    if name is None:
        return config.routes[0]
    for route in config.routes:
        if name in (route.name, route.label, route.path_prefix):
            return route
    labels = ", ".join(repr(r.label) for r in config.routes)
    raise LookupError(f"no route named {name!r} (routes: {labels})")


def _read(data: bytes, max_size: int) -> tuple[bytes, Check]:
    """The decoded document, through the proxy's decoder and size cap, and what it was."""
    expected = f"base64, base64url or XML; at most {max_size} characters as a header"
    text = data.lstrip(b"\xef\xbb\xbf").strip()
    if text.startswith(b"<"):
        # What a client would send in the header: the same cap applies to that length.
        encoded = base64.b64encode(text).decode("ascii")
        raw = decode_assertion(encoded, max_size)
        return raw, Check(
            "input", True, expected, f"XML, {len(raw)} bytes ({len(encoded)} as base64)"
        )
    notes = []
    if b"%" in text:  # a SAMLResponse copied from a form post; the proxy never gets these
        text = urllib.parse.unquote_to_bytes(text)
        notes.append("percent-decoded first")
    compact = _WHITESPACE.sub(b"", text)
    if compact != text:  # wrapped lines (base64 tools wrap at 64 or 76 columns)
        notes.append("line breaks removed")
    try:
        encoded = compact.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidAssertion(
            "malformed", "input: not base64", check="input", expected=expected, found="not ASCII"
        ) from None
    raw = decode_assertion(encoded, max_size)
    alphabet = "base64url" if ("-" in encoded or "_" in encoded) else "base64"
    padding = "padded" if encoded.endswith("=") else "unpadded"
    extra = f" ({', '.join(notes)})" if notes else ""
    found = f"{alphabet}, {padding}, {len(encoded)} characters, {len(raw)} bytes decoded{extra}"
    return raw, Check("input", True, expected, found)


def explain(
    config: Config,
    route: Route,
    data: bytes,
    now: datetime,
    *,
    clock: str = "system clock",
) -> Report:
    """Run the proxy's decoding and validation for ``route`` over ``data``, recording why."""
    from gateway.cache import TokenCache
    from gateway.metrics import Metrics
    from gateway.pipeline import Pipeline

    pipeline = Pipeline(config, TokenCache(config.cache), Metrics())  # opens no socket
    policy = pipeline.policies[(route.identity_provider, route.authorization_server)]
    report = Report(
        route=route.label,
        identity_provider=route.identity_provider,
        authorization_server=route.authorization_server,
        now=now,
        clock=clock,
        clock_skew=int(policy.clock_skew.total_seconds()),
        pinned=[key_text(key) for key in policy.keys],
    )
    evidence = Evidence()
    try:
        raw, read = _read(data, config.assertion.max_size)
    except GatewayError as exc:  # InvalidAssertion("size") or BadRequest("malformed")
        check = getattr(exc, "check", "") or "input"
        found = getattr(exc, "found", "") or exc.detail
        expected = getattr(exc, "expected", "") or "base64, base64url or XML"
        report.checks.append(Check(check, False, expected, found, exc.reason))
        report.reason, report.detail = exc.reason, exc.detail  # as the access log has it
        report.cache = "not looked up: the input was refused before the cache"
        return report
    report.checks.append(read)
    try:
        assertion = validate_assertion(raw, policy, now, evidence=evidence)
    except InvalidAssertion as exc:
        report.checks.extend(evidence.checks)
        report.reason, report.detail = exc.reason, exc.detail
        report.assertion_id = exc.unverified_id
        report.issuer = exc.unverified_issuer
        report.cache = "not looked up: a refused assertion never reaches the cache"
        return report
    report.checks.extend(evidence.checks)
    report.assertion_id, report.assertion_id_verified = assertion.id, True
    report.issuer, report.not_on_or_after = assertion.issuer, assertion.not_on_or_after
    report.cache = _cache_state(config, pipeline.cache_key(route), assertion.id, raw)
    return report


def _cache_state(config: Config, profile: str, assertion_id: str, raw: bytes) -> str:
    redis = config.cache.redis
    if config.cache.backend != "redis" or redis is None:
        return (
            "not looked up: tokens are cached in the memory of the running gateway, which "
            "this command cannot see (a running gateway that already exchanged these very "
            "bytes answers from its cache without validating again)"
        )
    return asyncio.run(_redis_state(config, profile, assertion_id, raw))


async def _redis_state(config: Config, profile: str, assertion_id: str, raw: bytes) -> str:
    from gateway.cache.redis import RedisTokenStore

    settings = config.cache.redis
    if settings is None:  # checked by the caller; keeps the types exact
        return "not looked up"
    store = RedisTokenStore(settings)
    try:
        if not await store.ping():
            return "Redis did not answer: nothing to say about a shared token"
        entry = await store.get(profile, assertion_id)
    finally:
        await store.close()
    if entry is None:
        return "no token in Redis for this assertion ID: the gateway would exchange it"
    if entry.digest != assertion_digest(raw):
        return (
            "Redis holds a token for this assertion ID, issued for other bytes: it is "
            "never served for this assertion (the gateway would exchange for itself)"
        )
    remaining = timedelta(seconds=max(entry.expires_at - time.time(), 0))
    return (
        "Redis holds a token issued for these very bytes, served for "
        f"{duration_text(remaining)} more (the token itself is not shown)"
    )


# --- output ----------------------------------------------------------------------------------


def render_text(report: Report) -> str:
    lines = [
        f"route: {report.route!r} (identity provider {report.identity_provider!r}, "
        f"authorization server {report.authorization_server!r})",
        f"clock: {instant_text(report.now)} ({report.clock}), skew {report.clock_skew} s",
        "pinned certificates:",
        *(f"  {pinned}" for pinned in report.pinned),
        "",
    ]
    for check in report.checks:
        mark = "ok" if check.passed else f"FAILED ({check.reason})"
        lines.append(f"[{mark}] {check.name}")
        if check.expected:
            lines.append(f"    expected: {check.expected}")
        lines.append(f"    found:    {check.found}")
    if report.reason is not None:
        seen = {check.name for check in report.checks}
        rest = [stage for stage in _STAGES if stage not in seen]
        if rest:
            lines.append(f"not checked (validation stops at the first refusal): {', '.join(rest)}")
    lines.append("")
    if report.assertion_id is not None:
        state = (
            "verified" if report.assertion_id_verified else "unverified: the assertion was refused"
        )
        lines.append(f"assertion ID: '{printable(report.assertion_id)}' ({state})")
    if report.issuer is not None:
        state = "verified" if report.assertion_id_verified else "unverified"
        lines.append(f"issuer: '{printable(report.issuer)}' ({state})")
    if report.not_on_or_after is not None:
        lines.append(f"valid until: {instant_text(report.not_on_or_after)} (earliest NotOnOrAfter)")
    lines.append(f"cache: {report.cache}")
    lines.append(
        "not checked here: the token exchange (invalid_grant) and ID replay, which need the "
        "authorization server and the running gateway's cache"
    )
    if report.detail:
        lines.append(f"detail (as in the access log): {report.detail}")
    lines.append(report.verdict)
    return "\n".join(lines) + "\n"


def render_json(report: Report) -> str:
    body: dict[str, Any] = {
        "verdict": "accepted" if report.reason is None else "refused",
        "reason": report.reason,
        "detail": report.detail,
        "route": report.route,
        "identity_provider": report.identity_provider,
        "authorization_server": report.authorization_server,
        "now": instant_text(report.now),
        "clock": report.clock,
        "clock_skew_seconds": report.clock_skew,
        "pinned_certificates": report.pinned,
        "checks": [asdict(check) for check in report.checks],
        "assertion_id": None if report.assertion_id is None else printable(report.assertion_id),
        "issuer": None if report.issuer is None else printable(report.issuer),
        "verified": report.assertion_id_verified,
        "not_on_or_after": None
        if report.not_on_or_after is None
        else instant_text(report.not_on_or_after),
        "cache": report.cache,
        "summary": report.verdict,
    }
    return json.dumps(body, ensure_ascii=False) + "\n"
