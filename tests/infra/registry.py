"""A real distribution v2 registry (Debian's ``docker-registry``) on 127.0.0.1, for tests.

Three flavours: anonymous, htpasswd basic auth, and bearer tokens from ``infra.token_issuer``. Storage
is a temp dir, deletes are enabled, the log goes to a file whose tail is shown if the start fails.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from requests.auth import AuthBase

from .procs import clean_env, die_with_parent, free_port, log_tail, stop_process, wait_until
from .token_issuer import TokenIssuer, User

REGISTRY_BIN = "docker-registry"
START_TIMEOUT = 10.0
START_ATTEMPTS = 3  # a free port can be taken between our probe and the registry's bind


class RegistryStartError(RuntimeError):
    """The registry did not answer in time; the message carries the tail of its log."""


@dataclass
class Registry:
    """A running registry: ``host`` is ``127.0.0.1:PORT``, ``url`` is ``http://host``.

    ``username``/``password`` are set for the auth flavours; ``issuer`` for the token flavour.
    """

    host: str
    workdir: Path
    log_path: Path
    auth: str = "none"  # "none", "basic" or "token"
    username: str | None = None
    password: str | None = None
    issuer: TokenIssuer | None = None
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage(self) -> Path:
        """The registry's storage root (blobs and repositories as files)."""
        return self.workdir / "storage"

    def ref(self, repository: str, tag: str = "latest") -> str:
        """A skopeo-style ``docker://`` reference to ``repository:tag`` in this registry."""
        return f"docker://{self.host}/{repository}:{tag}"

    def creds(self) -> str | None:
        """``user:password`` for skopeo's ``--creds`` options, or None for the anonymous flavour."""
        return f"{self.username}:{self.password}" if self.username else None

    def session(self, username: str | None = None, password: str | None = None) -> requests.Session:
        """A requests session that answers this registry's auth challenges with the given (or the
        registry's own) credentials."""
        sess = requests.Session()
        user = username if username is not None else self.username
        pw = password if password is not None else self.password
        if user is not None and pw is not None:
            sess.auth = ChallengeAuth(user, pw)
        return sess

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET ``path`` (e.g. ``/v2/_catalog``) with the registry's credentials."""
        with self.session() as sess:
            return sess.get(self.url + path, timeout=10, **kwargs)

    def repositories(self) -> list[str]:
        """The repositories in the catalog."""
        resp = self.get("/v2/_catalog", params={"n": 1000})
        resp.raise_for_status()
        return resp.json().get("repositories") or []

    def tags(self, repository: str) -> list[str]:
        """The tags of ``repository``, empty if it does not exist."""
        resp = self.get(f"/v2/{repository}/tags/list")
        if resp.status_code == 404:
            return []
        resp.raise_for_status()
        return resp.json().get("tags") or []

    def manifest(self, repository: str, reference: str) -> requests.Response:
        """The manifest response for ``repository:reference`` (raw bytes in ``.content``)."""
        accept = ", ".join(
            [
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.distribution.manifest.list.v2+json",
            ]
        )
        return self.get(f"/v2/{repository}/manifests/{reference}", headers={"Accept": accept})

    def alive(self) -> bool:
        """True while the registry process runs and answers ``/v2/``."""
        if self._proc is None or self._proc.poll() is not None:
            return False
        return _answers(self.url)

    def log(self, lines: int = 30) -> str:
        """The tail of the registry's log."""
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """Stop the registry (and its token issuer); idempotent."""
        if self._proc is not None:
            stop_process(self._proc, grace=5)
            self._proc = None
        if self.issuer is not None:
            self.issuer.stop()


