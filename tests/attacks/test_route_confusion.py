"""Route confusion (issue 17, attack 1): a path or Host that the gateway routes one way and
the upstream serves another way must never be served under the other route's trust.

The client holds an assertion of IdP A, which the default ``/echo`` route trusts; the file
``/echo/admin/secret.txt`` belongs to the ``/echo/admin`` route, which trusts IdP B only.
What is checked is what the real upstream served and with which token (its access log,
the token traced back to the authorization server that issued it).
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from .helpers import (
    ADMIN_SECRET,
    API_SECRET,
    BEARER,
    PUBLIC_FILE,
    NginxUpstream,
    Stack,
    settled_lines,
)
from .tomcat_runner import Tomcat

# Each one resolves to /echo/admin/secret.txt on Tomcat, nginx or a stack like them.
ATTACK_PATHS = [
    "/echo/admin;x=1/secret.txt",  # Tomcat drops ;parameters
    "/echo;x=1/admin/secret.txt",
    "/echo/public/..;/admin/secret.txt",  # ..; is .. once the parameter is gone
    "/echo/public/.;/../admin/secret.txt",
    "/echo/public/%2e%2e;/admin/secret.txt",
    "/echo//admin/secret.txt",  # empty segments are merged
    "/echo/;/admin/secret.txt",
    "/echo/%2Fadmin/secret.txt",  # nginx decodes %2F
    "/echo%2fadmin/secret.txt",
    "/echo/public/%2E%2E%2Fadmin/secret.txt",
    "/echo/public/%252e%252e/admin/secret.txt",  # decoded twice by some stacks
    "/echo/public/..%5Cadmin/secret.txt",  # a backslash is a slash on Windows stacks
    "/echo/public/..%5cadmin/secret.txt",
    "/echo/admin%3Bx=1/secret.txt",  # decoded before the parameters are split off
    "/echo/admin%3bx=1/secret.txt",
    "/echo/public/%u002e%u002e/admin/secret.txt",  # IIS's %u escapes
    "/echo/public/%C0%AE%C0%AE/admin/secret.txt",  # overlong UTF-8 for '.'
]


def _probe() -> str:
    return secrets.token_hex(8)


def _served(lines: list[str], probe: str) -> list[str]:
    return [line for line in lines if f"probe={probe}" in line]


@pytest.fixture(params=["tomcat", "nginx"])
def upstream(request: pytest.FixtureRequest, nginx: NginxUpstream) -> Tomcat | NginxUpstream:
    if request.param == "tomcat":
        tomcat: Tomcat = request.getfixturevalue("tomcat")
        return tomcat
    return nginx


@pytest.mark.parametrize("path", ATTACK_PATHS)
async def test_paths_read_two_ways_are_refused_before_anything_is_forwarded(
    start_stack: Any, upstream: Tomcat | NginxUpstream, path: str
) -> None:
    stack: Stack = await start_stack(upstream.url)
    probe = _probe()
    answer = await stack.get(f"{path}?probe={probe}", stack.trusts["a"].assertion())
    assert answer.status == 400
    assert b'"invalid_request"' in answer.body
    assert _served(await settled_lines(upstream), probe) == []  # nothing reached the upstream
    assert [t.auth.calls for t in stack.trusts.values()] == [0, 0]  # and nothing was exchanged


async def test_each_route_serves_its_own_file_under_its_own_trust(
    start_stack: Any, upstream: Tomcat | NginxUpstream
) -> None:
    """The baseline the attacks are measured against: the logs show what they must."""
    stack: Stack = await start_stack(upstream.url)
    a, b = stack.trusts["a"], stack.trusts["b"]
    probes = [_probe() for _ in range(3)]
    public = await stack.get(f"/echo/public/x.txt?probe={probes[0]}", a.assertion())
    refused = await stack.get(f"/echo/admin/secret.txt?probe={probes[1]}", a.assertion())
    admin = await stack.get(f"/echo/admin/secret.txt?probe={probes[2]}", b.assertion())
    assert (public.status, public.body) == (200, PUBLIC_FILE)
    assert refused.status == 401
    assert (admin.status, admin.body) == (200, ADMIN_SECRET)
    lines = await settled_lines(upstream)
    assert _served(lines, probes[1]) == []
    assert [_token_issuer(stack, line) for line in _served(lines, probes[0])] == ["a"]
    assert [_token_issuer(stack, line) for line in _served(lines, probes[2])] == ["b"]


async def test_a_route_that_allows_parameters_decides_on_the_path_without_them(
    start_stack: Any, tomcat: Tomcat
) -> None:
    stack: Stack = await start_stack(tomcat.url, allow_path_parameters=True)
    a, b = stack.trusts["a"], stack.trusts["b"]
    probes = [_probe() for _ in range(4)]
    # Both spellings are /echo/admin/secret.txt to Tomcat, so the admin route decides: B only.
    wrong = await stack.get(f"/echo/admin;x=1/secret.txt?probe={probes[0]}", a.assertion())
    wrong_too = await stack.get(f"/echo;x=1/admin/secret.txt?probe={probes[1]}", a.assertion())
    right = await stack.get(f"/echo/admin;jsessionid=1/secret.txt?probe={probes[2]}", b.assertion())
    # The default route did not opt in.
    other = await stack.get(f"/echo/public;x=1/x.txt?probe={probes[3]}", a.assertion())
    assert (wrong.status, wrong_too.status, other.status) == (401, 401, 400)
    assert (right.status, right.body) == (200, ADMIN_SECRET)
    lines = await settled_lines(tomcat)
    assert [_served(lines, p) for p in (probes[0], probes[1], probes[3])] == [[], [], []]
    served = _served(lines, probes[2])
    assert [_token_issuer(stack, line) for line in served] == ["b"]
    assert "/echo/admin;jsessionid=1/secret.txt?" in served[0]  # forwarded as sent


async def test_a_route_that_allows_encoded_slashes_decides_on_the_decoded_path(
    start_stack: Any, nginx: NginxUpstream
) -> None:
    stack: Stack = await start_stack(nginx.url, allow_encoded_slashes=True)
    a, b = stack.trusts["a"], stack.trusts["b"]
    probes = [_probe() for _ in range(3)]
    wrong = await stack.get(f"/echo%2Fadmin/secret.txt?probe={probes[0]}", a.assertion())
    right = await stack.get(f"/echo/admin%2Fsecret.txt?probe={probes[1]}", b.assertion())
    other = await stack.get(f"/echo/public%2Fx.txt?probe={probes[2]}", a.assertion())
    assert (wrong.status, other.status) == (401, 400)
    assert (right.status, right.body) == (200, ADMIN_SECRET)
    lines = await settled_lines(nginx)
    assert _served(lines, probes[0]) == _served(lines, probes[2]) == []
    assert [_token_issuer(stack, line) for line in _served(lines, probes[1])] == ["b"]


@pytest.mark.parametrize("host", ["api.test.", "API.test.", "api.test.:80", "Api.Test"])
async def test_a_host_bound_route_is_found_whatever_the_spelling_of_its_host(
    start_stack: Any, nginx: NginxUpstream, host: str
) -> None:
    """nginx (and DNS) read ``api.test.`` as ``api.test``: so must the router."""
    stack: Stack = await start_stack(nginx.url)
    a, b = stack.trusts["a"], stack.trusts["b"]
    probes = [_probe() for _ in range(2)]
    wrong = await stack.get(f"/api.txt?probe={probes[0]}", a.assertion(), host=host)
    right = await stack.get(f"/api.txt?probe={probes[1]}", b.assertion(), host=host)
    assert wrong.status == 401
    assert (right.status, right.body) == (200, API_SECRET)
    lines = await settled_lines(nginx)
    assert _served(lines, probes[0]) == []
    assert [_token_issuer(stack, line) for line in _served(lines, probes[1])] == ["b"]


@pytest.mark.parametrize("host", ["api.test..", "api..test", "a@api.test", "api.test:x"])
async def test_a_host_that_is_no_host_name_is_refused(
    start_stack: Any, nginx: NginxUpstream, host: str
) -> None:
    stack: Stack = await start_stack(nginx.url)
    probe = _probe()
    answer = await stack.get(f"/api.txt?probe={probe}", stack.trusts["a"].assertion(), host=host)
    assert answer.status == 400
    assert _served(await settled_lines(nginx), probe) == []


def _token_issuer(stack: Stack, line: str) -> str | None:
    found = BEARER.search(line)
    return None if found is None else stack.issuer_of(found.group(1))
