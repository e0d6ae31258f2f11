"""The rule files as Prometheus reads them: ``promtool check`` and the unit tests of every
alert (each alert has a case where it fires and one where it must stay quiet)."""

from __future__ import annotations

import subprocess
from typing import Any

import yaml

from .helpers import ALERTS, PROMETHEUS_CONFIG, RECORDING, RULE_TESTS, SCRAPE, tool


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args],
        cwd=PROMETHEUS_CONFIG,
        capture_output=True,
        text=True,
        timeout=120,
    )


def rules(path: Any) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_rule_files_pass_promtool_check() -> None:
    result = promtool("check", "rules", ALERTS.name, RECORDING.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules(ALERTS))} rules found" in result.stdout
    assert f"SUCCESS: {len(rules(RECORDING))} rules found" in result.stdout


def test_scrape_config_example_passes_promtool_check() -> None:
    result = promtool("check", "config", SCRAPE.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules(ALERTS)}
    assert alerts - fires == set(), "alerts no unit test sees firing"
    assert alerts - quiet == set(), "alerts no unit test sees staying quiet"


def test_promtool_catches_a_wrong_threshold(tmp_path: Any) -> None:
    """The unit tests can fail: with the Redis alert inverted they do."""
    for path in (RECORDING, RULE_TESTS):
        (tmp_path / path.name).write_text(path.read_text())
    text = ALERTS.read_text().replace("(gateway_redis_up) == 0", "(gateway_redis_up) == 1")
    assert text != ALERTS.read_text()
    (tmp_path / ALERTS.name).write_text(text)
    result = subprocess.run(
        [tool("promtool"), "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "SamlGatewayRedisDown" in result.stdout + result.stderr
