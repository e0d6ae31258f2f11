"""``saml-gateway init``: a commented starter configuration for one authorization server.

The starter is the worked example of ``config/examples/<profile>.yaml`` (shipped in the
package as ``gateway/profiles``, a link to that folder), so there is one copy of each
profile. Two changes make it stand on its own wherever it is written: a header saying what
to fill in, and the example's placeholder certificate replaced by a reference to the IdP's
real one (``${IDP_SIGNING_CERTIFICATE}``), so ``check-config`` passes once the variables it
names are set, and never with a certificate nobody's IdP signs with.
"""

from __future__ import annotations

import re
from importlib import resources

PROFILES = (
    "okta",
    "salesforce",
    "sap-netweaver",
    "sap-successfactors",
    "sap-xsuaa",
    "wso2",
    "pingfederate",
    "entra-id-adfs",
    "google-sts",
)
CERTIFICATE_VARIABLE = "IDP_SIGNING_CERTIFICATE"
_PLACEHOLDER_LINE = re.compile(r"certificates: \[certs/idp-signing\.pem\].*")
_PLACEHOLDER = "certs/idp-signing.pem"
_VARIABLE = re.compile(r"\$\{(?!file:)\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}")


def example_text(profile: str) -> str:
    """The worked example of ``profile``, as shipped."""
    if profile not in PROFILES:
        raise LookupError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})")
    return (resources.files("gateway") / "profiles" / f"{profile}.yaml").read_text("utf-8")


def variables(text: str) -> list[str]:
    """The environment variables a configuration refers to, in order of appearance."""
    return list(dict.fromkeys(_VARIABLE.findall(text)))


def starter_config(profile: str) -> str:
    """The commented starter configuration for ``profile``."""
    body = example_text(profile)
    reference = f'"${{{CERTIFICATE_VARIABLE}}}"'
    body = _PLACEHOLDER_LINE.sub(
        f"certificates: [{reference}]  # your IdP's signing certificate (PEM), or use metadata:",
        body,
    ).replace(_PLACEHOLDER, reference)
    names = variables(body)
    header = [
        f"# Starter configuration for {profile}, written by `saml-gateway init`",
        f"# from config/examples/{profile}.yaml.",
        "#",
        "# 1. Replace the example values (URLs, client IDs, the IdP issuer, the audience) with",
        "#    yours; the comments below say where each one comes from.",
        "# 2. Set the environment variables it reads (or write ${file:path} references):",
        *(f"#      {name}" for name in names),
        f"#    {CERTIFICATE_VARIABLE} is the path of your IdP's signing certificate (PEM); or",
        "#    replace `certificates:` with `metadata: [idp-metadata.xml]` (see docs/idp-guide.md).",
        "# 3. saml-gateway check-config -c THIS_FILE",
        "# 4. saml-gateway explain -c THIS_FILE captured-assertion.txt, then saml-gateway run.",
        "",
    ]
    return "\n".join(header) + body
