"""The service with the real things: a ``docker-registry`` whose notifications call the running service, skopeo
pushing native fixture images, conversions in worker processes, signatures and policies, a CAS over mutual TLS.

Also: the service killed with SIGKILL while jobs are queued and running, then restarted (every accepted event
converted exactly once, counted by the manifest PUTs in the registry's log), and a burst of 1,000 events with
many duplicates (each distinct image converted once).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from infra.procs import free_port
from infra.registry import Registry, RegistryStartError, start_registry
from test_service_support import DIST_V1, CertificateSet, Service, TinyCas, distribution_event, envelope

from fixtures import build_image
from sconify.image.reference import parse_reference

pytestmark = pytest.mark.registry
AUTH = "Bearer " + secrets.token_hex(16)


@dataclass
class Keys:
    fspf: Path
    enclave: Path
    sign: Path
    verify: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    from sconify.enclave.keys import generate_enclave_key, write_enclave_key
    from sconify.signing.keys import generate_cosign_keys

    base = tmp_path_factory.mktemp("service-keys")
    fspf = base / "fspf.key"
    fspf.write_text(secrets.token_hex(32) + "\n")
    fspf.chmod(0o600)
    write_enclave_key(base / "enclave.pem", generate_enclave_key())
    pair = generate_cosign_keys(base / "cosign")
    return Keys(fspf, base / "enclave.pem", pair.private_path, pair.public_path)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One OCI layout with the native images the tests push: busybox-sh and shared-base variants."""
    layout = tmp_path_factory.mktemp("service-images") / "layout"
    build_image("busybox-sh", layout, "busybox")
    for v in range(5):  # the crash test: conversions that take a moment
        build_image("shared-base", layout, f"big{v}", variant=v, base_size="1M", top_size="12M")
    for v in range(5):  # the burst: small ones
        build_image("shared-base", layout, f"small{v}", variant=100 + v, base_size="256K", top_size="64K")
    return layout


def registry_with_notifications(workdir: Path, service_port: int) -> Registry:
    notifications = {
        "endpoints": [{
            "name": "sconify",
            "url": f"http://127.0.0.1:{service_port}/events/local",
            "headers": {"Authorization": [AUTH]},
            "timeout": "3s",
            "threshold": 3,
            "backoff": "300ms",
            "ignoredmediatypes": ["application/octet-stream"],
        }]
    }
    try:
        return start_registry(workdir, overrides={"notifications": notifications})
    except RegistryStartError as err:
        if "is missing" in str(err):
            pytest.skip(str(err))
        raise


def service_config(registry: Registry, keys: Keys, **extra: Any) -> dict[str, Any]:
    return {
        "workers": 2,
        "lease_seconds": 3,
        "retry": {"attempts": 4, "backoff": 0.5, "max_backoff": 2},
        "sources": {"local": {"type": "distribution", "registry": registry.host, "authorization": AUTH}},
        "routes": [{
            "name": "vendor",
            "match": "vendor/*",
            "destination": f"docker://{registry.host}/confidential/*",
            "keys": {"fspf": str(keys.fspf), "enclave": str(keys.enclave), "sign": str(keys.sign)},
        }],
        **extra,
    }


def push(layout: Path, tag: str, registry: Registry, repository: str, dest_tag: str) -> str:
    """Push an image of the layout with skopeo; returns its manifest digest."""
    digest_file = layout.parent / f"digest-{secrets.token_hex(4)}"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                    f"docker://{registry.host}/{repository}:{dest_tag}", "--digestfile", str(digest_file)],
                   check=True, capture_output=True, timeout=120)
    return digest_file.read_text().strip()


