"""The HTTP side of ``sconify serve`` as a real process (no workers): authentication per source, parsing of
every sender's payload, routing, duplicates, bad input, and the /jobs, /healthz and /metrics endpoints."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_service_support import DIST_V1, Service, distribution_event, envelope

from sconify.service.auth import github_signature

REG_AUTH = "Bearer reg-" + secrets.token_hex(12)
HARBOR_AUTH = "Basic harbor-" + secrets.token_hex(12)
GH_SECRET = "gh-" + secrets.token_hex(12)
HUB_SECRET = "hub-" + secrets.token_hex(12)
REGISTRY = "127.0.0.1:5999"  # never contacted: the service runs without workers here
MAX_BODY = 64 * 1024
API_TOKEN = "api-" + secrets.token_hex(12)


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("service-http")
    config = {
        "workers": 0,
        "max_body": MAX_BODY,
        "api_token": API_TOKEN,
        "sources": {
            "reg": {"type": "distribution", "registry": REGISTRY, "authorization": REG_AUTH},
            "harbor": {"type": "harbor", "registry": "harbor.example", "authorization": HARBOR_AUTH},
            "gh": {"type": "github", "registry": "ghcr.io", "secret": GH_SECRET},
            "hub": {"type": "dockerhub", "registry": "docker.io", "secret": HUB_SECRET},
        },
        "routes": [
            {"name": "vendor", "match": "vendor/*", "destination": f"docker://{REGISTRY}/confidential/*",
             "sources": ["reg"]},
            {"name": "harbor", "match": "proj/*", "destination": f"docker://{REGISTRY}/harbor-conf/*",
             "sources": ["harbor"]},
            {"name": "gh", "match": "acme/**", "destination": f"docker://{REGISTRY}/gh/**", "sources": ["gh"]},
            {"name": "hub", "match": "library/*", "destination": f"docker://{REGISTRY}/hub/*", "tag": "{tag}-scone",
             "sources": ["hub"]},
            {"name": "by-digest", "match": "digests/*", "destination": f"docker://{REGISTRY}/confidential-d/*",
             "untagged_tag": "src-{digest_short}", "sources": ["reg"]},
        ],
    }
    svc = Service(work, config).start()
    yield svc
    svc.stop()


def _post_reg(service: Service, body: object, content_type: str = DIST_V1, auth: str | None = REG_AUTH):
    headers = {"Content-Type": content_type}
    if auth is not None:
        headers["Authorization"] = auth
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return service.post("/events/reg", data, headers)


def _repo(stem: str) -> str:
    return f"vendor/{stem}-{secrets.token_hex(3)}"


def test_a_push_becomes_one_job_and_duplicates_collapse(service: Service) -> None:
    repo = _repo("app")
    digest = _digest(repo)
    answers = [_post_reg(service, envelope(distribution_event(repo, digest, "1.0", event_id=f"e{i}")))
               for i in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 202]
    accepted = [a.json()["accepted"][0] for a in answers]
    assert [a["created"] for a in accepted] == [True, False, False]
    assert len({a["job"] for a in accepted}) == 1
    assert accepted[0]["destination"] == f"docker://{REGISTRY}/{repo.replace('vendor/', 'confidential/')}:1.0"
    job = service.get(f"/jobs/{accepted[0]['job']}").json()
    assert job["status"] == "queued"
    assert job["source"] == f"docker://{REGISTRY}/{repo}:1.0@{digest}"
    assert job["route"] == "vendor"
    # Another digest of the same repository is another image: another job.
    other = _post_reg(service, envelope(distribution_event(repo, _digest(repo + "2"), "1.0")))
    assert other.json()["accepted"][0]["created"] is True
    assert other.json()["accepted"][0]["job"] != accepted[0]["job"]


def test_the_v2_envelope_media_type_is_accepted(service: Service) -> None:
    repo = _repo("v2")
    resp = _post_reg(service, envelope(distribution_event(repo, _digest(repo), "2.0")),
                     content_type="application/vnd.docker.distribution.events.v2+json; charset=utf-8")
    assert resp.status_code == 202, resp.text
    assert resp.json()["accepted"][0]["created"] is True


def test_one_envelope_with_several_pushes_and_other_events(service: Service) -> None:
    a, b = _repo("multi-a"), _repo("multi-b")
    body = envelope(
        distribution_event(a, _digest(a), "1"),
        distribution_event(a, _digest(a), "1", action="pull"),
        distribution_event(a, _digest("layer"), None, media_type="application/octet-stream"),
        distribution_event(b, _digest(b), "2"),
    )
    resp = _post_reg(service, body)
    assert resp.status_code == 202
    out = resp.json()
    assert sorted(x["repository"] for x in out["accepted"]) == sorted([a, b])
    reasons = " ".join(x["reason"] for x in out["ignored"])
    assert "pull" in reasons and "octet-stream" in reasons


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-xxxxxxxxxx", REG_AUTH + "x", REG_AUTH[:-1]])
def test_a_distribution_event_without_the_right_authorization_is_refused(service: Service, auth: str | None) -> None:
    repo = _repo("auth")
    resp = _post_reg(service, envelope(distribution_event(repo, _digest(repo), "1")), auth=auth)
    assert resp.status_code == 401
    assert "authentication failed" in resp.json()["error"]
    assert not [j for j in service.jobs() if j["source"] and repo in j["source"]]


def test_harbor_webhook(service: Service) -> None:
    digest = _digest("harbor")
    body = {"type": "PUSH_ARTIFACT", "occur_at": 1700000000, "operator": "admin",
            "event_data": {"resources": [{"digest": digest, "tag": "v1", "resource_url": "harbor.example/proj/web:v1"}],
                           "repository": {"name": "web", "namespace": "proj", "repo_full_name": "proj/web",
                                          "repo_type": "private"}}}
    wrong = service.post("/events/harbor", body, {"Content-Type": "application/json", "Authorization": REG_AUTH})
    assert wrong.status_code == 401
    resp = service.post("/events/harbor", body, {"Content-Type": "application/json", "Authorization": HARBOR_AUTH})
    assert resp.status_code == 202, resp.text
    accepted = resp.json()["accepted"]
    assert accepted[0]["destination"] == f"docker://{REGISTRY}/harbor-conf/web:v1"
    assert accepted[0]["digest"] == digest
    other = service.post("/events/harbor", {**body, "type": "DELETE_ARTIFACT"},
                         {"Content-Type": "application/json", "Authorization": HARBOR_AUTH})
    assert other.status_code == 202 and other.json()["accepted"] == []


def _github(service: Service, payload: dict, event: str = "package", secret: str = GH_SECRET):
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "X-GitHub-Event": event,
               "X-Hub-Signature-256": github_signature(secret, body)}
    return service.post("/events/gh", body, headers)


def test_github_package_event_and_ping(service: Service) -> None:
    assert _github(service, {"zen": "Keep it logically awesome."}, event="ping").json()["pong"] is True
    digest = _digest("gh")
    payload = {"action": "published", "package": {
        "name": "Tools", "namespace": "acme", "package_type": "CONTAINER", "owner": {"login": "acme"},
        "package_version": {"id": 7, "version": digest, "name": digest,
                            "container_metadata": {"tag": {"name": "3.1", "digest": digest}}}}}
    resp = _github(service, payload)
    assert resp.status_code == 202, resp.text
    assert resp.json()["accepted"][0]["destination"] == f"docker://{REGISTRY}/gh/tools:3.1"
    assert _github(service, payload, secret=GH_SECRET + "x").status_code == 401
    body = json.dumps(payload).encode()
    unsigned = service.post("/events/gh", body, {"Content-Type": "application/json", "X-GitHub-Event": "package"})
    assert unsigned.status_code == 401
    npm = _github(service, {**payload, "package": {**payload["package"], "package_type": "npm"}})
    assert npm.status_code == 202 and npm.json()["accepted"] == []


def test_docker_hub_webhook_secret_in_the_url(service: Service) -> None:
    name = f"hubapp{secrets.token_hex(3)}"
    body = {"callback_url": "https://registry.hub.docker.com/u/x/hook/1/",
            "push_data": {"pushed_at": 1700000001, "pusher": "someone", "tag": "latest"},
            "repository": {"repo_name": name, "name": name, "namespace": "library"}}
    assert service.post(f"/events/hub/{HUB_SECRET}x", body, {"Content-Type": "application/json"}).status_code == 401
    assert service.post("/events/hub", body, {"Content-Type": "application/json"}).status_code == 401
    first = service.post(f"/events/hub/{HUB_SECRET}", body, {"Content-Type": "application/json"})
    assert first.status_code == 202, first.text
    job = first.json()["accepted"][0]
    assert job["destination"] == f"docker://{REGISTRY}/hub/{name}:latest-scone" and job["digest"] is None
    # The same delivery again collapses; a later push of the same tag is a new job (resolved when it runs).
    again = service.post(f"/events/hub/{HUB_SECRET}", body, {"Content-Type": "application/json"}).json()
    assert again["accepted"][0]["job"] == job["job"] and again["accepted"][0]["created"] is False
    later = {**body, "push_data": {**body["push_data"], "pushed_at": 1700000999}}
    newer = service.post(f"/events/hub/{HUB_SECRET}", later, {"Content-Type": "application/json"}).json()
    assert newer["accepted"][0]["created"] is True and newer["accepted"][0]["job"] != job["job"]


def test_a_credential_for_another_source_does_not_open_it(service: Service) -> None:
    # The Docker Hub secret must not work on the distribution endpoint, nor a URL secret on a header source.
    repo = _repo("cross")
    body = envelope(distribution_event(repo, _digest(repo), "1"))
    assert _post_reg(service, body, auth=HUB_SECRET).status_code == 401
    resp = service.post(f"/events/reg/{REG_AUTH.split()[1]}", json.dumps(body),
                        {"Content-Type": DIST_V1, "Authorization": REG_AUTH})
    assert resp.status_code == 401


def test_events_for_own_destinations_unrouted_repositories_and_signatures_are_ignored(service: Service) -> None:
    own = envelope(distribution_event("confidential/app", _digest("own"), "1.0"))
    unrouted = envelope(distribution_event("other/app", _digest("other"), "1.0"))
    signature = envelope(distribution_event("vendor/app", _digest("sig"), "sha256-" + "ab" * 32 + ".sig"))
    untagged = envelope(distribution_event(_repo("untagged"), _digest("untagged"), None))
    before = len(service.jobs())
    for body, word in ((own, "own push"), (unrouted, "no route"), (signature, "signature"),
                       (untagged, "digest only")):
        resp = _post_reg(service, body)
        assert resp.status_code == 202, resp.text
        assert resp.json()["accepted"] == []
        assert word in resp.json()["ignored"][0]["reason"]
    assert len(service.jobs()) == before


def test_a_route_with_untagged_tag_converts_pushes_by_digest(service: Service) -> None:
    digest = _digest("by-digest")
    resp = _post_reg(service, envelope(distribution_event("digests/app", digest, None)))
    assert resp.status_code == 202
    dest = resp.json()["accepted"][0]["destination"]
    assert dest == f"docker://{REGISTRY}/confidential-d/app:src-{digest[7:19]}"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (b"{not json", DIST_V1, 400, "not valid JSON"),
        (b"[1, 2]", DIST_V1, 400, "not a JSON object"),
        (b'{"events": {}}', DIST_V1, 400, "no 'events' list"),
        (json.dumps(envelope(distribution_event("vendor/x", None, None))).encode(), DIST_V1, 400,
         "neither a digest nor a tag"),
        (json.dumps(envelope(distribution_event("vendor/x", "sha256:1234", "1"))).encode(), DIST_V1, 400,
         "malformed digest"),
        (json.dumps(envelope(distribution_event("Vendor/X", _digest("x"), "1"))).encode(), DIST_V1, 400,
         "invalid repository"),
        (json.dumps(envelope(distribution_event("vendor/x", _digest("x"), "bad tag"))).encode(), DIST_V1, 400,
         "invalid tag"),
        (json.dumps(envelope(distribution_event("vendor/x", _digest("x"), "1"))).encode(), "text/plain", 415,
         "application/vnd.docker.distribution.events.v1+json"),
        (json.dumps(envelope(distribution_event("vendor/x", _digest("x"), "1"))).encode(), "", 415, "no media type"),
        (b"{" + b" " * (MAX_BODY + 10) + b"}", DIST_V1, 413, "limit"),
        (b"\xff\xfe\x00garbage", DIST_V1, 400, "not valid JSON"),
        (b"[" * 100000 + b"]" * 100000, DIST_V1, 413, "limit"),
    ],
)
def test_bad_input_gets_a_4xx_with_a_reason(service: Service, body: bytes, content_type: str, status: int,
                                            words: str) -> None:
    resp = _post_reg(service, body, content_type=content_type)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]
    assert service.get("/healthz").status_code == 200


def test_deep_json_within_the_limit_is_refused_cleanly(service: Service) -> None:
    body = b"[" * 30000 + b"]" * 30000
    resp = _post_reg(service, body)
    assert resp.status_code == 400
    assert "JSON" in resp.json()["error"]


def test_a_valid_event_beside_invalid_ones_is_kept(service: Service) -> None:
    repo = _repo("mixed")
    body = envelope(distribution_event(repo, None, None, event_id="bad"),
                    distribution_event(repo, _digest(repo), "1", event_id="good"))
    resp = _post_reg(service, body)
    assert resp.status_code == 202
    assert [a["repository"] for a in resp.json()["accepted"]] == [repo]
    assert "neither a digest nor a tag" in resp.json()["invalid"][0]["reason"]


def test_unknown_source_and_methods(service: Service) -> None:
    assert service.post("/events/nope", b"{}", {"Content-Type": DIST_V1}).status_code == 404
    assert service.get("/events/reg").status_code == 405
    assert service.get("/jobs/abc").status_code == 400
    assert service.get("/jobs/999999").status_code == 404
    assert service.get("/jobs", params={"status": "weird"}).status_code == 400


def test_secrets_never_reach_the_log(service: Service) -> None:
    service.post(f"/events/hub/{HUB_SECRET}", b"{}", {"Content-Type": "application/json"})
    service.post("/events/hub/guessed-secret-1234", b"{}", {"Content-Type": "application/json"})
    _post_reg(service, envelope(), auth="Bearer guessed-token-5678")
    text = Path(service.log_path).read_text()
    assert "refused an event for source reg" in text and "wrong Authorization header" in text
    assert "wrong secret in the URL" in text
    for secret in (REG_AUTH.split()[1], HARBOR_AUTH.split()[1], GH_SECRET, HUB_SECRET, "guessed-secret-1234",
                   "guessed-token-5678"):
        assert secret not in text


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def test_metrics_count_events_and_jobs(service: Service) -> None:
    before = service.get("/metrics").text
    repo = _repo("metrics")
    _post_reg(service, envelope(distribution_event(repo, _digest(repo), "1")))
    _post_reg(service, envelope(distribution_event(repo, _digest(repo), "1")))
    _post_reg(service, envelope(distribution_event(repo, _digest(repo), "1")), auth="Bearer nope-nope-nope")
    _post_reg(service, b"{oops")
    resp = service.get("/metrics")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    after = resp.text

    def delta(name: str, **labels: str) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert delta("sconify_service_events_received_total", source="reg") == 4
    assert delta("sconify_service_events_rejected_total", source="reg", reason="unauthenticated") == 1
    assert delta("sconify_service_events_rejected_total", source="reg", reason="malformed") == 1
    assert delta("sconify_service_jobs_queued_total", source="reg") == 1
    assert delta("sconify_service_events_duplicate_total", source="reg") == 1
    counts = service.counts()
    assert _metric(after, "sconify_service_jobs", status="queued") == counts["queued"]
    assert "sconify_service_conversion_seconds_bucket" in after
    assert _metric(after, "sconify_service_event_seconds_count", source="reg") >= 4


def test_healthz_and_jobs_listing(service: Service) -> None:
    health = service.get("/healthz").json()
    assert health["status"] == "ok" and health["workers"] == {"configured": 0, "alive": 0}
    listing = service.get("/jobs", params={"status": "queued", "limit": 2}).json()
    assert len(listing["jobs"]) <= 2 and all(j["status"] == "queued" for j in listing["jobs"])
    assert listing["counts"]["queued"] >= len(listing["jobs"])


def test_the_job_api_wants_the_api_token(service: Service) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-123"}, {"Authorization": API_TOKEN}):
        assert service.get("/jobs", headers=headers).status_code == 401
        assert service.get("/jobs/1", headers=headers).status_code == 401
    assert service.get("/jobs", headers={"Authorization": f"Bearer {API_TOKEN}"}).status_code == 200
    assert service.get("/healthz", headers={}).status_code == 200
    assert service.get("/metrics", headers={}).status_code == 200
    assert API_TOKEN not in Path(service.log_path).read_text()
