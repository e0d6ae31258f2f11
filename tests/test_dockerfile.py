"""The Dockerfile passes hadolint and keeps its promises; tests/container builds and runs it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.config import load_config
from gateway.devkit.idp import DemoIdP

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck() -> None:
    assert "USER 10001" in DOCKERFILE
    assert 'CMD ["saml-gateway", "healthcheck"]' in DOCKERFILE
    assert 'ENTRYPOINT ["saml-gateway"]' in DOCKERFILE
    assert "EXPOSE 8080 9901" in DOCKERFILE


def test_base_is_pinned_and_labelled() -> None:
    # A patch release, not a moving tag such as 3.11-slim.
    assert re.search(r"^ARG BASE_IMAGE=\S+:3\.11\.\d+-slim-bookworm$", DOCKERFILE, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE, re.M)
    assert f"ARG VERSION={PYPROJECT['project']['version']}\n" in DOCKERFILE
    for label in ("title", "description", "licenses", "version", "revision", "base.name"):
        assert f"org.opencontainers.image.{label}=" in DOCKERFILE


def locked() -> dict[str, tuple[str, str]]:
    """The lock's pins: name → (version, marker), each pin followed by its hashes."""
    pins: dict[str, tuple[str, str]] = {}
    text = (ROOT / "requirements.lock").read_text()
    for block in re.split(r"\n(?=\S)", text):
        first = block.split("\n", 1)[0]
        if first.startswith("#") or not first.strip():
            continue
        requirement, _, marker = first.rstrip(" \\").partition(";")
        name, _, version = requirement.strip().partition("==")
        assert version, f"not pinned with ==: {first}"
        assert "--hash=sha256:" in block, f"no hash for {name}"
        pins[canonicalize_name(name)] = (version, marker.strip())
    return pins


def test_lock_pins_every_dependency_of_the_image() -> None:
    """What `make lock` writes covers what the image installs: the runtime dependencies,
    the speed extra and the build backend, at versions pyproject.toml allows. (Stale after a
    change to pyproject.toml: run `make lock`.)"""
    pins = locked()
    wanted = [
        *PYPROJECT["project"]["dependencies"],
        *PYPROJECT["project"]["optional-dependencies"]["speed"],
        *PYPROJECT["build-system"]["requires"],
    ]
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is missing from requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name][0]), (
            f"requirements.lock pins {name}=={pins[name][0]}, pyproject.toml wants "
            f"{requirement.specifier}: run `make lock`"
        )


def test_the_dockerfile_installs_from_the_lock_only() -> None:
    assert "--require-hashes -r requirements.lock" in DOCKERFILE
    assert "--no-deps --no-build-isolation --no-index ." in DOCKERFILE


def test_build_context_is_only_what_the_image_needs() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"  # everything else (.venv, .git, .cache, tests) stays out
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included == {
        "requirements.lock",
        "pyproject.toml",
        "README.md",
        "gateway",
        "config/container.yaml",
        "config/examples",  # the profiles of `saml-gateway init`
    }


def test_image_config_binds_both_listeners_for_outside_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file the image carries at its default path loads once its variables are set and
    its certificate is beside it, and both listeners are reachable through published ports."""
    assert "COPY config/container.yaml /etc/saml-gateway/gateway.yaml" in DOCKERFILE
    assert 'CMD ["run", "-c", "/etc/saml-gateway/gateway.yaml"]' in DOCKERFILE
    shutil.copy(ROOT / "config" / "container.yaml", tmp_path / "gateway.yaml")
    DemoIdP.generate("https://idp.example/saml").write_certificate(tmp_path / "idp.pem")
    for name, value in {
        "GATEWAY_IDP_ISSUER": "https://idp.example/saml",
        "GATEWAY_TOKEN_URL": "https://as.example/oauth2/token",
        "GATEWAY_CLIENT_ID": "gateway",
        "GATEWAY_CLIENT_SECRET": "not-a-real-secret",
        "GATEWAY_AUDIENCE": "https://as.example/oauth2",
        "GATEWAY_UPSTREAM": "http://api.internal:8000",
    }.items():
        monkeypatch.setenv(name, value)
    config = load_config(tmp_path / "gateway.yaml")
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 8080)
    assert (config.admin.host, config.admin.port, config.admin.enabled) == ("0.0.0.0", 9901, True)
    assert config.routes[0].upstream == "http://api.internal:8000"
