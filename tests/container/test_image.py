"""The image as the README runs it: built with podman, started, asked, stopped.

The IdP, the authorization server and the upstream run here on 127.0.0.1; the container
shares the host's network, so its listeners are bound to 127.0.0.1 on free ports (never
the image's 0.0.0.0, which on the host's network would be every interface of the machine).
"""

from __future__ import annotations

import asyncio
import base64
import json
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP
from gateway.devkit.upstream import UpstreamApp

from .helpers import ROOT, ULIMITS, Podman, pinned_base
from .test_healthcheck import free_port

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

ISSUER = "https://idp.test/saml"
AUDIENCE = "https://as.test/oauth2"
CLIENT_ID = "gateway"
CLIENT_SECRET = "container-test-secret-0123456789"
IMAGE_CONFIG = "/etc/saml-gateway/gateway.yaml"


def inspect(podman: Podman, image: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(podman("image", "inspect", image).stdout)
    return data[0]


def test_image_metadata(podman: Podman, image: str) -> None:
    data = inspect(podman, image)
    config = data["Config"]
    assert config["User"] == "10001"
    assert set(config["ExposedPorts"]) == {"8080/tcp", "9901/tcp"}
    assert data["Healthcheck"]["Test"] == ["CMD", "saml-gateway", "healthcheck"]
    assert config["Entrypoint"] == ["saml-gateway"]
    assert config["Cmd"] == ["run", "-c", IMAGE_CONFIG]
    labels = config["Labels"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.base.name"] == pinned_base()
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def installed_versus_locked(podman: Podman, container: str) -> tuple[dict[str, str], ...]:
    """What the image has installed, and what the lock says it should have for the Python the
    base carries (the lock's markers decide which of its lines apply)."""
    probe = podman(
        "exec",
        container,
        "python",
        "-c",
        "import json, platform, subprocess, sys; print(platform.python_version()); "
        "sys.stdout.flush(); subprocess.run([sys.executable, '-m', 'pip', 'list', "
        "'--format', 'json'], check=True)",
    )
    python_version, listing = probe.stdout.split("\n", 1)
    installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(listing)}
    environment = {
        "python_full_version": python_version,
        "python_version": ".".join(python_version.split(".")[:2]),
        "sys_platform": "linux",
        "platform_python_implementation": "CPython",
        "implementation_name": "cpython",
    }
    locked = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line or line[0] in " #":
            continue
        requirement, _, marker = line.rstrip(" \\").partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(environment):
            continue
        name, _, pinned = requirement.strip().partition("==")
        locked[canonicalize_name(name)] = pinned
    return installed, locked


def test_bare_image_names_what_is_missing(podman: Podman, image: str) -> None:
    result = podman("run", "--rm", "--network", "host", *ULIMITS, image, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"configuration error in {IMAGE_CONFIG}:" in result.stderr
    for variable in ("GATEWAY_IDP_ISSUER", "GATEWAY_TOKEN_URL", "GATEWAY_CLIENT_SECRET"):
        assert f"environment variable {variable!r} is not set" in result.stderr
    assert "Traceback" not in result.stderr


# --- the gateway running in the container ----------------------------------------------------


@pytest.fixture
async def parts() -> AsyncIterator[tuple[FakeAuthorizationServer, UpstreamApp, str]]:
    auth = FakeAuthorizationServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    await auth.start()
    upstream = UpstreamApp()
    url = await upstream.start()
    yield auth, upstream, url
    await upstream.stop()
    await auth.stop()


@pytest.fixture
def container_name(podman: Podman) -> Iterator[str]:
    name = f"saml-gateway-test-{uuid.uuid4().hex[:8]}"
    yield name
    podman("rm", "--force", "--time", "0", name, check=False, timeout=120)


def config_for_host_network(folder: Path, port: int, admin_port: int) -> Path:
    """The image's own config (config/container.yaml) with its listeners moved to loopback
    ports; everything else stays as shipped, values from the environment."""
    data = yaml.safe_load((ROOT / "config" / "container.yaml").read_text())
    data["listen"] = {"host": "127.0.0.1", "port": port}
    data["admin"] = {"host": "127.0.0.1", "port": admin_port}
    data["lifecycle"] = {"shutdown_grace": 1, "drain_timeout": 20}
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def wait_ready(session: aiohttp.ClientSession, url: str, podman: Podman, name: str) -> None:
    for _ in range(300):  # 60 s at most: a container start copies the image on vfs
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        state = await asyncio.to_thread(
            podman, "inspect", "--format", "{{.State.Status}}", name, check=False
        )
        if state.stdout.strip() not in ("created", "running", "configured"):
            logs = await asyncio.to_thread(podman, "logs", name, check=False)
            pytest.fail(f"container is {state.stdout.strip()}:\n{logs.stdout}{logs.stderr}")
        await asyncio.sleep(0.2)
    pytest.fail(f"{url} did not answer 200 in time")


def log_messages(text: str) -> list[str]:
    return [json.loads(line)["msg"] for line in text.splitlines() if line.startswith("{")]


async def test_container_serves_checks_health_and_drains(
    podman: Podman,
    image: str,
    container_name: str,
    parts: tuple[FakeAuthorizationServer, UpstreamApp, str],
    tmp_path: Path,
) -> None:
    auth, upstream, upstream_url = parts
    idp = DemoIdP.generate(ISSUER)
    certificate = idp.write_certificate(tmp_path / "idp.pem")
    port, admin_port = free_port(), free_port()
    config = config_for_host_network(tmp_path, port, admin_port)
    environment = {
        "GATEWAY_IDP_ISSUER": ISSUER,
        "GATEWAY_TOKEN_URL": auth.token_url,
        "GATEWAY_CLIENT_ID": CLIENT_ID,
        "GATEWAY_CLIENT_SECRET": CLIENT_SECRET,
        "GATEWAY_AUDIENCE": AUDIENCE,
        "GATEWAY_UPSTREAM": upstream_url,
    }
    # As the README runs it: the config and the certificate mounted read-only at the image's
    # paths, the values passed from the environment (never on the command line).
    run = [
        "run",
        "--detach",
        "--name",
        container_name,
        "--network",
        "host",
        *ULIMITS,
        "--volume",
        f"{config}:{IMAGE_CONFIG}:ro",
        "--volume",
        f"{certificate}:/etc/saml-gateway/idp.pem:ro",
    ]
    for variable in environment:
        run += ["--env", variable]
    await asyncio.to_thread(podman, *run, image, env=environment)

    gateway = f"http://127.0.0.1:{port}"
    admin = f"http://127.0.0.1:{admin_port}"
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, f"{admin}/readyz", podman, container_name)
        async with session.get(f"{admin}/readyz") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ready"

        # A real request path: the container's gateway validated the assertion, exchanged
        # it at the authorization server on the host and called the upstream with the token.
        raw = idp.issue(
            "alice@example.test", audience=AUDIENCE, recipient=auth.token_url, now=datetime.now(UTC)
        )
        headers = {"X-SAML-Assertion": base64.b64encode(raw).decode()}
        async with session.get(f"{gateway}/echo/orders", headers=headers) as response:
            assert response.status == 200, await response.text()
            seen = {name.lower(): value for name, value in (await response.json())["headers"]}
        assert auth.calls == 1
        assert auth.last_form["grant_type"] == "urn:ietf:params:oauth:grant-type:saml2-bearer"
        assert seen["authorization"] == f"Bearer {auth.issued[-1]}"
        assert "x-saml-assertion" not in seen
        forged = DemoIdP.generate(ISSUER).issue(
            "mallory@example.test",
            audience=AUDIENCE,
            recipient=auth.token_url,
            now=datetime.now(UTC),
        )
        forged_headers = {"X-SAML-Assertion": base64.b64encode(forged).decode()}
        async with session.get(f"{gateway}/echo/orders", headers=forged_headers) as response:
            assert response.status == 401
        assert auth.calls == 1  # the forged one never reached the authorization server
        async with session.get(f"{admin}/metrics") as response:
            assert response.status == 200
            assert "gateway_" in await response.text()

        # The image's HEALTHCHECK, as the engine runs it: it reads the mounted config and
        # follows its admin port (not the 9901 of the image's default).
        health = await asyncio.to_thread(podman, "healthcheck", "run", container_name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        state = json.loads((await asyncio.to_thread(podman, "inspect", container_name)).stdout)
        checks = state[0]["State"].get("Health") or state[0]["State"]["Healthcheck"]
        assert checks["Log"][-1]["Output"].strip() == (
            f"healthy: http://127.0.0.1:{admin_port}/readyz: 200"
        )
        # The gateway process itself (PID 1) runs as the image's non-root user.
        status = await asyncio.to_thread(podman, "exec", container_name, "cat", "/proc/1/status")
        uids = next(line for line in status.stdout.splitlines() if line.startswith("Uid:"))
        assert uids.split()[1:] == ["10001"] * 4

        # Exactly the lock's versions, and nothing else but the gateway and the venv's pip.
        installed, locked = await asyncio.to_thread(installed_versus_locked, podman, container_name)
        version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
        assert installed.pop("saml-oauth-gateway") == version
        installed.pop("pip")
        assert installed == locked

        # `podman stop` sends SIGTERM: the request in flight finishes, then the gateway exits 0.
        in_flight = asyncio.create_task(session.get(f"{gateway}/slow/4", headers=headers))
        for _ in range(200):  # until the upstream holds it (bounded: 20 s)
            if upstream.requests >= 2:
                break
            await asyncio.sleep(0.1)
        assert upstream.requests == 2
        stop = await asyncio.to_thread(
            podman, "stop", "--time", "30", container_name, check=False, timeout=60
        )
        assert stop.returncode == 0, stop.stderr
        response = await in_flight
        assert response.status == 200
        assert await response.text() == "slow"
        response.release()

    exit_code = await asyncio.to_thread(
        podman, "inspect", "--format", "{{.State.ExitCode}}", container_name
    )
    assert exit_code.stdout.strip() == "0"
    logs = await asyncio.to_thread(podman, "logs", container_name)
    messages = log_messages(logs.stdout + logs.stderr)
    # In this order: the drain started while /slow was in flight, /slow finished, then stopped.
    draining = messages.index("draining")
    slow = messages.index("GET /slow/4 200")
    assert draining < slow < messages.index("stopped")
    text = logs.stdout + logs.stderr
    assert CLIENT_SECRET not in text and auth.issued[-1] not in text


def test_init_writes_a_starter_inside_the_image(podman: Podman, image: str) -> None:
    # The profiles reach the image through gateway/profiles, a link into config/examples.
    result = podman(
        "run",
        "--rm",
        "--network",
        "host",
        *ULIMITS,
        image,
        "init",
        "--profile",
        "okta",
        "-o",
        "-",
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "authorization_servers:" in result.stdout
