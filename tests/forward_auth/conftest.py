"""nginx in front of the gateway: reuse the integration suite's fixtures."""

# The signing IdP, and the loopback authorization server + upstream of the integration suite.
from integration.conftest import idp, parts  # noqa: F401 - re-exported as fixtures here
