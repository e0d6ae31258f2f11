"""The fixtures of this folder (they live in helpers.py; pytest finds them here)."""

from .helpers import (  # noqa: F401 (fixtures)
    idp,
    idps,
    nginx,
    parts,
    processes,
    start_stack,
    tomcat,
    trusts,
)
