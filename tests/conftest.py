"""Suite-wide rule: in CI a skipped test is a failed one.

Tests skip, saying why, where a real part they drive is missing (redis-server, nginx, Tomcat,
Caddy, HAProxy, podman). `make test` installs those parts, so in CI (``CI`` set) a skip means
a check silently did not run: it is reported as a failure instead. The one exception is the
shared interop folder beside the checkout, which is not part of the repository.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

_MAY_BE_ABSENT = ("../shared",)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
    if any(part in reason for part in _MAY_BE_ABSENT):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, where every part should be installed: {reason}"
