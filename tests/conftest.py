"""Shared pytest set-up: the real-service fixtures from ``tests/infra`` and their automatic markers."""

from __future__ import annotations

import pytest
from infra.fixtures import (  # noqa: F401 (fixtures are found by name)
    busybox_image,
    docker_config,
    dockerd,
    mark_by_fixtures,
    registry,
    registry_basic,
    registry_token,
    repository_name,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_by_fixtures(items)
from fixture_images import fixture_image  # noqa: E402,F401  (session-cached fixture images)
