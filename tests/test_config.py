"""The YAML configuration: shipped examples load, and every error names its key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.config import load_config, parse_config
from gateway.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[1] / "config"


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("GATEWAY_CLIENT_SECRET", "very-secret-value")
    return "very-secret-value"


@pytest.mark.parametrize("name", ["minimal.yaml", "full.yaml"])
def test_shipped_examples_load(name: str, secret: str) -> None:
    config = load_config(CONFIG / name)
    server = config.authorization_servers["corp-as"]
    assert server.client_secret is not None
    assert server.client_secret.get_secret_value() == secret
    assert secret not in str(config.redacted())
    assert Path(config.identity_providers["corp-idp"].certificates[0]).is_file()


def minimal(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "identity_providers": {"idp": {"issuer": "https://idp", "certificates": ["idp.pem"]}},
        "authorization_servers": {
            "as": {
                "token_url": "https://as/token",
                "client_id": "c",
                "client_secret": "s",
                "audience": "https://as",
            }
        },
        "routes": [
            {
                "upstream": "http://127.0.0.1:9000",
                "identity_provider": "idp",
                "authorization_server": "as",
            }
        ],
    }
    data.update(overrides)
    return data


def problems(data: object, base: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base)
    return info.value.problems


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "idp.pem").write_text((CONFIG / "certs" / "example-idp.pem").read_text())
    return tmp_path


def test_valid_minimal_config_has_defaults(base: Path) -> None:
    config = parse_config(minimal(), base)
    assert config.listen.port == 8080
    assert config.admin.host == "127.0.0.1"
    assert config.assertion.max_size == 64 * 1024
    assert config.assertion.clock_skew == 120
    assert config.cache.max_entries == 100_000
    assert config.cache.refresh_margin == 30
    assert config.authorization_servers["as"].recipients == ("https://as/token",)
    assert [h.name for h in config.assertion.headers] == ["X-SAML-Assertion", "Authorization"]


def test_bad_url_names_key_and_value(base: Path) -> None:
    data = minimal(
        routes=[{"upstream": "htp:/x", "identity_provider": "idp", "authorization_server": "as"}]
    )
    assert "routes[0].upstream: not a URL: 'htp:/x'" in problems(data, base)


def test_unknown_key_is_an_error(base: Path) -> None:
    data = minimal()
    data["cache"] = {"max_entires": 5}
    assert problems(data, base) == ["cache.max_entires: unknown key"]


def test_unknown_reference_names_route(base: Path) -> None:
    data = minimal(
        routes=[{"upstream": "http://x", "identity_provider": "nope", "authorization_server": "as"}]
    )
    [problem] = problems(data, base)
    assert problem.startswith("routes[0].identity_provider: unknown identity provider 'nope'")


def test_missing_certificate_file(base: Path) -> None:
    data = minimal(identity_providers={"idp": {"issuer": "x", "certificates": ["gone.pem"]}})
    [problem] = problems(data, base)
    assert problem.startswith("identity_providers.idp.certificates[0]: file not found")


def test_missing_required_key(base: Path) -> None:
    data = minimal()
    del data["routes"]
    assert "routes: required key is missing" in problems(data, base)


def test_env_and_file_references(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SECRET", "from-env")
    (base / "secret.txt").write_text("from-file\n")
    servers = {
        "as": {
            "token_url": "https://as/token",
            "client_id": "c",
            "client_secret": "${MY_SECRET}",
            "audience": "x",
        },
        "b": {
            "token_url": "https://as/token",
            "client_id": "c",
            "client_secret": "${file:secret.txt}",
            "audience": "x",
        },
    }
    config = parse_config(minimal(authorization_servers=servers), base)
    secrets = {k: v.client_secret for k, v in config.authorization_servers.items()}
    assert {k: v.get_secret_value() for k, v in secrets.items() if v} == {
        "as": "from-env",
        "b": "from-file",
    }


def test_missing_env_reference_names_key(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    data = minimal()
    data["authorization_servers"] = {
        "as": {
            "token_url": "https://as/token",
            "client_id": "c",
            "client_secret": "${NOT_SET_ANYWHERE}",
            "audience": "x",
        }
    }
    assert problems(data, base) == [
        "authorization_servers.as.client_secret: environment variable 'NOT_SET_ANYWHERE' is not set"
    ]


def test_client_auth_needs_its_credentials(base: Path) -> None:
    servers = {
        "as": {
            "token_url": "https://as/token",
            "client_id": "c",
            "audience": "x",
            "client_auth": "client_secret_post",
        }
    }
    [problem] = problems(minimal(authorization_servers=servers), base)
    assert (
        problem
        == "authorization_servers.as: client_auth 'client_secret_post' needs 'client_secret'"
    )


def test_redis_backend_needs_settings(base: Path) -> None:
    [problem] = problems(minimal(cache={"backend": "redis"}), base)
    assert problem == "cache: backend 'redis' needs a 'redis' section"


def test_not_yaml_mapping(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["(top level): expected a mapping of settings"]


def test_config_is_frozen(base: Path) -> None:
    config = parse_config(minimal(), base)
    with pytest.raises(Exception, match="frozen"):
        config.workers = 3  # type: ignore[misc]


def test_paths_must_be_absolute(base: Path) -> None:
    data = minimal(forward_auth={"enabled": True, "path": "auth"})
    data["routes"] = [
        {
            "path_prefix": "api",
            "upstream": "http://x",
            "identity_provider": "idp",
            "authorization_server": "as",
        }
    ]
    assert sorted(problems(data, base)) == [
        "forward_auth.path: must start with '/': 'auth'",
        "routes[0].path_prefix: must start with '/': 'api'",
    ]


def redis_cache(url: str, *, allow_insecure: bool = True) -> dict[str, object]:
    # allow_insecure: these tests are about URL shapes and redaction, not about TLS.
    return {
        "backend": "redis",
        "redis": {
            "url": url,
            "encryption_keys": {"k1": "0123456789abcdef0123"},
            "active_key": "k1",
            "allow_insecure": allow_insecure,
        },
    }


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:Pa55Qz9x@h:6379/0", "redis://user:**********@h:6379/0"),
        (
            "redis+sentinel://u:Pa55Qz9x@h1:26379,h2:26379/mymaster/0",
            "redis+sentinel://u:**********@h1:26379,h2:26379/mymaster/0",
        ),
        (
            "redis+cluster://u:Pa55Qz9x@[::1]:6379,h2:6379",
            "redis+cluster://u:**********@[::1]:6379,h2:6379",
        ),
        (
            "rediss://:Pa55Qz9x@h:6380/1?ssl_cert_reqs=none",
            "rediss://:**********@h:6380/1?ssl_cert_reqs=none",
        ),
        # an '@' in the password: the userinfo ends at the authority's last '@'
        ("redis://u:Pa55@Qz9x@h:6379/0", "redis://u:**********@h:6379/0"),
    ],
)
def test_redis_url_password_is_redacted(base: Path, url: str, shown: str) -> None:
    config = parse_config(minimal(cache=redis_cache(url)), base)
    assert config.cache.redis is not None
    assert config.cache.redis.url == url  # the cache still connects with the real password
    redacted = config.redacted()
    assert redacted["cache"]["redis"]["url"] == shown
    assert "Pa55" not in str(redacted)
    assert "Qz9x" not in str(redacted)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0",
        "redis://user@h:6379/0",
        "redis+sentinel://h1:26379,h2:26379/mymaster/0",
        "unix:///run/redis.sock?db=0",
    ],
)
def test_redis_url_without_password_is_shown_unchanged(base: Path, url: str) -> None:
    config = parse_config(minimal(cache=redis_cache(url)), base)
    assert config.redacted()["cache"]["redis"]["url"] == url


def test_check_config_prints_no_redis_url_password(
    base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = base / "gateway.yaml"
    url = "redis+sentinel://sentinel:S3ntinelPassw0rd@127.0.0.1:26379,127.0.0.2:26379/mymaster"
    path.write_text(yaml.safe_dump(minimal(cache=redis_cache(url))))
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "S3ntinelPassw0rd" not in out
    assert "0123456789abcdef0123" not in out
    assert "sentinel:**********@127.0.0.1:26379,127.0.0.2:26379/mymaster" in out


def test_errors_never_quote_a_secret(tmp_path: Path, base: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text('authorization_servers:\n  as:\n    client_secret: "s3cr3t-value"x\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad_yaml)
    assert info.value.problems[0].startswith("not valid YAML at line 3, column")
    assert "s3cr3t" not in str(info.value)
    servers = {
        "as": {"token_url": "htps://user:hunter2@as/t", "audience": "a", "client_auth": "none"}
    }
    [problem] = problems(minimal(authorization_servers=servers), base)
    assert problem == "authorization_servers.as.token_url: not a URL: 'htps://user:**********@as/t'"
