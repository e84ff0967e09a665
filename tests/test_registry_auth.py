"""Registry auth: credentials from options, docker config files and credential helpers; Basic and Bearer
challenges answered against real registries and a token issuer; refusals as one-line errors."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from infra.docker_config import DockerConfig
from infra.images import skopeo
from infra.registry import Registry, start_registry
from infra.token_issuer import User

from sconify.errors import AuthError, DestinationError, UsageError
from sconify.image.copy import write_image
from sconify.image.reference import parse_reference
from sconify.image.transports import TransportOptions, open_image
from sconify.image.transports.registry import RegistryClient, RegistryDestination
from sconify.image.transports.registry_auth import find_credentials, parse_challenges

pytestmark = pytest.mark.registry


def sconify(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sconify", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def one_line(run: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed run (and proof there is no traceback)."""
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    return run.stderr


def push(source: str, ref: str, options: TransportOptions) -> RegistryDestination:
    dest = RegistryDestination(parse_reference(ref), options)
    write_image(open_image(parse_reference(source)), dest)
    return dest


def env_without_docker_config(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_CONFIG"}
    env["HOME"] = extra.pop("HOME", "/nonexistent-home")  # never the machine's ~/.docker
    env.update(extra)
    return env


# -- parsing ------------------------------------------------------------------------------------------------


def test_challenges_are_parsed_with_quotes_commas_and_several_schemes() -> None:
    header = ('Bearer realm="https://auth.example/token",service="registry.example",'
              'scope="repository:a/b:pull,push", Basic realm="say \\"hi\\""')
    bearer, basic = parse_challenges(header)
    assert bearer.scheme == "bearer"
    assert dict(bearer.params) == {"realm": "https://auth.example/token", "service": "registry.example",
                                   "scope": "repository:a/b:pull,push"}
    assert basic.scheme == "basic" and basic.params["realm"] == 'say "hi"'
    assert parse_challenges('Basic realm=plain') == parse_challenges('basic realm="plain"')
    assert parse_challenges(None) == []


def test_credentials_come_from_options_then_the_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              ) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {
        "https://reg.example:5000/v1/": {"auth": base64.b64encode(b"alice:s3cret:with:colons").decode()},
        "other.example": {"username": "bob", "password": "pw"},
        "tok.example": {"auth": base64.b64encode(b"carol:").decode(), "identitytoken": "refresh-me"},
        "localhost:5001": {"auth": base64.b64encode(b"dave:pw").decode()},
    }}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    found = find_credentials("reg.example:5000")
    assert found is not None and (found.username, found.password) == ("alice", "s3cret:with:colons")
    assert str(config) in found.origin
    other = find_credentials("other.example")
    assert other is not None and (other.username, other.password) == ("bob", "pw")
    tok = find_credentials("tok.example")
    assert tok is not None and tok.identity_token == "refresh-me"
    alias = find_credentials("127.0.0.1:5001")  # localhost and 127.0.0.1 are one registry
    assert alias is not None and alias.username == "dave"
    assert find_credentials("unknown.example") is None
    given = find_credentials("reg.example:5000", creds="eve:pw2")
    assert given is not None and (given.username, given.password, given.origin) == ("eve", "pw2", "--creds")
    with pytest.raises(UsageError, match="USER:PASSWORD"):
        find_credentials("reg.example:5000", creds="eve")
    with pytest.raises(Exception, match="does not exist"):
        find_credentials("reg.example:5000", authfile=str(tmp_path / "missing.json"))


# -- basic auth -----------------------------------------------------------------------------------------------


def test_basic_auth_with_credentials_from_options(
    registry_basic: Registry, busybox_image: str, repository_name: str
) -> None:
    ref = registry_basic.ref(repository_name, "v1")
    push(busybox_image, ref, TransportOptions(creds=registry_basic.creds()))
    image = open_image(parse_reference(ref), options=TransportOptions(creds=registry_basic.creds()))
    assert image.digest == open_image(parse_reference(busybox_image)).digest


def test_basic_auth_with_credentials_from_a_docker_config(
    registry_basic: Registry, busybox_image: str, docker_config: DockerConfig, repository_name: str,
    tmp_path: Path,
) -> None:
    ref = registry_basic.ref(repository_name, "v1")
    push(busybox_image, ref, TransportOptions())  # DOCKER_CONFIG points at the fixture's config.json
    assert open_image(parse_reference(ref)).digest == open_image(parse_reference(busybox_image)).digest
    # The same through the command line, once by $DOCKER_CONFIG and once by --authfile.
    run = sconify("inspect", "--json", ref, env=env_without_docker_config(DOCKER_CONFIG=str(docker_config.dir)))
    assert run.returncode == 0, run.stderr
    run = sconify("copy", "--src-authfile", str(docker_config.path), ref, f"oci:{tmp_path / 'out'}:v1",
                  env=env_without_docker_config())
    assert run.returncode == 0, run.stderr


