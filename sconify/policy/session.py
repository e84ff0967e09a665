"""CAS sessions (SCONE session language v0.3): built as plain data from a conversion, written as YAML.

The session carries what the untrusted host must not control: the command, the environment, the working
directory, the file-system key and tag, and the measurements allowed to receive them.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sconify.errors import UsageError
from sconify.secretfile import write_secret

SESSION_VERSION = "0.3.10"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

# Relaxations a user may ask for; each becomes an entry of security.attestation.tolerate.
TOLERABLE = (
    "debug-mode",
    "hyperthreading",
    "outdated-tcb",
    "insecure-igpu",
    "software-hardening-needed",
    "insecure-configuration",
)


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise UsageError(f"{what} {value!r} is not a valid session name (letters, digits, '_', '.', '-'; at most 128).")
    return value


@dataclass(frozen=True)
class ServiceSpec:
    """One service of a session: who may run (mrenclaves) and what it gets."""

    name: str
    image_name: str
    mrenclaves: tuple[str, ...]
    command: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    pwd: str
    fspf_path: str | None = None
    fspf_key: str | None = None
    fspf_tag: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "image_name": self.image_name,
            "mrenclaves": list(self.mrenclaves),
            "command": shlex.join(self.command),
            "environment": dict(self.environment),
            "pwd": self.pwd,
        }
        if self.fspf_path:
            out.update(fspf_path=self.fspf_path, fspf_key=self.fspf_key, fspf_tag=self.fspf_tag)
        return out


@dataclass(frozen=True)
class Session:
    """A CAS session: services, images, volumes, secrets, access policy and attestation security."""

    name: str
    services: tuple[ServiceSpec, ...]
    images: tuple[dict[str, Any], ...] = ()
    volumes: tuple[dict[str, Any], ...] = ()
    secrets: tuple[dict[str, Any], ...] = ()
    tolerate: tuple[str, ...] = ()
    ignore_advisories: tuple[str, ...] = ()
    mode: str = "hardware"
    access_policy: Mapping[str, Sequence[str]] = field(
        default_factory=lambda: {"read": ["CREATOR"], "update": ["CREATOR"]}
    )

    def config_id(self, service: str) -> str:
        """The ``SCONE_CONFIG_ID`` that selects a service of this session."""
        return f"{self.name}/{service}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": SESSION_VERSION,
            "access_policy": {k: list(v) for k, v in self.access_policy.items()},
            "services": [s.to_json() for s in self.services],
            "images": [dict(i) for i in self.images],
            "volumes": [dict(v) for v in self.volumes],
            "secrets": [dict(s) for s in self.secrets],
            "security": {
                "attestation": {
                    "mode": self.mode,
                    "tolerate": list(self.tolerate),
                    "ignore_advisories": list(self.ignore_advisories),
                }
            },
        }

    def to_yaml(self) -> str:
        return dump_yaml(self.to_json())


class _Dumper(yaml.SafeDumper):
    """YAML with block style, stable key order as given, and multi-line strings as literal blocks."""


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def dump_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)


def write_session(session: Session, path: Path, force: bool = True) -> None:
    """Write the session YAML with mode 0600: it holds the file-system key."""
    write_secret(path, session.to_yaml().encode(), force=force, what="policy")


def load_session(path: Path) -> dict[str, Any]:
    """Read a session file as plain data, with a clear error for a file that is not one."""
    from sconify.errors import NotFoundError, VerificationFailed

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise NotFoundError(
            f"policy file {str(path)!r} does not exist; give the session.yml that convert wrote."
        ) from None
    except yaml.YAMLError as exc:
        raise VerificationFailed(f"policy file {str(path)!r} is not valid YAML ({exc}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("services"), list):
        raise VerificationFailed(f"policy file {str(path)!r} is not a CAS session (no services list).")
    return data
