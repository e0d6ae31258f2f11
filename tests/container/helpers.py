"""The image, built for real with podman from the repository's Dockerfile.

No registry image can be pulled where the tests run, so the base is made offline: debootstrap
(Debian bookworm, minbase, with python3, venv and pip; ``python`` on the path; pip allowed)
carrying this machine's CA bundle, so that pip inside the build trusts what this machine
trusts. It is imported into podman under the base name the Dockerfile pins. The base's tar
and podman's storage are kept under ``.cache/container`` in the project: a second run
reuses both (and podman's layer cache), so only a changed layer is rebuilt.

Podman runs as root with the vfs storage driver, the runc runtime, host networking and
explicit ulimits: what works on the machines this project runs on (crun refuses their
hybrid cgroups; the default ulimits exceed their hard limits). Its storage is the test's
own, so the images of whoever runs the tests are never touched.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "container"
IMAGE = "localhost/saml-gateway:test"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
# The bundle Debian's ca-certificates package builds; pip in the build trusts only this one.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# What the official python images set, and the Dockerfile's ENV PATH extends.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")


def pinned_base() -> str:
    """The Dockerfile's ``ARG BASE_IMAGE=...`` default."""
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    if match is None:
        raise AssertionError("the Dockerfile pins no BASE_IMAGE")
    return match.group(1)


class Podman:
    """``podman`` on the test's own storage, with the flags this kind of machine needs."""

    def __init__(self, storage: Path, runroot: Path) -> None:
        self.global_args = [
            "--root",
            str(storage),
            "--runroot",
            str(runroot),
            "--storage-driver",
            "vfs",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]

    def command(self, *args: str) -> list[str]:
        return ["podman", *self.global_args, *args]

    def __call__(
        self,
        *args: str,
        timeout: float = 120,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **(env or {})},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args[:2])} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result