def test_basic_auth_refusals_are_one_line_exit_5(
    registry_basic: Registry, busybox_image: str, repository_name: str, tmp_path: Path
) -> None:
    ref = registry_basic.ref(repository_name, "v1")
    wrong = sconify("copy", "--dest-creds", f"{registry_basic.username}:wrong", busybox_image, ref,
                    env=env_without_docker_config())
    assert wrong.returncode == AuthError.exit_code
    line = one_line(wrong)
    assert registry_basic.host in line and "refused" in line and "--creds" in line and "docker login" in line
    assert "wrong" not in line  # the password is never printed
    missing = sconify("inspect", ref, env=env_without_docker_config())
    assert missing.returncode == AuthError.exit_code
    assert "requires credentials" in one_line(missing)


# -- bearer tokens --------------------------------------------------------------------------------------------


def test_token_auth_push_and_pull_ask_for_the_right_scopes(
    registry_token: Registry, busybox_image: str, repository_name: str
) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    options = TransportOptions(creds=registry_token.creds())
    ref = registry_token.ref(repository_name, "v1")
    before = len(issuer.requests)
    dest = push(busybox_image, ref, options)
    pushes = issuer.requests[before:]
    assert pushes and all(r.status == 200 and r.account == registry_token.username for r in pushes)
    assert {(s.name, s.actions) for r in pushes for s in r.requested} == {(repository_name, ("pull", "push"))}
    assert dest.client.auth.token_requests == len(pushes) == 1  # one token, cached for every request

    before = len(issuer.requests)
    image = open_image(parse_reference(ref), options=options)
    for layer in image.layers:
        with layer.open_blob() as blob:
            while blob.read(1 << 20):
                pass
    pulls = issuer.requests[before:]
    assert len(pulls) == 1 and [(s.name, s.actions) for s in pulls[0].requested] == [(repository_name, ("pull",))]


def test_a_cross_repository_mount_asks_for_pull_on_the_source_repository(
    registry_token: Registry, busybox_image: str, repository_name: str
) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    options = TransportOptions(creds=registry_token.creds())
    first = registry_token.ref(repository_name + "-a", "v1")
    push(busybox_image, first, options)
    before = len(issuer.requests)
    dest = RegistryDestination(parse_reference(registry_token.ref(repository_name + "-b", "v1")), options)
    result = write_image(open_image(parse_reference(first), options=options), dest)
    assert {c.action for c in result.layers} == {"mounted"}
    asked = {frozenset((s.name, s.actions) for s in r.requested) for r in issuer.requests[before:]}
    assert frozenset({(repository_name + "-b", ("pull", "push")), (repository_name + "-a", ("pull",))}) in asked


def test_an_expired_token_is_renewed(registry_token: Registry, busybox_image: str, repository_name: str) -> None:
    options = TransportOptions(creds=registry_token.creds())
    ref = registry_token.ref(repository_name, "v1")
    push(busybox_image, ref, options)
    client = RegistryClient(registry_token.host, repository_name, options)
    client.request("GET", client.url("/tags/list")).close()
    assert client.auth.token_requests == 1
    client.request("GET", client.url("/tags/list")).close()
    assert client.auth.token_requests == 1  # cached
    for token in client.auth._tokens.values():
        token.expires = 0.0  # as if its lifetime had passed
    resp = client.request("GET", client.url("/tags/list"))
    assert resp.status_code == 200 and resp.json()["tags"] == ["v1"]
    assert client.auth.token_requests == 2


def test_token_auth_wrong_password_and_anonymous_are_exit_5(
    registry_token: Registry, busybox_image: str, repository_name: str
) -> None:
    ref = registry_token.ref(repository_name, "v1")
    wrong = sconify("copy", "--dest-creds", f"{registry_token.username}:nope", busybox_image, ref,
                    env=env_without_docker_config())
    assert wrong.returncode == AuthError.exit_code
    assert "refused the credentials" in one_line(wrong) and registry_token.host in wrong.stderr
    anonymous = sconify("copy", busybox_image, ref, env=env_without_docker_config())
    assert anonymous.returncode == AuthError.exit_code
    assert "requires credentials" in one_line(anonymous)


