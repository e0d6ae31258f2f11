"""Tests of gateway.oauth."""
