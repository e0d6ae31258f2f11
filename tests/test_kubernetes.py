"""The Kubernetes manifests in config/kubernetes/: every object is valid against a current
Kubernetes schema (kubernetes-validate, strict: an unknown field is an error), the probes
point at the admin listener's endpoints, the grace period outlasts the drain, and the gateway
config each ConfigMap carries passes the gateway's own preflight once its files exist."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.devkit.idp import DemoIdP
from gateway.preflight import preflight

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "config" / "kubernetes").glob("*.yaml"))
SCHEMA = kubernetes_validate.latest_version()


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def gateway_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    return [c for c in containers if "saml-gateway" in c["image"]]


def test_there_are_a_sidecar_and_a_standalone_deployment() -> None:
    assert {path.name for path in MANIFESTS} >= {"sidecar.yaml", "standalone.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_object_is_valid_kubernetes(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, SCHEMA, strict=True)


def test_strict_validation_refuses_an_unknown_field() -> None:
    # The check above can fail: a misspelt field is an error, not ignored.
    doc = documents(ROOT / "config" / "kubernetes" / "standalone.yaml")[-1]
    doc["spec"]["selectr"] = doc["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, SCHEMA, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_probes_grace_and_scrape_annotations(path: Path) -> None:
    docs = documents(path)
    config = yaml.safe_load(
        next(d for d in docs if d["kind"] == "ConfigMap")["data"]["gateway.yaml"]
    )
    lifecycle = config["lifecycle"]
    admin_port = config["admin"]["port"]
    for doc in (d for d in docs if d["kind"] == "Deployment"):
        pod = doc["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(admin_port)
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        assert grace > lifecycle["shutdown_grace"] + lifecycle["drain_timeout"]
        for container in gateway_containers(doc):
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["admin"] == admin_port
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_carried_gateway_config_passes_preflight(path: Path, tmp_path: Path) -> None:
    text = next(d for d in documents(path) if d["kind"] == "ConfigMap")["data"]["gateway.yaml"]
    config = yaml.safe_load(text)
    # The files the pod mounts, made here: IdP metadata, the secret's keys.
    (tmp_path / "idp").mkdir()
    (tmp_path / "secret").mkdir()
    for idp in config["identity_providers"].values():
        der = DemoIdP.generate(idp["issuer"]).certificate.public_bytes(Encoding.DER)
        (tmp_path / "idp" / "metadata.xml").write_text(
            '<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata"'
            ' xmlns:ds="http://www.w3.org/2000/09/xmldsig#"'
            f' entityID="{idp["issuer"]}"><md:IDPSSODescriptor'
            ' protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">'
            '<md:KeyDescriptor use="signing"><ds:KeyInfo><ds:X509Data><ds:X509Certificate>'
            f"{base64.b64encode(der).decode()}"
            "</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor>"
            "</md:IDPSSODescriptor></md:EntityDescriptor>"
        )
    (tmp_path / "secret" / "client-secret").write_text("not-a-real-secret")
    (tmp_path / "secret" / "redis-password").write_text("not-a-real-password")
    (tmp_path / "secret" / "cache-key").write_text(base64.b64encode(b"k" * 32).decode())
    gateway_yaml = tmp_path / "gateway.yaml"
    gateway_yaml.write_text(text.replace("/etc/saml-gateway/", f"{tmp_path}/"))
    loaded = preflight(gateway_yaml)
    assert loaded.admin.host == "0.0.0.0"
    assert [route.name for route in loaded.routes] == [r["name"] for r in config["routes"]]
