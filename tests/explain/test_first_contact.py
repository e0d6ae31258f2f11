"""First contact: ``--version``, and ``init`` for every profile passing ``check-config``."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.devkit.idp import DemoIdP
from gateway.starter import CERTIFICATE_VARIABLE, PROFILES, variables

from .helpers import ROOT, cli

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    result = cli(flag)
    assert result.code == 0
    assert result.out.strip() == f"saml-gateway {metadata.version('saml-oauth-gateway')}"


def test_every_example_is_a_profile() -> None:
    assert sorted(PROFILES) == sorted(p.stem for p in EXAMPLES.glob("*.yaml"))


def _values(tmp_path: Path, idp: DemoIdP) -> dict[str, str]:
    key = tmp_path / "client-key.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {"PF_CLIENT_KEY_FILE": str(key), CERTIFICATE_VARIABLE: "idp-signing.pem"}


@pytest.mark.parametrize(
    "profile",
    PROFILES,
)
def test_init_writes_a_starter_that_passes_check_config(
    profile: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    idp = DemoIdP.generate("https://idp.example.com/saml")
    idp.write_certificate(tmp_path / "idp-signing.pem")  # beside the config, as documented
    target = tmp_path / "gateway.yaml"
    written = cli("init", "--profile", profile, "-o", str(target))
    assert written.code == 0, written.err
    text = target.read_text()
    assert text.startswith(f"# Starter configuration for {profile}")
    assert "certs/idp-signing.pem" not in text  # never the example's placeholder key
    names = variables(text)
    assert CERTIFICATE_VARIABLE in names
    assert all(name in written.out for name in names)
    # before the variables are set, check-config names what is missing
    for name in list(os.environ):
        if name in names:
            monkeypatch.delenv(name)
    missing = cli("check-config", "-c", str(target))
    assert missing.code == 2
    assert f"environment variable '{CERTIFICATE_VARIABLE}' is not set" in missing.err
    # once set, it passes
    values = _values(tmp_path, idp)
    for name in names:
        monkeypatch.setenv(name, values.get(name, f"value-of-{name.lower()}"))
    checked = cli("check-config", "-c", str(target))
    assert checked.code == 0, checked.err
    assert "OK" in checked.out


def test_init_refuses_to_overwrite_and_prints_to_stdout(tmp_path: Path) -> None:
    target = tmp_path / "gateway.yaml"
    target.write_text("mine\n")
    refused = cli("init", "--profile", "okta", "-o", str(target))
    assert refused.code == 2 and "exists" in refused.err
    assert target.read_text() == "mine\n"
    assert cli("init", "--profile", "okta", "-o", str(target), "--force").code == 0
    assert target.read_text().startswith("# Starter configuration for okta")
    printed = cli("init", "--profile", "wso2")
    assert printed.code == 0 and "authorization_servers:" in printed.out
    assert cli("init", "--profile", "nope").code == 2


def test_readme_install_steps_pass_check_config_as_written() -> None:
    """The install block's exports are all check-config needs: nothing else from the
    environment (a newcomer's shell has none of our variables)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install and run", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    exports = dict(
        line.split(None, 1)[1].split("#", 1)[0].strip().split("=", 1)
        for line in block.splitlines()
        if line.startswith("export ")
    )
    check = next(line for line in block.splitlines() if "check-config" in line)
    argv = check.split("#", 1)[0].split()
    assert argv[0] == ".venv/bin/saml-gateway"
    environment = {"PATH": os.environ["PATH"], **exports}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *argv[1:]],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout
    without = subprocess.run(
        [sys.executable, "-m", "gateway", *argv[1:]],
        env={"PATH": os.environ["PATH"]},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert without.returncode == 2  # the export is what makes it pass
    assert "GATEWAY_CLIENT_SECRET" in without.stderr


def test_allow_missing_env_warns_about_unset_variables_and_checks_the_rest(
    tmp_path: Path,
) -> None:
    target = tmp_path / "gateway.yaml"
    assert cli("init", "--profile", "pingfederate", "-o", str(target)).code == 0
    names = variables(target.read_text())
    environment = {k: v for k, v in os.environ.items() if k not in names}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--allow-missing-env", "-c", str(target)],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for name in names:
        assert f"warning: environment variable '{name}' is not set" in done.stderr
    assert f"OK apart from {len(names)} unset variable(s)" in done.stdout
    # everything else is still checked: a real mistake is an error
    target.write_text(target.read_text().replace("token_url: https://", "token_url: htp://", 1))
    broken = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--allow-missing-env", "-c", str(target)],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert broken.returncode == 2
    assert "token_url" in broken.stderr and "not a URL" in broken.stderr
