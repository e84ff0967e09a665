"""A ``~/.docker/config.json``-style credentials file, as docker login would write it, for tests."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DockerConfig:
    """A docker CLI config directory; ``DOCKER_CONFIG=dir`` makes clients read ``path``."""

    dir: Path
    path: Path
    auths: dict[str, tuple[str, str]]

    @property
    def env(self) -> dict[str, str]:
        """The environment variable that points a docker-style client at this directory."""
        return {"DOCKER_CONFIG": str(self.dir)}


def write_docker_config(directory: Path, auths: dict[str, tuple[str, str]]) -> DockerConfig:
    """Write ``directory/config.json`` with an ``auths`` entry (base64 ``user:password``) per registry host.

    The file is mode 0600, like the one docker login writes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    entries = {
        host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        for host, (user, password) in auths.items()
    }
    path = directory / "config.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"auths": entries}, out, indent=2)
    return DockerConfig(dir=directory, path=path, auths=dict(auths))
