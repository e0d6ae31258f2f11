"""Route selection and the paths it refuses to route (pure, no event loop)."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import Route
from gateway.errors import BadRequest
from gateway.proxy.headers import upstream_url
from gateway.routing import Router, normalize_host, routable_path, under_prefix


def route(prefix: str, host: str | None = None, name: str | None = None, **extra: bool) -> Route:
    return Route(
        name=name or prefix,
        path_prefix=prefix,
        host=host,
        upstream="http://127.0.0.1:1",
        identity_provider="idp",
        authorization_server="as",
        **extra,
    )


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/a/b?x=1", "/a/b"),
        ("/a/b?x=..//;%2F", "/a/b"),  # the query is no part of the path
        ("/a%2Fb", "/a/b"),  # decoded for routing (if the route allows); forwarded byte-exact
        ("/caf%C3%A9", "/café"),
        ("/%61pi/x", "/api/x"),
        ("/files/100%25.txt", "/files/100%.txt"),
        ("/v1.2/file..txt", "/v1.2/file..txt"),  # dots inside a segment are fine
        ("/a/b/", "/a/b/"),  # a trailing slash is no empty segment in the middle
        ("/admin;x=1/secret", "/admin/secret"),  # what Tomcat serves
        ("/admin;jsessionid=1", "/admin"),
        ("/a/b/;x", "/a/b/"),
        ("/", "/"),
    ],
)
def test_routable_paths(target: str, path: str) -> None:
    assert routable_path(target) == path


def test_a_routable_path_remembers_what_a_route_must_opt_in_to() -> None:
    plain, params, slash = routable_path("/a"), routable_path("/a;x/b"), routable_path("/a%2fb")
    assert (plain.parameters, plain.encoded_slash) == (False, False)
    assert (params.parameters, params.encoded_slash) == (True, False)
    assert (slash.parameters, slash.encoded_slash) == (False, True)


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
        # parameters hide dot segments and empty segments from a plain reading
        "/public/..;/admin",
        "/public/.;x/admin",
        "/public/%2e%2e;/admin",
        "/a/;x/b",
        # empty segments anywhere, raw or decoded
        "/a//b",
        "/a/b//",
        "/a%2F%2Fb",
        "/a/%2Fb",
        # encoded '.', '\\', ';', '?', '#' in any case; backslashes
        "/a/%2e/b",
        "/a/%2Ebin",
        "/a\\b",
        "/a%5cb",
        "/a%3Bx=1/b",
        "/a%3bx",
        "/a%3Fb",
        "/a%23b",
        # double encoding, IIS escapes, overlong UTF-8, controls
        "/a%252e%252e/b",
        "/a%252Fb",
        "/a%%32Fb",
        "/a%25%32%46b",
        "/a%u002e",
        "/a%U002F",
        "/a%C0%AE%C0%AE/b",
        "/a%ff",
        "/a%0Ab",
        "/a%0d%0ab",
        "/a%7F",
        "/a%C2%85b",  # NEL
        "/a%E2%80%A8b",  # LINE SEPARATOR
        "/a\tb",
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


@pytest.mark.parametrize(
    ("path", "prefix", "under"),
    [
        ("/api", "/api", True),
        ("/api/", "/api", True),
        ("/api/x", "/api", True),
        ("/apix", "/api", False),
        ("/apix/y", "/api", False),
        ("/ap", "/api", False),
        ("/", "/api", False),
        ("/api", "/api/", False),  # a prefix ending in '/' wants what follows it
        ("/api/", "/api/", True),
        ("/api/x", "/api/", True),
        ("/apix", "/api/", False),
        ("/anything", "/", True),
        ("/anything", "", True),  # no prefix (forward-auth at '/'): everything
        ("/api%2Fx", "/api", False),  # compared as given: routes pass the decoded path
    ],
)
def test_under_prefix_on_segment_boundaries(path: str, prefix: str, under: bool) -> None:
    assert under_prefix(path, prefix) is under


def test_the_router_and_strip_prefix_draw_the_same_boundary() -> None:
    router = Router([route("/"), route("/api")])
    for path, label in (("/api", "/api"), ("/api/x", "/api"), ("/apix", "/"), ("/apix/y", "/")):
        assert router.match(None, routable_path(path)).label == label  # type: ignore[union-attr]
    assert str(upstream_url("http://u", "/api/x", "/api", True)) == "http://u/x"
    assert str(upstream_url("http://u", "/api", "/api", True)) == "http://u/"
    # not under the prefix: nothing is stripped
    assert str(upstream_url("http://u", "/apix/y", "/api", True)) == "http://u/apix/y"


def test_an_encoded_slash_is_a_boundary_only_where_the_route_allows_it() -> None:
    routes = [route("/", allow_encoded_slashes=True), route("/api", allow_encoded_slashes=True)]
    router = Router([*routes, route("/strict")])
    assert router.match(None, routable_path("/api%2Fx")).label == "/api"  # type: ignore[union-attr]
    assert router.match(None, routable_path("/apix%2Fy")).label == "/"  # type: ignore[union-attr]
    with pytest.raises(BadRequest):
        router.match(None, routable_path("/strict%2Fx"))
    # Stripping cannot tell '/api' + '%2Fx' from one segment: refused, not forwarded whole.
    with pytest.raises(BadRequest):
        upstream_url("http://u", "/api%2Fx", "/api", True)


@pytest.mark.parametrize("host", ["x.test", "X.Test", "x.test.", "x.test:443", "X.TEST.:80"])
def test_host_bound_routes_match_the_normalized_host(host: str) -> None:
    router = Router([route("/"), route("/", host="X.test", name="x")])
    assert router.match(host, routable_path("/a")).label == "x"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("host", "name"),
    [("[::1]:8080", "[::1]"), ("127.0.0.1:80", "127.0.0.1"), ("", ""), (None, ""), ("a_b", "a_b")],
)
def test_normalize_host(host: str | None, name: str) -> None:
    assert normalize_host(host) == name


@pytest.mark.parametrize(
    "host",
    [
        "x.test..",
        "x..test",
        ".x.test",
        "u@x.test",
        "x.test:8o",
        "[::1",
        "[::1]x",
        "x test",
        "\u212a.test",
    ],
)
def test_hosts_that_are_no_names_are_refused(host: str) -> None:
    with pytest.raises(BadRequest) as info:
        Router([route("/")]).match(host, routable_path("/"))
    assert info.value.status == 400


def test_parameters_and_encoded_slashes_only_on_routes_that_opt_in() -> None:
    router = Router(
        [
            route("/", name="strict"),
            route("/params", allow_path_parameters=True),
            route("/slashes", allow_encoded_slashes=True),
        ]
    )
    assert router.match(None, routable_path("/params;v=1/x")).label == "/params"  # type: ignore[union-attr]
    assert router.match(None, routable_path("/slashes%2Fx")).label == "/slashes"  # type: ignore[union-attr]
    for refused in ("/params%2Fx", "/slashes;v=1/x", "/strict;v=1", "/strict%2Fx"):
        with pytest.raises(BadRequest):
            router.match(None, routable_path(refused))
    # The route is chosen on the canonical path, then asked.
    assert router.match(None, routable_path("/params;v=1")).label == "/params"  # type: ignore[union-attr]
    with pytest.raises(BadRequest):
        router.match(None, routable_path("/x;v=1/params"))


# --- property: the route decided is the route the most liberal reader would pick ----------

_PIECES = [
    "a", "admin", "x.txt", "/", "/", "/", ".", "..", ";", ";x=1", "%2e", "%2E", "%2f", "%2F",
    "%25", "%252e", "%5c", "\\", "%3b", "%3F", "%23", "%00", "%0a", "%C0%AE", "%u002e", "%41",
    "%C3%A9", "%", "?", "#",
]  # fmt: skip


def _liberal_reading(raw: str) -> str:
    """What the most permissive stack serves: decoded until nothing changes, '\\' as '/',
    parameters dropped, empty segments merged, dot segments resolved."""
    path = raw.partition("?")[0].partition("#")[0]
    for _ in range(4):
        path = unquote(path)
    segments: list[str] = []
    for segment in path.replace("\\", "/").split("/"):
        segment = segment.partition(";")[0]
        if segment == "..":
            segments = segments[:-1]
        elif segment not in ("", "."):
            segments.append(segment)
    return "/" + "/".join(segments)


_LIBERAL_ROUTER = Router(
    [
        route("/", allow_path_parameters=True, allow_encoded_slashes=True),
        route("/admin", allow_path_parameters=True, allow_encoded_slashes=True),
        route("/a", allow_path_parameters=True, allow_encoded_slashes=True),
    ]
)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=8))
def test_an_accepted_path_is_the_path_a_liberal_upstream_serves(pieces: list[str]) -> None:
    raw = "/" + "".join(pieces)
    try:
        path = routable_path(raw)
    except BadRequest:
        return  # refused: nothing is forwarded
    assert path.rstrip("/") == _liberal_reading(raw).rstrip("/")
    chosen = _LIBERAL_ROUTER.match(None, path)
    assert chosen is _LIBERAL_ROUTER.match(None, routable_path(_liberal_reading(raw)))
    assert path.parameters == (";" in raw.partition("?")[0].partition("#")[0])