class ChallengeAuth(AuthBase):
    """Answers a registry's 401 challenge: basic credentials, or a bearer token fetched from the
    challenge's realm with those credentials (once per scope, then cached)."""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password
        self._tokens: dict[tuple[str, str], str] = {}

    def __call__(self, req: requests.PreparedRequest) -> requests.PreparedRequest:
        req.register_hook("response", self._on_response)
        return req

    def _on_response(self, resp: requests.Response, **kwargs: Any) -> requests.Response:
        if resp.status_code != 401 or getattr(resp.request, "_challenge_answered", False):
            return resp
        scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        retry = resp.request.copy()
        retry._challenge_answered = True  # type: ignore[attr-defined]
        if scheme == "basic":
            requests.auth.HTTPBasicAuth(self.username, self.password)(retry)
        elif scheme == "bearer":
            key = (params.get("realm", ""), params.get("scope", ""))
            if key not in self._tokens:
                query = {"service": params.get("service", "")}
                if params.get("scope"):
                    query["scope"] = params["scope"]
                token_resp = requests.get(key[0], params=query, auth=(self.username, self.password), timeout=10)
                if token_resp.status_code != 200:
                    return resp
                body = token_resp.json()
                self._tokens[key] = body.get("token") or body["access_token"]
            retry.headers["Authorization"] = f"Bearer {self._tokens[key]}"
        else:
            return resp
        resp.content  # noqa: B018 (drain the body so the connection can be reused)
        resp.close()
        new = resp.connection.send(retry, **kwargs)
        new.history.append(resp)
        new.request = retry
        return new


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """(scheme in lower case, parameters) of a ``WWW-Authenticate`` header."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


def _answers(url: str) -> bool:
    try:
        resp = requests.get(url + "/v2/", timeout=1)
    except requests.RequestException:
        return False
    return resp.status_code in (200, 401)


def _config(port: int, storage: Path, auth: dict | None) -> dict:
    config: dict = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            # Background upload purging only adds noise and disk scans to a short-lived test registry.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if auth:
        config["auth"] = auth
    return config


def htpasswd_entry(username: str, password: str) -> str:
    """A bcrypt htpasswd line made by ``htpasswd -Bbn`` (apache2-utils); the registry accepts only bcrypt."""
    exe = shutil.which("htpasswd")
    if exe is None:
        raise RegistryStartError("htpasswd is missing; install apache2-utils (scripts/test does).")
    out = subprocess.run([exe, "-Bbn", username, password], check=True, capture_output=True, text=True)
    return out.stdout.strip() + "\n"


def start_registry(
    workdir: Path,
    auth: str = "none",
    username: str = "sconify",
    password: str | None = None,
    users: dict[str, User] | None = None,
    overrides: dict | None = None,
) -> Registry:
    """Start a registry with storage and log under ``workdir`` and wait until it answers.

    ``auth`` is "none", "basic" (htpasswd with ``username``/``password``) or "token" (a token issuer
    that knows ``username``/``password`` plus any extra ``users``). ``overrides`` replaces top-level
    sections of the registry's config (e.g. ``{"notifications": {...}}``).
    """
    if shutil.which(REGISTRY_BIN) is None:
        raise RegistryStartError("docker-registry is missing; install the Debian package docker-registry.")
    workdir.mkdir(parents=True, exist_ok=True)
    password = password or secrets.token_urlsafe(12)
    issuer = None
    auth_config: dict | None = None
    if auth == "basic":
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(htpasswd_entry(username, password))
        auth_config = {"htpasswd": {"realm": "sconify-test", "path": str(htpasswd)}}
    elif auth == "token":
        all_users = {username: User(password), **(users or {})}
        issuer = TokenIssuer(service="sconify-test-registry", issuer="sconify-test-issuer", users=all_users,
                             workdir=workdir).start()
        auth_config = {
            "token": {
                "realm": issuer.realm,
                "service": issuer.service,
                "issuer": issuer.issuer,
                "rootcertbundle": str(issuer.certificate_path),
            }
        }
    elif auth != "none":
        raise ValueError(f"unknown registry auth {auth!r}")

    log_path = workdir / "registry.log"
    env = clean_env(("REGISTRY_",))  # the registry reads REGISTRY_* as config overrides
    last_log = ""
    for _ in range(START_ATTEMPTS):
        port = free_port()
        config_path = workdir / "config.yml"
        # JSON is YAML, so the config needs no YAML writer.
        config = {**_config(port, workdir / "storage", auth_config), **(overrides or {})}
        config_path.write_text(json.dumps(config, indent=2))
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                preexec_fn=die_with_parent,
            )
        registry = Registry(
            host=f"127.0.0.1:{port}", workdir=workdir, log_path=log_path, auth=auth,
            username=username if auth != "none" else None, password=password if auth != "none" else None,
            issuer=issuer, _proc=proc,
        )
        if wait_until(functools.partial(_answers, registry.url), START_TIMEOUT, proc):
            return registry
        stop_process(proc, grace=2)
        last_log = log_tail(log_path)
        if "address already in use" not in last_log:
            break
    if issuer is not None:
        issuer.stop()
    raise RegistryStartError(f"docker-registry did not answer within {START_TIMEOUT:.0f} s; log tail:\n{last_log}")
