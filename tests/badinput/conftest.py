"""Bad-input tests reuse the fault tests' fixtures: a background loop and a signing IdP."""

from faults.helpers import backstage, idp

__all__ = ["backstage", "idp"]
