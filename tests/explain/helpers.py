"""A configuration on disk, a signing IdP, and the real command line, for ``explain``."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from lxml import etree

from gateway.cli import main
from gateway.devkit.idp import DemoIdP

ROOT = Path(__file__).resolve().parents[2]
ISSUER = "https://idp.explain.test/saml"
AUDIENCE = "https://as.explain.test/oauth2"
TOKEN_URL = "https://as.explain.test/oauth2/token"
OTHER_AUDIENCE = "https://other-as.explain.test"
OTHER_TOKEN_URL = "https://other-as.explain.test/token"
SUBJECT = "alice.private@explain.test"  # must never be printed
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="session")
def idp() -> DemoIdP:
    return DemoIdP.generate(ISSUER, common_name="explain-test-idp")


@pytest.fixture(scope="session")
def stranger() -> DemoIdP:
    """Another key, with the genuine issuer name: its signatures must not verify."""
    return DemoIdP.generate(ISSUER, common_name="stranger")


def write_config(folder: Path, idp: DemoIdP, **assertion: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    idp.write_certificate(folder / "idp.pem")
    config: dict[str, Any] = {
        "identity_providers": {"corp": {"issuer": ISSUER, "certificates": ["idp.pem"]}},
        "authorization_servers": {
            "main": {"token_url": TOKEN_URL, "client_auth": "none", "audience": AUDIENCE},
            "other": {
                "token_url": OTHER_TOKEN_URL,
                "client_auth": "none",
                "audience": OTHER_AUDIENCE,
            },
        },
        "routes": [
            {
                "name": "api",
                "path_prefix": "/api",
                "upstream": "http://127.0.0.1:9",
                "identity_provider": "corp",
                "authorization_server": "main",
            },
            {
                "name": "legacy",
                "path_prefix": "/legacy",
                "upstream": "http://127.0.0.1:9",
                "identity_provider": "corp",
                "authorization_server": "other",
            },
        ],
    }
    if assertion:
        config["assertion"] = assertion
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def config(tmp_path: Path, idp: DemoIdP) -> Path:
    return write_config(tmp_path / "conf", idp)


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def last(self) -> str:
        return self.out.rstrip("\n").splitlines()[-1]

    def check(self, name: str) -> dict[str, str]:
        """The printed block of one check: its mark, expected and found lines."""
        lines = self.out.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("[") and line.endswith(f"] {name}"):
                block = {"mark": line[1 : line.index("]")]}
                for follow in lines[i + 1 : i + 3]:
                    key, _, value = follow.strip().partition(":")
                    if key in ("expected", "found"):
                        block[key] = value.strip()
                return block
        raise AssertionError(f"no check {name!r} in:\n{self.out}")


Explain = Callable[..., Result]


@pytest.fixture
def explain(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Explain:
    """``saml-gateway explain -c CONFIG [args] FILE``, through the command line's ``main``
    in this process (``cli`` runs the real process, for stdin and the exit status)."""

    def run(document: bytes | str, *args: str, config_path: Path | None = None) -> Result:
        data = document.encode() if isinstance(document, str) else document
        target = tmp_path / "captured.txt"
        target.write_bytes(data)
        capsys.readouterr()
        code = main(["explain", "-c", str(config_path or config), *args, str(target)])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def cli(*args: str, stdin: bytes | None = None) -> Result:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def secrets_of(raw: bytes) -> list[str]:
    """What explain must never print: the signature value, the certificate, the NameID."""
    try:
        root = etree.fromstring(raw)  # noqa: TID251 - reading our own test document
    except etree.XMLSyntaxError:
        return [SUBJECT]
    ds = "{http://www.w3.org/2000/09/xmldsig#}"
    values = [SUBJECT]
    for tag in ("SignatureValue", "X509Certificate", "DigestValue"):
        values += ["".join((e.text or "").split())[:40] for e in root.iter(f"{ds}{tag}")]
    return [v for v in values if v]
