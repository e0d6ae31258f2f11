"""The fixtures of this folder (they live in helpers.py; pytest finds them here)."""

from .helpers import backstage, idp  # noqa: F401 (fixtures)
