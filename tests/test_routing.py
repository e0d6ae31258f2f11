"""Route selection and the paths it refuses to route (pure, no event loop)."""

from __future__ import annotations

import pytest

from gateway.config import Route
from gateway.errors import BadRequest
from gateway.routing import Router, routable_path


def route(prefix: str, host: str | None = None, name: str | None = None) -> Route:
    return Route(
        name=name or prefix,
        path_prefix=prefix,
        host=host,
        upstream="http://127.0.0.1:1",
        identity_provider="idp",
        authorization_server="as",
    )


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/a/b?x=1", "/a/b"),
        ("/a%2Fb", "/a/b"),  # decoded for routing; still forwarded byte-exact
        ("/caf%C3%A9", "/café"),
        ("/v1.2/file..txt", "/v1.2/file..txt"),  # dots inside a segment are fine
        ("/", "/"),
    ],
)
def test_routable_paths(target: str, path: str) -> None:
    assert routable_path(target) == path


@pytest.mark.parametrize(
    "target",
    [
        "/public/../admin/users",
        "/public/%2E%2E/admin/users",
        "/public/..%2Fadmin/users",
        "/public/%2e%2e%2fadmin",
        "/public\\..\\admin",
        "/public/%5C..%5Cadmin",
        "/a/./b",
        "/a/..",
        "//admin/public/users",  # a URL parser reads "admin" as a host
        "/a%00b",
        "relative/path",
    ],
)
def test_paths_that_could_reach_another_route_are_refused(target: str) -> None:
    with pytest.raises(BadRequest) as info:
        routable_path(target)
    assert info.value.status == 400


def test_longest_prefix_on_segment_boundaries_and_host_first() -> None:
    router = Router(
        [route("/"), route("/api"), route("/api/v2"), route("/api", host="x.test", name="x")]
    )
    assert router.match("y.test", "/api/v2/items").label == "/api/v2"  # type: ignore[union-attr]
    assert router.match("y.test", "/api").label == "/api"  # type: ignore[union-attr]
    assert router.match("y.test", "/apix").label == "/"  # type: ignore[union-attr]
    assert router.match("X.TEST:8443", "/api/v2").label == "x"  # type: ignore[union-attr]
    assert Router([route("/api")]).match(None, "/other") is None
