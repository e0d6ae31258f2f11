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
    digest: bytes  # SHA-256 of the decoded bytes: the cache binds tokens to it
    raw: bytes = field(repr=False)  # the decoded document, sent to the authorization server