def _unavailable(why: str) -> None:
    """Skip where podman cannot run; in CI, where it must, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"the container test must run in CI: {why}")
    pytest.skip(why)


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _base_key() -> str:
    """Changes with the recipe (this module's base-building code) and the CA bundle."""
    recipe = f"{BASE_PACKAGES} {BASE_PATH} {inspect.getsource(build_base_tar)}".encode()
    bundle = CA_BUNDLE.read_bytes() if CA_BUNDLE.is_file() else b""
    return hashlib.sha256(recipe + bundle).hexdigest()[:16]


def build_base_tar(debootstrap: str, target: Path) -> None:
    """debootstrap the base into a tar; written to a temporary name first, so an interrupted
    run leaves nothing that looks finished."""
    rootfs = CACHE / "rootfs.partial"
    shutil.rmtree(rootfs, ignore_errors=True)
    # dpkg inside debootstrap syncs every file it writes: minutes on a virtual disk, and
    # pointless for a folder that is thrown away if the run is cut short.
    unsafe_io = rootfs / "etc" / "dpkg" / "dpkg.cfg.d" / "unsafe-io"
    unsafe_io.parent.mkdir(parents=True)
    unsafe_io.write_text("force-unsafe-io\n")
    result = subprocess.run(
        [
            debootstrap,
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            SUITE,
            str(rootfs),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"debootstrap failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    unsafe_io.unlink()
    # pip allowed, as in the official python images (PEP 668's marker would refuse it).
    for marker in (rootfs / "usr" / "lib").glob("python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    if CA_BUNDLE.is_file():
        shutil.copyfile(CA_BUNDLE, rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    # What slim images leave out: downloaded packages, index lists, manuals, translations
    # (each container start on vfs copies the whole image, so its size is the test's time).
    for folder in ("var/cache/apt", "var/lib/apt/lists", "usr/share/man", "usr/share/locale"):
        for entry in (rootfs / folder).rglob("*"):
            if (entry.is_file() or entry.is_symlink()) and entry.name != "lock":
                entry.unlink()
    partial = target.with_suffix(".partial")
    subprocess.run(
        ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
        check=True,
        timeout=600,
    )
    partial.rename(target)
    shutil.rmtree(rootfs)


def _context_digest(base_key: str) -> str:
    """The build's inputs: the Dockerfile, what .dockerignore lets into the context, the base."""
    digest = hashlib.sha256(base_key.encode())
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    included = sorted(line[1:].rstrip("/") for line in ignore if line.startswith("!"))
    for name in ["Dockerfile", ".dockerignore", *included]:
        path = ROOT / name
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def _drop_other_builds(podman: Podman, keep: str) -> None:
    """Earlier builds: vfs keeps a full copy of each, so do not let them pile up."""
    listing = podman("images", "--format", "{{.Repository}}:{{.Tag}}", check=False).stdout
    for name in listing.split():
        if name.startswith("localhost/saml-gateway:context-") and name != keep:
            podman("rmi", "--force", name, check=False)
    podman("image", "prune", "--force", check=False, timeout=300)


def _stale_caches(keep: Path) -> None:
    for old in CACHE.glob("base-*.tar"):
        if old != keep:
            old.unlink()


@pytest.fixture(scope="session")
def podman() -> Podman:
    if os.geteuid() != 0:
        _unavailable("needs root (debootstrap, and podman with runc and vfs storage)")
    for tool in ("podman", "runc", "debootstrap"):
        if _tool(tool) is None:
            _unavailable(f"{tool} is not installed (make system-deps installs it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    # podman wants its run state on a folder cleared at boot; one per project checkout.
    runroot = Path(tempfile.gettempdir()) / f"saml-gateway-podman-{_digest(str(CACHE))}"
    runner = Podman(CACHE / "storage", runroot)
    info = runner("info", check=False, timeout=60)
    if "database configuration mismatch" in info.stderr:  # the checkout moved: start afresh
        shutil.rmtree(CACHE / "storage")
        info = runner("info", check=False, timeout=60)
    if info.returncode != 0:
        _unavailable(f"podman cannot run here: {info.stderr.strip()[-500:]}")
    return runner


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@pytest.fixture(scope="session")
def image(podman: Podman) -> Iterator[str]:
    """The image built from the Dockerfile on the offline base; yields its name."""
    # One builder at a time per checkout (two test runs would debootstrap into one folder).
    with (CACHE / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build_image(podman)
    yield IMAGE


def _build_image(podman: Podman) -> None:
    started = time.monotonic()
    key = _base_key()
    base_tag = f"localhost/saml-gateway-base:{key}"
    if podman("image", "exists", base_tag, check=False).returncode != 0:
        tar = CACHE / f"base-{key}.tar"
        if not tar.exists():
            build_base_tar(_tool("debootstrap") or "debootstrap", tar)
            _stale_caches(keep=tar)
        podman(
            "import",
            "--change",
            f"ENV PATH={BASE_PATH}",
            "--change",
            'CMD ["python3"]',
            str(tar),
            base_tag,
            timeout=600,
        )
    base = pinned_base()
    podman("tag", base_tag, base)
    # The same context on the same base was built before: that image is this build's result.
    built = f"localhost/saml-gateway:context-{_context_digest(key)}"
    if podman("image", "exists", built, check=False).returncode != 0:
        podman(
            "build",
            "--format",
            "docker",  # OCI images cannot carry a HEALTHCHECK
            "--pull=never",
            "--layers=false",  # on vfs each layer is a full copy of the image: one commit only
            "--network",
            "host",
            *ULIMITS,
            "--build-arg",
            f"BASE_IMAGE={base}",
            "--tag",
            built,
            str(ROOT),
            timeout=900,
        )
        _drop_other_builds(podman, keep=built)
    podman("tag", built, IMAGE)
    print(f"\nimage ready in {time.monotonic() - started:.0f} s")  # shown with -s, for the report