@pytest.fixture(scope="module")
def registry_readonly(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A token registry with an extra user who may only pull."""
    reg = start_registry(tmp_path_factory.mktemp("registry-readonly"), auth="token",
                         users={"reader": User("reader-pw", frozenset({"pull"}))})
    try:
        yield reg
    finally:
        reg.stop()


def test_a_push_without_push_rights_is_a_destination_error(
    registry_readonly: Registry, busybox_image: str, repository_name: str
) -> None:
    ref = registry_readonly.ref(repository_name, "v1")
    with pytest.raises(DestinationError, match="denied user 'reader' push access"):
        push(busybox_image, ref, TransportOptions(creds="reader:reader-pw"))
    run = sconify("copy", "--dest-creds", "reader:reader-pw", busybox_image, ref, env=env_without_docker_config())
    assert run.returncode == DestinationError.exit_code
    assert "push access" in one_line(run)
    # The owner pushes; the reader may pull.
    push(busybox_image, ref, TransportOptions(creds=registry_readonly.creds()))
    assert open_image(parse_reference(ref), options=TransportOptions(creds="reader:reader-pw")).layers


# -- credential helpers ---------------------------------------------------------------------------------------


def test_a_credential_helper_supplies_the_credentials(
    registry_basic: Registry, busybox_image: str, repository_name: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "asked"
    helper = bin_dir / "docker-credential-sconifytest"
    answer = json.dumps({"ServerURL": registry_basic.host, "Username": registry_basic.username,
                         "Secret": registry_basic.password})
    # A real helper program speaking docker's credential-helper protocol: "get" reads a server on stdin.
    helper.write_text(f"#!/bin/sh\n[ \"$1\" = get ] || exit 1\ncat >> {asked}\necho >> {asked}\n"
                      f"echo '{answer}'\n")
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps({"credHelpers": {registry_basic.host: "sconifytest"}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    ref = registry_basic.ref(repository_name, "v1")
    push(busybox_image, ref, TransportOptions())
    assert asked.read_text().split() == [registry_basic.host]  # asked once, for this registry
    out = skopeo("inspect", "--tls-verify=false", "--creds", registry_basic.creds() or "", ref)
    assert json.loads(out.stdout)["Digest"] == open_image(parse_reference(busybox_image)).digest


# -- identity (refresh) tokens --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_oauth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, str]]:
    """A token registry whose issuer also takes OAuth2 refresh tokens (POST grant_type=refresh_token), as
    Docker Hub does for the ``identitytoken`` that docker login stores."""
    from urllib.parse import parse_qs

    from infra.token_issuer import Scope

    reg = start_registry(tmp_path_factory.mktemp("registry-oauth"), auth="token")
    issuer = reg.issuer
    assert issuer is not None and issuer._server is not None
    refresh = "refresh-" + os.urandom(8).hex()
    base = issuer._server.RequestHandlerClass

    class OAuthHandler(base):  # type: ignore[misc, valid-type]
        def do_POST(self) -> None:  # noqa: N802
            form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
            if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [refresh]:
                self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad refresh token"}]})
                return
            scopes = [Scope.parse(s) for s in form.get("scope", [""])[0].split(" ") if s]
            token, _ = issuer.issue(reg.username, scopes)
            self._reply(200, {"access_token": token, "expires_in": 300})

    issuer._server.RequestHandlerClass = OAuthHandler
    try:
        yield reg, refresh
    finally:
        reg.stop()


def test_an_identity_token_from_the_docker_config_is_used_as_a_refresh_token(
    registry_oauth: tuple[Registry, str], busybox_image: str, repository_name: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg, refresh = registry_oauth
    (tmp_path / "config.json").write_text(json.dumps({"auths": {reg.host: {
        "auth": base64.b64encode(f"{reg.username}:".encode()).decode(), "identitytoken": refresh}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    ref = reg.ref(repository_name, "v1")
    push(busybox_image, ref, TransportOptions())
    assert open_image(parse_reference(ref)).digest == open_image(parse_reference(busybox_image)).digest
    # A stale refresh token is refused as credentials, with the way out.
    (tmp_path / "config.json").write_text(json.dumps({"auths": {reg.host: {"identitytoken": "stale"}}}))
    with pytest.raises(AuthError, match="refused the credentials of the identity token.*docker login"):
        open_image(parse_reference(ref))
