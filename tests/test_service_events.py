"""Event parsing, routing, authentication and configuration of the service, as plain functions."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from sconify.errors import UsageError
from sconify.image.reference import parse_reference
from sconify.service import auth
from sconify.service.config import Source, config_from_mapping, load_config
from sconify.service.events import DISTRIBUTION_V1, EventError, parse
from sconify.service.jobs import ServiceJob, make_job, policy_dir_for
from sconify.service.routes import Router

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def _config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "sources": {"reg": {"type": "distribution", "registry": "reg.example:5000",
                            "authorization": "Bearer 0123456789"}},
        "routes": [{"match": "vendor/*", "destination": "docker://reg.example:5000/confidential/*"}],
    }
    data.update(extra)
    return data


# -- parsing -------------------------------------------------------------------------------------------------

def test_distribution_envelope_keeps_manifest_pushes_only() -> None:
    events = [
        {"id": "1", "action": "push", "timestamp": "t1",
         "target": {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "repository": "vendor/a",
                    "digest": DIGEST, "tag": "1.0"}},
        {"id": "2", "action": "pull", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                  "repository": "vendor/a", "digest": DIGEST}},
        {"id": "3", "action": "push", "target": {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                                                  "repository": "vendor/a", "digest": OTHER}},
        {"id": "4", "action": "push", "target": {"mediaType": "application/vnd.oci.image.index.v1+json",
                                                  "repository": "vendor/b", "digest": OTHER}},
        {"id": "5", "action": "delete", "target": {"repository": "vendor/a", "digest": DIGEST}},
    ]
    delivery = parse("distribution", json.dumps({"events": events}).encode(), {"Content-Type": DISTRIBUTION_V1})
    assert [(p.repository, p.digest, p.tag, p.event_id) for p in delivery.pushes] == [
        ("vendor/a", DIGEST, "1.0", "1"), ("vendor/b", OTHER, None, "4")]
    assert delivery.pushes[0].stamp == "t1"
    assert [s.what for s in delivery.skipped] == ["event 2", "event 3", "event 5"]
    assert delivery.invalid == ()


@pytest.mark.parametrize(("target", "words"), [
    ({"repository": "vendor/a"}, "neither a digest nor a tag"),
    ({"repository": "", "digest": DIGEST}, "no repository"),
    ({"repository": "vendor/a", "digest": "md5:abc"}, "malformed digest"),
    ({"repository": "vendor/a", "tag": "-bad"}, "invalid tag"),
    ({"repository": "vendor/../a", "tag": "1"}, "invalid repository"),
    ({"repository": 7, "tag": "1"}, "no repository"),
])
def test_invalid_distribution_events_are_named(target: dict[str, Any], words: str) -> None:
    target = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **target}
    body = json.dumps({"events": [{"action": "push", "target": target}]}).encode()
    delivery = parse("distribution", body, {"Content-Type": DISTRIBUTION_V1})
    assert delivery.pushes == ()
    assert words in delivery.invalid[0].reason


@pytest.mark.parametrize(("kind", "body", "headers", "status"), [
    ("distribution", b"{}", {"Content-Type": "application/json"}, 415),
    ("distribution", b"null", {"Content-Type": DISTRIBUTION_V1}, 400),
    ("distribution", json.dumps({"events": [{}] * 1001}).encode(), {"Content-Type": DISTRIBUTION_V1}, 413),
    ("harbor", b"{}", {"Content-Type": "application/json"}, 400),
    ("harbor", json.dumps({"type": "PUSH_ARTIFACT"}).encode(), {"Content-Type": "application/json"}, 400),
    ("harbor", b"{}", {"Content-Type": DISTRIBUTION_V1}, 415),
    ("github", b"payload=%7B%7D", {"Content-Type": "application/x-www-form-urlencoded",
                                   "X-GitHub-Event": "package"}, 415),
    ("github", b"{}", {"Content-Type": "application/json"}, 400),
    ("dockerhub", b"{}", {"Content-Type": "application/json"}, 400),
    ("dockerhub", b"\"text\"", {"Content-Type": "application/json"}, 400),
])
def test_malformed_bodies_raise_with_a_status(kind: str, body: bytes, headers: dict[str, str], status: int) -> None:
    with pytest.raises(EventError) as err:
        parse(kind, body, headers)
    assert err.value.status == status and err.value.reason.endswith(".")


def test_harbor_v1_push_image_and_namespace_fallback() -> None:
    body = {"type": "pushImage", "occur_at": 5, "event_data": {
        "resources": [{"digest": DIGEST, "tag": "a"}, {"tag": "b"}, {"digest": "nope"}],
        "repository": {"name": "web", "namespace": "proj"}}}
    delivery = parse("harbor", json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert [(p.repository, p.digest, p.tag, p.stamp) for p in delivery.pushes] == [
        ("proj/web", DIGEST, "a", "5"), ("proj/web", None, "b", "5")]
    assert "malformed digest" in delivery.invalid[0].reason


def test_github_registry_package_event_and_other_events() -> None:
    body = {"action": "published", "registry_package": {
        "name": "App", "package_type": "container", "owner": {"login": "Acme"},
        "package_version": {"version": "1.2.3", "container_metadata": {"tag": {"name": "1.2.3", "digest": DIGEST}}}}}
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "registry_package"}
    delivery = parse("github", json.dumps(body).encode(), headers)
    assert [(p.repository, p.digest, p.tag) for p in delivery.pushes] == [("acme/app", DIGEST, "1.2.3")]
    # A version name that is not a digest does not pass for one.
    body["registry_package"]["package_version"]["container_metadata"] = {}
    delivery = parse("github", json.dumps(body).encode(), headers)
    assert delivery.pushes == () and "neither a digest nor a tag" in delivery.invalid[0].reason
    issues = parse("github", b"{}", {"Content-Type": "application/json", "X-GitHub-Event": "issues"})
    assert issues.pushes == () and "not a package event" in issues.skipped[0].reason


def test_docker_hub_official_images_live_under_library() -> None:
    body = {"push_data": {"tag": "3.19", "pushed_at": 9}, "repository": {"repo_name": "alpine"}}
    delivery = parse("dockerhub", json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert [(p.repository, p.digest, p.tag, p.stamp) for p in delivery.pushes] == [("library/alpine", None, "3.19",
                                                                                   "9")]


# -- authentication --------------------------------------------------------------------------------------------

def test_github_signature_is_the_hmac_of_the_body() -> None:
    body = b'{"zen": "x"}'
    expected = "sha256=" + hmac.new(b"s3cret-value", body, hashlib.sha256).hexdigest()
    assert auth.github_signature("s3cret-value", body) == expected
    source = Source("gh", "github", "ghcr.io", "s3cret-value")
    assert auth.check_body(source, {"X-Hub-Signature-256": expected}, body) is None
    assert auth.check_body(source, {"X-Hub-Signature-256": expected}, body + b" ") == "wrong signature"
    assert auth.check_body(source, {}, body) == "no X-Hub-Signature-256 header"


def test_header_and_url_checks() -> None:
    reg = Source("reg", "distribution", "r", "Bearer token-123456")
    assert auth.check_header(reg, {"Authorization": "Bearer token-123456"}) is None
    assert auth.check_header(reg, {"Authorization": "Bearer token-1234567"}) == "wrong Authorization header"
    assert auth.check_header(reg, {"Authorization": "Bearer tökén"}) == "wrong Authorization header"
    assert auth.check_url_secret(reg, "x") == "this source takes no secret in the URL"
    hub = Source("hub", "dockerhub", "docker.io", "url-secret-99")
    assert auth.check_url_secret(hub, "url-secret-99") is None
    assert auth.check_url_secret(hub, None) == "no secret in the URL"
    assert auth.check_header(hub, {}) is None  # the URL carries its credential


# -- routing ---------------------------------------------------------------------------------------------------

def test_routes_first_match_wins_and_wildcards_carry_over(tmp_path: Path) -> None:
    config = config_from_mapping(_config(tmp_path, routes=[
        {"name": "team", "match": "vendor/team/**", "destination": "docker://reg.example:5000/conf-team/**"},
        {"name": "vendor", "match": "vendor/*", "destination": "docker://reg.example:5000/confidential/*",
         "tag": "{tag}-{digest_short}"},
        {"name": "fixed", "match": "legacy/*", "destination": "oci:/srv/images/legacy"},
    ]), tmp_path)
    router = Router(config)
    d = router.decide("reg", "reg.example:5000", "vendor/team/a/b", "1", DIGEST)
    assert d.route is not None and d.route.name == "team"
    assert str(d.route.destination(d.captures, "vendor/team/a/b", "1", DIGEST)) == \
        "docker://reg.example:5000/conf-team/a/b:1"
    d = router.decide("reg", "reg.example:5000", "vendor/app", "2.0", DIGEST)
    assert d.route is not None and d.route.name == "vendor"
    assert str(d.route.destination(d.captures, "vendor/app", "2.0", DIGEST)) == \
        f"docker://reg.example:5000/confidential/app:2.0-{DIGEST[7:19]}"
    assert router.decide("reg", "reg.example:5000", "vendor/a/b", "1", DIGEST).route is None  # * stops at /
    d = router.decide("reg", "reg.example:5000", "legacy/x", "9", None)
    assert d.route is not None
    assert str(d.route.destination(d.captures, "legacy/x", "9", None)) == "oci:/srv/images/legacy:9"
    # Loops: the destinations themselves are never routed, in the destination's registry only.
    assert "own push" in router.decide("reg", "reg.example:5000", "confidential/app", "1", DIGEST).reason
    assert "own push" in router.decide("reg", "reg.example:5000", "conf-team/x/y", "1", DIGEST).reason
    assert "no route" in router.decide("reg", "elsewhere:5000", "confidential/app", "1", DIGEST).reason


def test_routes_restricted_to_sources(tmp_path: Path) -> None:
    data = _config(tmp_path)
    data["sources"]["hub"] = {"type": "dockerhub", "registry": "docker.io", "secret": "hub-secret-1"}
    data["routes"] = [{"match": "vendor/*", "destination": "docker://reg.example:5000/c/*", "sources": ["hub"]}]
    router = Router(config_from_mapping(data, tmp_path))
    assert router.decide("reg", "reg.example:5000", "vendor/a", "1", DIGEST).route is None
    assert router.decide("hub", "docker.io", "vendor/a", "1", DIGEST).route is not None


def test_job_key_collapses_duplicates_only(tmp_path: Path) -> None:
    config = config_from_mapping(_config(tmp_path), tmp_path)
    router = Router(config)
    source = config.sources["reg"]
    from sconify.service.events import Push

    def key(push: Push) -> str:
        d = router.decide("reg", source.registry, push.repository, push.tag, push.digest)
        assert d.route is not None
        return make_job(source, push, d.route, d.captures).key()

    assert key(Push("vendor/a", DIGEST, "1", event_id="x")) == key(Push("vendor/a", DIGEST, "1", event_id="y"))
    assert key(Push("vendor/a", DIGEST, "1")) != key(Push("vendor/a", OTHER, "1"))
    assert key(Push("vendor/a", DIGEST, "1")) != key(Push("vendor/b", DIGEST, "1"))
    assert key(Push("vendor/a", None, "1", stamp="t1")) == key(Push("vendor/a", None, "1", stamp="t1"))
    assert key(Push("vendor/a", None, "1", stamp="t1")) != key(Push("vendor/a", None, "1", stamp="t2"))
    d = router.decide("reg", source.registry, "vendor/a", "1", DIGEST)
    assert d.route is not None
    job = make_job(source, Push("vendor/a", DIGEST, "1"), d.route, d.captures)
    assert ServiceJob.from_json(json.loads(json.dumps(job.to_json()))) == job


def test_policy_directories_are_per_image_and_stay_inside(tmp_path: Path) -> None:
    base = tmp_path / "policies"
    a = policy_dir_for(base, parse_reference("docker://reg.example:5000/confidential/app:1"), DIGEST)
    assert a == base / "reg.example_5000" / "confidential" / "app" / ("sha256-" + "ab" * 32)
    b = policy_dir_for(base, parse_reference("oci:/srv/../etc/out:1"), DIGEST)
    assert b.resolve().is_relative_to(base.resolve())


# -- configuration ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "words"), [
    ({"routes": []}, "routes"),
    ({"bogus": 1}, "'bogus' is not a known key"),
    ({"sources": {"reg": {"type": "quay", "registry": "r"}}}, "is not one of"),
    ({"sources": {"reg": {"type": "distribution", "registry": "r"}}}, "give exactly one of authorization"),
    ({"sources": {"reg": {"type": "distribution", "registry": "r", "authorization": "short"}}}, "shorter than 8"),
    ({"sources": {"reg": {"type": "github", "registry": "r", "authorization": "Bearer 0123456789"}}},
     "proves itself with 'secret'"),
    ({"sources": {"reg": {"type": "distribution", "registry": "r", "authorization_env": "SCONIFY_NO_SUCH_VAR"}}},
     "SCONIFY_NO_SUCH_VAR"),
    ({"routes": [{"match": "a/*", "destination": "docker://r.example/b/*/*"}]}, "wildcards"),
    ({"routes": [{"match": "a/*", "destination": "docker://r.example/b/*:v1"}]}, "must not carry a tag"),
    ({"routes": [{"match": "a/*", "destination": "docker-archive:/x.tar"}]}, "docker://REGISTRY/REPO or oci:DIR"),
    ({"routes": [{"match": "a/*", "destination": "docker://r.example/b/*", "tag": "{nope}"}]}, "unknown field"),
    ({"routes": [{"match": "a/*", "destination": "docker://r.example/b/*", "untagged_tag": "{tag}"}]},
     "{tag} is empty"),
    ({"routes": [{"match": "a/*", "destination": "docker://r.example/b/*", "sources": ["nobody"]}]},
     "not defined under 'sources'"),
    ({"cas": {"url": "http://cas:8081"}}, "cas/url"),
    ({"cas": {"url": "https://cas:8081", "cert": "c.pem"}}, "both 'cert' and 'key'"),
    ({"listen": "nowhere"}, "listen"),
])
def test_configuration_errors_name_the_field(tmp_path: Path, change: dict[str, Any], words: str) -> None:
    with pytest.raises(UsageError) as err:
        config_from_mapping(_config(tmp_path, **change), tmp_path)
    assert words in err.value.message


def test_credentials_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("Bearer from-a-file-123\n")
    monkeypatch.setenv("SCONIFY_TEST_HUB_SECRET", "from-the-env-456")
    data = _config(tmp_path)
    data["sources"] = {
        "reg": {"type": "distribution", "registry": "reg.example:5000", "authorization_file": "token"},
        "hub": {"type": "dockerhub", "registry": "docker.io", "secret_env": "SCONIFY_TEST_HUB_SECRET"},
    }
    path = tmp_path / "service.yaml"
    path.write_text(json.dumps(data))
    config = load_config(path)
    assert config.sources["reg"].credential == "Bearer from-a-file-123"
    assert config.sources["hub"].credential == "from-the-env-456"
    assert "from-a-file" not in repr(config) and "from-the-env" not in repr(config)
    assert config.store == tmp_path / "state" / "jobs.sqlite"
    assert config.policy_dir == tmp_path / "state" / "policies"


def test_missing_and_broken_config_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("sources: [unclosed")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
