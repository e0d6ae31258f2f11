"""SAML assertions: header extraction, hardened parsing, pinned signature checks, conditions.

No I/O and no clock here: ``now`` is always an argument.
"""

from gateway.saml.assertion import Assertion
from gateway.saml.extract import assertion_digest, decode_assertion, extract_assertion
from gateway.saml.keys import PinnedKey, TrustPolicy, build_trust_policy
from gateway.saml.validate import validate_assertion
from gateway.saml.xml import parse_xml

__all__ = [
    "Assertion",
    "PinnedKey",
    "TrustPolicy",
    "assertion_digest",
    "build_trust_policy",
    "decode_assertion",
    "extract_assertion",
    "parse_xml",
    "validate_assertion",
]
