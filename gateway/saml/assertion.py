"""The value the validator hands on: a verified assertion, read from the signed subtree only."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal


@dataclass(frozen=True, slots=True)
class Assertion:
    id: str
    issuer: str
    subject: str  # full NameID text, even if a comment was injected into it
    audiences: tuple[str, ...]
    recipient: str  # Recipient of the bearer SubjectConfirmationData that was accepted
    not_on_or_after: datetime  # earliest of Conditions and bearer SubjectConfirmationData
    # SHA-256 of the presented (decoded) document, Response envelope included when there is
    # one: the cache binds tokens to exactly what the client sent.
    digest: bytes
    # What goes to the authorization server as the RFC 7522 ``assertion``: a single signed
    # saml:Assertion. The presented bytes for a bare assertion; for a samlp:Response, the
    # serialised assertion element with its own ds:Signature (the bytes that were verified).
    raw: bytes = field(repr=False)
    # SHA-256 of the canonical content the signature covers: equal for every byte variant of
    # one signed assertion (whitespace, an XML declaration, another envelope), different for
    # any other signed assertion. The cache binds an assertion ID to it.
    fingerprint: bytes = b""
    # The tolerance validation allowed on the time conditions (see ``accepted_until``).
    clock_skew: timedelta = timedelta(0)
    # "1.1" (AD FS, WS-Trust) or "2.0": which grant or token type can carry ``raw``. For
    # SAML 1.1, ``recipient`` is the audience that was matched (1.1 has no Recipient).
    saml_version: Literal["1.1", "2.0"] = "2.0"

    @property
    def accepted_until(self) -> datetime:
        """The first instant validation no longer accepts this assertion."""
        return self.not_on_or_after + self.clock_skew
