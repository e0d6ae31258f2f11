"""The forward-auth examples agree with each other and with the gateway's configuration."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from gateway.config import load_config
from gateway.forward_auth import PRESETS

from .nginx_runner import EXAMPLES


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("GATEWAY_CLIENT_SECRET", "example-secret-value")
    return load_config(EXAMPLES / "gateway.yaml")


def test_gateway_example_loads_in_forward_auth_mode(gateway: Any) -> None:
    assert gateway.forward_auth.enabled
    assert gateway.forward_auth.listen is not None
    assert gateway.forward_auth.token_header == "Authorization"
    # The cached nginx example keys on this header alone, so it must be the only source.
    assert [h.name for h in gateway.assertion.headers] == ["X-SAML-Assertion"]
    assert gateway.forward_auth.front == "nginx"
    # Two routes trusting two IdPs: what the cached nginx examples mirror.
    routes = {r.name: (r.path_prefix, r.identity_provider) for r in gateway.routes}
    assert routes == {"public": ("/public", "corp-idp"), "admin": ("/admin", "partner-idp")}


def test_traefik_forwards_to_the_auth_path_and_copies_the_token(gateway: Any) -> None:
    data = yaml.safe_load((EXAMPLES / "traefik.yaml").read_text())["http"]
    listen, path = gateway.forward_auth.listen, gateway.forward_auth.path
    auth = data["middlewares"]["saml-auth"]["forwardAuth"]
    assert auth["address"] == f"http://127.0.0.1:{listen.port}{path}"
    # front: traefik reads X-Forwarded-*: Traefik overwrites them only when it does not
    # trust the client's.
    assert auth["trustForwardHeader"] is False
    assert PRESETS["traefik"].uri == "X-Forwarded-Uri"
    assert auth["authResponseHeaders"] == ["Authorization"]
    assert auth["authRequestHeaders"] == ["X-SAML-Assertion"]
    dropped = data["middlewares"]["drop-assertion"]["headers"]["customRequestHeaders"]
    assert dropped == {"X-SAML-Assertion": ""}
    # The assertion is removed only after the gateway has seen it.
    assert data["routers"]["api"]["middlewares"] == ["saml-auth", "drop-assertion"]


def test_envoy_asks_the_auth_path_and_strips_the_assertion(gateway: Any) -> None:
    data = yaml.safe_load((EXAMPLES / "envoy.yaml").read_text())["static_resources"]
    manager = data["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = manager["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    ext_authz = filters[0]["typed_config"]
    assert ext_authz["failure_mode_allow"] is False
    service = ext_authz["http_service"]
    assert service["path_prefix"] == gateway.forward_auth.path
    assert service["authorization_request"]["allowed_headers"]["patterns"] == [
        {"exact": "x-saml-assertion"}
    ]
    assert service["authorization_response"]["allowed_upstream_headers"]["patterns"] == [
        {"exact": "authorization"}
    ]
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["request_headers_to_remove"] == ["x-saml-assertion"]
    cluster = next(c for c in data["clusters"] if c["name"] == service["server_uri"]["cluster"])
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == gateway.forward_auth.listen.port


NGINX = ["nginx.conf", "nginx-cached.conf", "nginx-cached-setmisc.conf", "nginx-lua.conf"]
CACHED = ["nginx-cached.conf", "nginx-cached-setmisc.conf"]


def directives(name: str) -> list[str]:
    """An nginx example's lines without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in (EXAMPLES / name).read_text().splitlines())
    return [line for line in lines if line]


def blocks(name: str, opening: str) -> list[list[str]]:
    """The directives of every block whose first line starts with ``opening``."""
    lines = directives(name)
    found = []
    for i, line in enumerate(lines):
        if line.startswith(opening) and line.endswith("{"):
            end = lines.index("}", i)
            found.append(lines[i:end])
    return found


def auth_locations(name: str) -> dict[str, list[str]]:
    return {block[0].split()[2]: block for block in blocks(name, "location = /_saml_auth")}


@pytest.mark.parametrize("name", NGINX)
def test_nginx_examples_use_the_auth_path(gateway: Any, name: str) -> None:
    text = (EXAMPLES / name).read_text()
    path = gateway.forward_auth.path
    assert f"server 127.0.0.1:{gateway.forward_auth.listen.port};" in text
    for location, block in auth_locations(name).items():
        # The gateway is asked on forward_auth.path, whatever the auth location is called.
        passes = "proxy_pass http://saml_gateway;" if location == path else None
        assert (passes or f"proxy_pass http://saml_gateway{path};") in block


@pytest.mark.parametrize("name", NGINX)
def test_nginx_examples_set_what_the_gateway_reads(gateway: Any, name: str) -> None:
    """front: nginx reads these three headers; nginx sets nothing by itself, so every auth
    location must set them (proxy_set_header replaces a client's copy)."""
    preset = PRESETS["nginx"]
    values = {preset.uri: "$request_uri", preset.method: "$request_method", preset.host: "$host"}
    assert auth_locations(name)
    for block in auth_locations(name).values():
        for header, value in values.items():
            assert f"proxy_set_header {header} {value};" in block


