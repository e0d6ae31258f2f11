"""The value the validator hands on: a verified assertion, read from the signed subtree only."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


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
