"""Shared by the rule and Prometheus tests: where the rule files and the dashboard live, and
the Prometheus tools (Debian package ``prometheus``, installed by ``make system-deps``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus"
ALERTS = PROMETHEUS_CONFIG / "alerts.yaml"
RECORDING = PROMETHEUS_CONFIG / "recording.yaml"
RULE_TESTS = PROMETHEUS_CONFIG / "alerts.test.yaml"
SCRAPE = PROMETHEUS_CONFIG / "scrape.yaml"
DASHBOARD = ROOT / "config" / "grafana" / "saml-gateway.json"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (make system-deps installs the prometheus package)")
    return found
