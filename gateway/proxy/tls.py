"""TLS towards upstreams: the client-side context a route's ``tls`` settings describe.

Rules this module owns:
- A configured CA bundle replaces the system store (that is what pinning a private CA
  means); verification stays on unless the operator turns it off explicitly.
- A file that cannot be used is a ``ConfigError`` naming the setting, raised when the
  context is built (at startup), never a failure of the first request.
"""

from __future__ import annotations

import ssl

from gateway.config import UpstreamTls
from gateway.errors import ConfigError


def tls_context(tls: UpstreamTls, where: str = "tls") -> ssl.SSLContext:
    """The client-side TLS context for an upstream: CA bundle, client certificate, checks.

    Raises ``ConfigError`` naming ``where`` when a file cannot be used.
    """
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
        if not tls.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError([f"{where}: cannot use the TLS files: {exc}"]) from None
    return context