def wait_for_jobs(service: Service, n: int, timeout: float) -> list[dict[str, Any]]:
    """Wait until ``n`` jobs exist and none is queued or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = service.jobs()
        if len(jobs) >= n and all(j["status"] in ("succeeded", "failed") for j in jobs):
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"jobs did not finish in {timeout} s: {service.jobs()}\n{service.log()}")


def manifest_puts(registry: Registry, repository: str) -> list[str]:
    """The references of the manifest PUTs the registry accepted for ``repository`` (from its access log)."""
    found = []
    for line in registry.log_path.read_text(errors="replace").splitlines():
        m = re.search(r'"PUT /v2/(\S+)/manifests/(\S+) HTTP/[0-9.]+" (2[0-9][0-9]) ', line)
        if m and m.group(1) == repository:
            found.append(m.group(2))
    return found


def _metric(service: Service, name: str, **labels: str) -> float:
    total = 0.0
    for line in service.get("/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def stack(tmp_path: Path, keys: Keys) -> Iterator[dict[str, Any]]:
    port = free_port()
    registry = registry_with_notifications(tmp_path / "registry", port)
    started: dict[str, Any] = {"port": port, "registry": registry, "services": []}
    try:
        yield started
    finally:
        for svc in started["services"]:
            svc.stop()
        registry.stop()


def test_a_push_to_the_registry_yields_the_confidential_image_signature_and_policy(
        stack: dict[str, Any], keys: Keys, images: Path, tmp_path: Path) -> None:
    from sconify.verify import verify_image

    registry: Registry = stack["registry"]
    certs = CertificateSet(tmp_path / "certs")
    cas = TinyCas(certs)
    try:
        config = service_config(registry, keys, cas={"url": cas.url, "cert": str(certs.client_cert),
                                                     "key": str(certs.client_key), "ca": str(certs.ca)})
        service = Service(tmp_path / "service", config, port=stack["port"]).start()
        stack["services"].append(service)
        digest = push(images, "busybox", registry, "vendor/app", "1.0")

        jobs = wait_for_jobs(service, 1, 90)
        assert len(jobs) == 1, jobs
        job = jobs[0]
        assert job["status"] == "succeeded", job
        assert job["source"] == f"docker://{registry.host}/vendor/app:1.0@{digest}"
        result = job["result"]
        assert result["converted"] is True

        # The confidential image and its signature are in the registry.
        out_digest = result["digest"]
        tags = registry.tags("confidential/app")
        assert "1.0" in tags and out_digest.replace(":", "-") + ".sig" in tags
        manifest = registry.manifest("confidential/app", "1.0")
        assert manifest.status_code == 200
        assert manifest.headers["Docker-Content-Digest"] == out_digest
        annotations = json.loads(manifest.content)["annotations"]
        assert annotations["org.opencontainers.image.base.digest"] == digest

        # The policy: 0600 files in 0700 directories, up to the configured policy root.
        policy = Path(result["policy_dir"])
        root = tmp_path / "service" / "state" / "policies"
        assert policy.is_relative_to(root)
        for directory in [policy, *[p for p in policy.parents if p.is_relative_to(root)]]:
            assert directory.stat().st_mode & 0o777 == 0o700, directory
        for name in ("session.yml", "report.json", "enclave.sig"):
            assert (policy / name).stat().st_mode & 0o777 == 0o600
        report = json.loads((policy / "report.json").read_text())
        assert report["digest"] == out_digest and report["mrenclave"] == result["mrenclave"]

        # The CAS got the session over mutual TLS.
        assert result["cas"] == "created"
        assert [s["body"] for s in cas.sessions] == [(policy / "session.yml").read_bytes()]
        assert cas.sessions[0]["client"] == "sconify-service"

        # The result verifies: cosign signature, MRENCLAVE recomputed, FSPF tag.
        ref = parse_reference(f"docker://{registry.host}/confidential/app@{out_digest}")
        verification = verify_image(ref, policy / "session.yml", key_file=keys.verify)
        assert verification.ok, verification.to_json()
        assert {c.name: c.status for c in verification.checks} == {"signature": "ok", "mrenclave": "ok",
                                                                   "fspf": "ok"}

        # The registry told the service about its own pushes (image and signature): acknowledged, ignored.
        deadline = time.monotonic() + 15
        while _metric(service, "sconify_service_events_ignored_total", reason="own-push") < 2:
            assert time.monotonic() < deadline, service.log()
            time.sleep(0.2)
        assert len(service.jobs()) == 1
        assert manifest_puts(registry, "confidential/app").count("1.0") == 1
    finally:
        cas.stop()


def test_sigkill_while_jobs_queued_and_running_then_restart_converts_each_exactly_once(
        stack: dict[str, Any], keys: Keys, images: Path, tmp_path: Path) -> None:
    registry: Registry = stack["registry"]
    config = service_config(registry, keys)
    service = Service(tmp_path / "service", config, port=stack["port"]).start()
    stack["services"].append(service)
    digests = {f"vendor/big{v}": push(images, f"big{v}", registry, f"vendor/big{v}", "1") for v in range(4)}

    # Wait until the service accepted all four events and is in the middle of converting.
    deadline = time.monotonic() + 60
    while True:
        counts = service.counts()
        if sum(counts.values()) == 4 and counts["running"] >= 1 and counts["queued"] >= 1:
            break
        assert time.monotonic() < deadline, f"{counts}\n{service.log()}"
        time.sleep(0.05)
    service.kill()
    # While the service is down, one more image is pushed: the registry keeps its event until delivery works.
    digests["vendor/big4"] = push(images, "big4", registry, "vendor/big4", "1")
    time.sleep(1.0)

    restarted = Service(tmp_path / "service", config, port=stack["port"]).start()
    stack["services"].append(restarted)
    jobs = wait_for_jobs(restarted, 5, 150)

    by_repo = {re.match(r"docker://[^/]+/([^:@]+)", j["source"]).group(1): j for j in jobs}  # type: ignore[union-attr]
    assert sorted(by_repo) == sorted(digests), jobs
    assert len(jobs) == 5, jobs
    for repo, digest in digests.items():
        job = by_repo[repo]
        assert job["status"] == "succeeded", job
        assert job["source"].endswith(f"@{digest}")
        dest_repo = repo.replace("vendor/", "confidential/")
        manifest = registry.manifest(dest_repo, "1")
        assert manifest.status_code == 200, dest_repo
        assert manifest.headers["Docker-Content-Digest"] == job["result"]["digest"]
        assert json.loads(manifest.content)["annotations"]["org.opencontainers.image.base.digest"] == digest
        # Exactly one push of the image, whatever the kill interrupted.
        assert manifest_puts(registry, dest_repo).count("1") == 1, (dest_repo, manifest_puts(registry, dest_repo))
        sig_tag = job["result"]["digest"].replace(":", "-") + ".sig"
        assert sig_tag in registry.tags(dest_repo)
        assert (Path(job["result"]["policy_dir"]) / "session.yml").is_file()


def test_a_burst_of_1000_events_with_duplicates_converts_each_image_once(
        stack: dict[str, Any], keys: Keys, images: Path, tmp_path: Path) -> None:
    registry: Registry = stack["registry"]
    service = Service(tmp_path / "service", service_config(registry, keys), port=stack["port"]).start()
    stack["services"].append(service)
    pushed = [(f"vendor/small{v}", push(images, f"small{v}", registry, f"vendor/small{v}", "1")) for v in range(5)]
    # The registry's own notifications for these pushes arrive too: just more duplicates.
    bodies = [json.dumps(envelope(distribution_event(repo, digest, "1", event_id=f"burst-{i}"))).encode()
              for i in range(1000) for repo, digest in [pushed[(i * 7) % len(pushed)]]]

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=8)
    session.mount("http://", adapter)

    def send(body: bytes) -> tuple[int, dict[str, Any]]:
        resp = session.post(service.url + "/events/local", data=body, timeout=30,
                            headers={"Content-Type": DIST_V1, "Authorization": AUTH})
        return resp.status_code, resp.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, bodies))
    assert [status for status, _ in answers] == [202] * 1000
    job_ids = {a["accepted"][0]["job"] for _, a in answers}
    assert len(job_ids) == 5

    jobs = wait_for_jobs(service, 5, 120)
    assert len(jobs) == 5, jobs
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    assert {j["id"] for j in jobs} == job_ids
    for repo, _digest in pushed:
        assert manifest_puts(registry, repo.replace("vendor/", "confidential/")).count("1") == 1
    assert _metric(service, "sconify_service_jobs_queued_total") == 5
    assert _metric(service, "sconify_service_events_duplicate_total") >= 995
    assert _metric(service, "sconify_service_jobs", status="succeeded") == 5
    assert _metric(service, "sconify_service_conversion_seconds_count", status="succeeded") == 5


def test_a_tag_only_push_is_resolved_when_the_job_runs(stack: dict[str, Any], keys: Keys, images: Path,
                                                       tmp_path: Path) -> None:
    """Docker Hub style: the event names a tag only; the worker resolves it to a digest, and converts it once
    even when a second event for the same tag arrives after the first conversion."""
    registry: Registry = stack["registry"]
    secret = secrets.token_hex(12)
    config = service_config(registry, keys)
    config["sources"]["hub"] = {"type": "dockerhub", "registry": registry.host, "secret": secret}
    config["routes"][0]["sources"] = ["local", "hub"]
    service = Service(tmp_path / "service", config, port=stack["port"]).start()
    stack["services"].append(service)
    digest = push(images, "small0", registry, "vendor/tagonly", "7")
    wait_for_jobs(service, 1, 60)  # the registry's own event (with digest)

    def hub(pushed_at: int) -> requests.Response:
        body = {"push_data": {"pushed_at": pushed_at, "tag": "7"}, "repository": {"repo_name": "vendor/tagonly"}}
        return service.post(f"/events/hub/{secret}", body, {"Content-Type": "application/json"})

    first = hub(1)
    assert first.status_code == 202 and first.json()["accepted"][0]["created"] is True
    jobs = wait_for_jobs(service, 2, 60)
    tag_job = next(j for j in jobs if j["id"] == first.json()["accepted"][0]["job"])
    assert tag_job["status"] == "succeeded", tag_job
    assert tag_job["result"]["source_digest"] == digest
    assert tag_job["result"]["converted"] is False  # the digest event's job had converted it already
    assert manifest_puts(registry, "confidential/tagonly").count("7") == 1


def test_shutdown_with_sigterm_gives_running_jobs_back(stack: dict[str, Any], keys: Keys, images: Path,
                                                       tmp_path: Path) -> None:
    from sconify.batch.store import JobStore

    registry: Registry = stack["registry"]
    service = Service(tmp_path / "service", service_config(registry, keys), port=stack["port"]).start()
    push(images, "big0", registry, "vendor/stop", "1")
    deadline = time.monotonic() + 30
    while service.counts()["running"] < 1:
        assert time.monotonic() < deadline, service.log()
        time.sleep(0.02)
    assert service.stop(grace=30) == 0
    assert "Traceback" not in service.log(200)
    jobs = JobStore(tmp_path / "service" / "state" / "jobs.sqlite").list()
    if jobs[0].status == "queued":  # stopped mid-conversion: given back, its attempt not counted
        assert jobs[0].attempts == 0 and jobs[0].worker is None
    else:  # the conversion was faster than the signal
        assert jobs[0].status == "succeeded"
    assert "confidential/stop" not in registry.repositories() or jobs[0].status == "succeeded"


def test_with_a_broker_the_jobs_run_on_celery_workers(stack: dict[str, Any], keys: Keys, images: Path,
                                                      tmp_path: Path) -> None:
    """Distributed mode: the service accepts into its store and dispatches to a real ``sconify worker`` through a
    real Redis; the outcome comes back into the store."""
    import sys

    from test_service_support import runtime_env

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is missing; install the Debian package redis-server.")
    registry: Registry = stack["registry"]
    redis_port = free_port()
    (tmp_path / "redis").mkdir()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path / "redis")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    broker = f"redis://127.0.0.1:{redis_port}/0"
    worker = None
    try:
        worker_log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 (closed below)
        worker = subprocess.Popen([sys.executable, "-m", "sconify", "worker", "--broker", broker, "-c", "1",
                                   "--cache", str(tmp_path / "worker-cache"), "--log-dir", str(tmp_path / "logs")],
                                  stdout=worker_log, stderr=subprocess.STDOUT, env=runtime_env())
        service = Service(tmp_path / "service", service_config(registry, keys, broker=broker),
                          port=stack["port"]).start()
        stack["services"].append(service)
        assert service.get("/healthz").json()["dispatcher"]["alive"] is True
        digest = push(images, "small3", registry, "vendor/celery", "1")
        jobs = wait_for_jobs(service, 1, 90)
        job = jobs[0]
        assert job["status"] == "succeeded", (job, (tmp_path / "worker.log").read_text()[-3000:])
        assert job["result"]["source_digest"] == digest and job["result"]["converted"] is True
        assert job["result"]["worker"]
        manifest = registry.manifest("confidential/celery", "1")
        assert manifest.headers["Docker-Content-Digest"] == job["result"]["digest"]
        assert manifest_puts(registry, "confidential/celery").count("1") == 1
        assert (Path(job["result"]["policy_dir"]) / "session.yml").is_file()
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
        redis.terminate()
        redis.wait(10)


def test_a_job_run_again_after_a_crash_pushes_nothing_twice(stack: dict[str, Any], keys: Keys, images: Path,
                                                            tmp_path: Path) -> None:
    """The idempotency a restart relies on, made deterministic: a job run a second time (as when a worker died
    after pushing but before its success was recorded) pushes no image, and only completes a missing signature."""
    from sconify.service.config import config_from_mapping
    from sconify.service.events import Push
    from sconify.service.jobs import make_job
    from sconify.service.routes import Router
    from sconify.service.worker import run_job

    registry: Registry = stack["registry"]  # nobody listens for its notifications here: they wait, harmless
    config = config_from_mapping(service_config(registry, keys, state_dir=str(tmp_path / "state")), tmp_path)
    digest = push(images, "small1", registry, "vendor/again", "1")
    decision = Router(config).decide("local", registry.host, "vendor/again", "1", digest)
    assert decision.route is not None
    job = make_job(config.sources["local"], Push("vendor/again", digest, "1"), decision.route, decision.captures)

    first = run_job(job, config)
    second = run_job(job, config)
    assert first["converted"] is True and second["converted"] is False
    assert second["digest"] == first["digest"] and second["policy_dir"] == first["policy_dir"]
    assert manifest_puts(registry, "confidential/again") == ["1", first["digest"].replace(":", "-") + ".sig"]

    # A crash between the image push and the signature: the signature is added, the image is not pushed again.
    sig = registry.manifest("confidential/again", first["digest"].replace(":", "-") + ".sig")
    deleted = requests.delete(f"{registry.url}/v2/confidential/again/manifests/{sig.headers['Docker-Content-Digest']}",
                              timeout=10)
    assert deleted.status_code == 202
    third = run_job(job, config)
    assert third["converted"] is False and third["signature"]
    assert manifest_puts(registry, "confidential/again").count("1") == 1
    assert first["digest"].replace(":", "-") + ".sig" in registry.tags("confidential/again")

    # A different image under the same tag is converted (the destination names another source).
    other = push(images, "small2", registry, "vendor/again", "1")
    job2 = make_job(config.sources["local"], Push("vendor/again", other, "1"), decision.route, decision.captures)
    fourth = run_job(job2, config)
    assert fourth["converted"] is True and fourth["digest"] != first["digest"]
