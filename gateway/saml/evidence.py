"""What the validator saw at each check: the evidence ``explain`` prints and the log quotes.

Rules this module owns:
- A ``Check`` says what was expected and what was found, in words an operator can act on;
  it never holds the document, a signature value, a NameID or a key.
- Values read from an unverified document are passed through ``shown``: bounded in length,
  control characters escaped, so a hostile value cannot forge a log line or flood it.
- Recording is optional: the proxy's hot path passes no ``Evidence`` and pays nothing for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.saml.keys import PinnedKey

_SHOWN_LIMIT = 120


@dataclass(frozen=True, slots=True)
class Check:
    """One check, in the order the validator ran it."""

    name: str  # e.g. "signature", "audience", "Conditions NotOnOrAfter"
    passed: bool
    expected: str
    found: str
    reason: str = ""  # the refusal's reason word when not passed


@dataclass(slots=True)
class Evidence:
    """The checks of one validation; ``explain`` hands one in, the proxy does not."""

    checks: list[Check] = field(default_factory=list)

    def passed(self, name: str, expected: str, found: str) -> None:
        self.checks.append(Check(name, True, expected, found))

    def failed(self, name: str, reason: str, expected: str, found: str) -> None:
        self.checks.append(Check(name, False, expected, found, reason))


def printable(value: str) -> str:
    """A value from the document, safe for a log line: bounded, control characters escaped."""
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value[:_SHOWN_LIMIT])
    return text if len(value) <= _SHOWN_LIMIT else text + "…"


def shown(value: str | None) -> str:
    """A value from the document, quoted for a sentence (``printable``, in quotes)."""
    if value is None:
        return "(none)"
    return f"'{printable(value)}'"


def instant_text(moment: datetime) -> str:
    """An instant as ISO 8601 UTC, to the second (milliseconds when there are some)."""
    moment = moment.astimezone(UTC)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def duration_text(delta: timedelta) -> str:
    """``1h02m03s``, ``4m05s``, ``7s`` (absolute value)."""
    seconds = int(abs(delta.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate, as ``openssl x509 -fingerprint -sha256`` prints it."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def key_text(key: PinnedKey) -> str:
    """A pinned certificate by subject and SHA-256 fingerprint, and the config key it came from."""
    subject = key.certificate.subject.rfc4514_string()
    return f"{subject} (SHA-256 {fingerprint(key.der)}) from {key.source}"
