"""Tests of gateway.saml."""