def test_setmisc_example_differs_from_the_cached_one_only_in_its_key() -> None:
    """Every caching rule of nginx-cached.conf holds in the set-misc variant as well."""
    setmisc = directives("nginx-cached-setmisc.conf")
    assert setmisc[:2] == [
        "load_module /usr/lib/nginx/modules/ndk_http_module.so;",
        "load_module /usr/lib/nginx/modules/ngx_http_set_misc_module.so;",
    ]
    key = [
        'set_hmac_sha256 $saml_key "saml-gateway auth cache v1" $http_x_saml_assertion;',
        "set_encode_hex $saml_key $saml_key;",
    ]
    # The key is computed in each auth location, from the one header the gateway reads.
    for block in auth_locations("nginx-cached-setmisc.conf").values():
        assert block[2:4] == key
    rest = [line for line in setmisc[2:] if line not in key]
    core_key = 'proxy_cache_key "$host $http_x_saml_assertion";'
    swapped = [core_key if line == 'proxy_cache_key "$host $saml_key";' else line for line in rest]
    assert swapped == directives("nginx-cached.conf")


KEYS = {
    "nginx-cached.conf": 'proxy_cache_key "$host $http_x_saml_assertion";',
    "nginx-cached-setmisc.conf": 'proxy_cache_key "$host $saml_key";',
}


@pytest.mark.parametrize("name", CACHED)
def test_cached_examples_keep_the_caching_rules(name: str) -> None:
    lines = directives(name)
    auths = auth_locations(name)
    assert len(auths) == 2
    for block in auths.values():
        for rule in (
            # no header, or a path the gateway could read otherwise than nginx: no lookup,
            # nothing stored
            "proxy_cache_bypass $saml_no_assertion $saml_unusual_path;",
            "proxy_no_cache $saml_no_assertion $saml_unusual_path;",
            'proxy_set_header Authorization "";',  # the key does not cover it
        ):
            assert rule in block
        keys = [line for line in block if line.startswith("proxy_cache_key ")]
        assert keys == [KEYS[name]]  # the normalized host and the assertion
    # The lifetime is the gateway's max-age alone.
    assert not [line for line in lines if line.startswith(("proxy_cache_valid", "proxy_ignore"))]


@pytest.mark.parametrize("name", CACHED)
def test_cached_examples_give_each_gateway_route_its_own_zone(gateway: Any, name: str) -> None:
    """A cached answer is reused only on the route it was given for: one location per
    gateway route, asking through its own auth location, into its own cache zone."""
    auths = auth_locations(name)
    zones = []
    for route in gateway.routes:
        (location,) = blocks(name, f"location ~ ^{route.path_prefix}(/|$)")
        (auth,) = [line.split()[1].rstrip(";") for line in location if "auth_request " in line]
        (zone,) = [line for line in auths[auth] if line.startswith("proxy_cache ")]
        zones.append(zone)
    assert len(set(zones)) == len(gateway.routes)
    # Every other path is answered by nginx itself, never forwarded.
    assert blocks(name, "location / ") == [["location / {", "return 404;"]]


def test_caddy_example_asks_the_auth_path_and_strips_the_assertion(gateway: Any) -> None:
    text = (EXAMPLES / "Caddyfile").read_text()
    lines = [line.split(" #", 1)[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    listen, path = gateway.forward_auth.listen, gateway.forward_auth.path
    assert f"forward_auth 127.0.0.1:{listen.port} {{" in lines
    assert f"uri {path}" in lines
    assert "copy_headers Authorization" in lines
    assert "header_up -X-SAML-Assertion" in lines
    # front: caddy reads X-Forwarded-*, which Caddy keeps from trusted proxies only.
    assert not [line for line in lines if "trusted_proxies" in line]
    assert PRESETS["caddy"].host == "X-Forwarded-Host"


def test_lua_example_keeps_the_caching_rules(gateway: Any) -> None:
    """One dictionary and one auth location per gateway route, the same plain-path map as
    nginx-cached.conf, the assertion and client Authorization kept from the upstream."""
    lua, cached = directives("nginx-lua.conf"), directives("nginx-cached.conf")
    start = cached.index("map $request_uri $saml_unusual_path {")
    assert lua[lua.index(cached[start]) :][:4] == cached[start : start + 4]
    auths = auth_locations("nginx-lua.conf")
    dicts = {line.split()[1] for line in lua if line.startswith("lua_shared_dict ")}
    used = []
    for route in gateway.routes:
        (location,) = blocks("nginx-lua.conf", f"location ~ ^{route.path_prefix}(/|$)")
        (access,) = [line for line in location if line.startswith("access_by_lua_block")]
        (dict_name, auth) = re.findall(r'ngx\.shared\.(\w+), "([^"]+)"', access)[0]
        (forget,) = [line for line in location if line.startswith("header_filter_by_lua")]
        assert f"ngx.shared.{dict_name})" in forget  # drops from the same dictionary
        assert auth in auths and 'proxy_set_header Authorization "";' in auths[auth]
        assert "proxy_set_header Authorization $saml_token;" in location
        assert 'proxy_set_header X-SAML-Assertion "";' in location
        used.append(dict_name)
    assert sorted(used) == sorted(dicts) and len(set(used)) == len(gateway.routes)
    assert blocks("nginx-lua.conf", "location / ") == [["location / {", "return 404;"]]
