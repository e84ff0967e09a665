"""The pytest fixtures over the real registry, token issuer and Docker engine, and their markers.

Session-scoped services are started once, on first use, and stopped at the end of the run. Tests
share them, so each test should push to its own repository (the ``repository_name`` fixture).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from .docker_config import DockerConfig, write_docker_config
from .dockerd import DockerdStartError, DockerEngine, start_dockerd
from .images import build_oci_image, busybox_rootfs
from .registry import Registry, RegistryStartError, start_registry

REGISTRY_FIXTURES = frozenset({"registry", "registry_basic", "registry_token", "docker_config"})
DOCKER_FIXTURES = frozenset({"dockerd"})
# Set to 1 (e.g. in CI) to fail instead of skip when the engine cannot start.
REQUIRE_DOCKER_ENV = "SCONIFY_TEST_REQUIRE_DOCKER"


def mark_by_fixtures(items: list[pytest.Item]) -> None:
    """Mark tests that use a registry fixture ``registry`` and those that use ``dockerd`` ``docker``."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & REGISTRY_FIXTURES:
            item.add_marker(pytest.mark.registry)
        if names & DOCKER_FIXTURES:
            item.add_marker(pytest.mark.docker)


def _registry(tmp_path_factory: pytest.TempPathFactory, auth: str) -> Iterator[Registry]:
    try:
        reg = start_registry(tmp_path_factory.mktemp(f"registry-{auth}"), auth=auth)
    except RegistryStartError as err:
        if "is missing" in str(err):
            pytest.skip(str(err))
        pytest.fail(str(err), pytrace=False)
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous plain-HTTP registry on 127.0.0.1 with deletes enabled."""
    yield from _registry(tmp_path_factory, "none")


@pytest.fixture(scope="session")
def registry_basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry with htpasswd basic auth; ``.username``/``.password`` may push and pull."""
    yield from _registry(tmp_path_factory, "basic")


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry with bearer-token auth; ``.issuer`` is its token issuer, ``.username``/``.password``
    its account with every right."""
    yield from _registry(tmp_path_factory, "token")


@pytest.fixture
def docker_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry_basic: Registry, registry_token: Registry
) -> DockerConfig:
    """A docker config.json with credentials for ``registry_basic`` and ``registry_token``.

    ``DOCKER_CONFIG`` is set to its directory for the test, so the machine's ~/.docker never leaks in.
    """
    config = write_docker_config(
        tmp_path / "docker-config",
        {
            registry_basic.host: (registry_basic.username or "", registry_basic.password or ""),
            registry_token.host: (registry_token.username or "", registry_token.password or ""),
        },
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(config.dir))
    return config


@pytest.fixture(scope="session")
def dockerd() -> Iterator[DockerEngine]:
    """A private Docker engine (vfs, no network); the test is skipped if it cannot start here."""
    try:
        engine = start_dockerd()
    except DockerdStartError as err:
        if os.environ.get(REQUIRE_DOCKER_ENV) == "1":
            pytest.fail(str(err), pytrace=False)
        pytest.skip(f"no test Docker engine: {err}")
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A runnable OCI image (static busybox, CMD ``echo hello from busybox``) as ``oci:DIR:busybox``."""
    base = tmp_path_factory.mktemp("busybox-image")
    rootfs = busybox_rootfs(base / "rootfs", {"/etc/motd": b"sconify test image\n"})
    return build_oci_image(base / "layout", "busybox", rootfs, cmd=["echo", "hello from busybox"],
                           env=["PATH=/bin"])


@pytest.fixture
def repository_name(request: pytest.FixtureRequest) -> str:
    """A repository name unique to this test, for pushing into the shared registries."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40] or "test"
    return f"test/{stem}-{secrets.token_hex(3)}"
