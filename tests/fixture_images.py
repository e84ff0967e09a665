"""The ``fixture_image`` pytest fixture: catalogue images from ``fixtures/``, built once per test session.

Export it from tests/conftest.py (``from fixture_images import fixture_image``) or, in one test module,
``fixture_image = fixture_image_fixture()``. Then ``fixture_image("busybox-sh")`` returns a
``fixtures.BuildResult`` whose ``reference`` is ``oci:DIR:latest``. Images are shared by every test of the
session: read them, never change the layout in place (copy it, or call ``fixtures.build_image`` into your
own ``tmp_path``).
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the fixtures package lives at the top of the repository, beside sconify
    sys.path.insert(0, str(ROOT))

from fixtures import BuildResult, build_image  # noqa: E402


class FixtureImages:
    """Builds catalogue images into one directory on first request and hands out the same result afterwards."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._built: dict[tuple[str, tuple[tuple[str, Any], ...]], BuildResult] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, **params: Any) -> BuildResult:
        key = (name, tuple(sorted(params.items())))
        with self._lock:
            if key not in self._built:
                slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join([name, *(f"{k}={v}" for k, v in key[1])]))
                self._built[key] = build_image(name, self.base / slug, "latest", **params)
            return self._built[key]


_SHARED: list[FixtureImages] = []


def _shared(tmp_path_factory: pytest.TempPathFactory) -> FixtureImages:
    """One builder per test process, so every module asking for an image gets the same build."""
    if not _SHARED:
        _SHARED.append(FixtureImages(tmp_path_factory.mktemp("fixture-images")))
    return _SHARED[0]


@pytest.fixture(scope="session")
def fixture_image(tmp_path_factory: pytest.TempPathFactory) -> FixtureImages:
    """``fixture_image(name, **params)``: a catalogue image built once per session (see fixtures/README.md)."""
    return _shared(tmp_path_factory)


def fixture_image_fixture():  # type: ignore[no-untyped-def]
    """The ``fixture_image`` fixture for one test module: ``fixture_image = fixture_image_fixture()``.

    Modules use this until tests/conftest.py exports ``fixture_image``; builds are shared either way.
    """

    @pytest.fixture(scope="session", name="fixture_image")
    def _fixture_image(tmp_path_factory: pytest.TempPathFactory) -> FixtureImages:
        return _shared(tmp_path_factory)

    return _fixture_image
