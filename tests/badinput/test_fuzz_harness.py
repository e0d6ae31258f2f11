"""The atheris harness (fuzz/fuzz_assertion.py) runs here without atheris: its seeds are
accepted, and seeded random inputs end only in gateway errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_assertion.py"


@pytest.fixture(scope="module")
def harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_assertion", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_assertion", module)
    spec.loader.exec_module(module)
    return module


def test_seeds_are_accepted(harness: ModuleType) -> None:
    # Selector bytes: header X-SAML-Assertion, no scheme, mode 1/2 (the seeds, unmutated).
    assert harness.check(bytes([0, 0, 1])) == "accepted"
    assert harness.check(bytes([0, 0, 2])) == "accepted"
    # Behind "Authorization: SAML" as well, and absent behind another scheme.
    assert harness.check(bytes([3, 1, 1])) == "accepted"
    assert harness.check(bytes([3, 3, 1])) == "absent"


def test_random_inputs_only_yield_gateway_errors(harness: ModuleType) -> None:
    outcomes = harness.smoke(1500, seed=1)  # raises on anything but a GatewayError
    assert sum(outcomes.values()) == 1500
    # The mutations reach past base64 into parsing and signature checks.
    assert outcomes.get("malformed", 0) > 0
    assert outcomes.get("signature", 0) + outcomes.get("wrapping", 0) > 0
