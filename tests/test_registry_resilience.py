"""The docker:// transport when the network misbehaves: a real registry behind a small front server on
127.0.0.1 that forwards every request and injects the faults a test asks for (5xx answers, redirects to
storage, downloads that break off, lost chunk answers)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from infra.images import skopeo
from infra.registry import Registry

from sconify.errors import IntegrityError, NetworkError, UnsupportedError
from sconify.image.copy import write_image
from sconify.image.reference import parse_reference
from sconify.image.transports import TransportOptions, open_destination, open_image
from sconify.image.transports.registry import ATTEMPTS, RegistryDestination

pytestmark = pytest.mark.registry

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass
class Fault:
    """Answer up to ``times`` requests that ``match`` (method, path) with ``act`` instead of (or after)
    forwarding them; ``act`` gets the handler and the backend's answer (None if not forwarded)."""

    match: Callable[[str, str], bool]
    act: Callable[[BaseHTTPRequestHandler, requests.Response | None], None]
    times: int = 1
    forward_first: bool = False
    hits: int = 0


@dataclass
class Front:
    """A forwarding front for a registry; ``seen`` lists (method, path, Range header) of every request."""

    backend: str
    host: str = ""
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)

    def ref(self, repository: str, tag: str = "v1") -> str:
        return f"docker://{self.host}/{repository}:{tag}"

    def fault_for(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.hits < fault.times and fault.match(method, path):
                fault.hits += 1
                return fault
        return None


def _handler(front: Front) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            front.seen.append((self.command, self.path, self.headers.get("Range")))
            fault = front.fault_for(self.command, self.path)
            if fault is not None and not fault.forward_first:
                fault.act(self, None)
                return
            # Clients may repeat a header (skopeo sends one Accept per media type): join the repeats.
            headers = {k: ", ".join(self.headers.get_all(k) or []) for k in set(self.headers.keys())
                       if k.lower() not in HOP_BY_HOP}
            headers["Host"] = front.host  # the registry builds its Location URLs from it
            resp = requests.request(self.command, front.backend + self.path, headers=headers, data=body,
                                    allow_redirects=False, timeout=30)
            if fault is not None:
                fault.act(self, resp)
                return
            self.reply(resp.status_code, resp.content, resp.headers)

        def reply(self, status: int, body: bytes, headers: object = None) -> None:
            self.send_response(status)
            for key, value in dict(headers or {}).items():  # type: ignore[call-overload]
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler


@pytest.fixture
def front(registry: Registry) -> Iterator[Front]:
    state = Front(backend=registry.url)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def unavailable(handler: BaseHTTPRequestHandler, _: requests.Response | None) -> None:
    handler.reply(503, b'{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}',  # type: ignore[attr-defined]
                  {"Content-Type": "application/json"})


def is_manifest_get(method: str, path: str) -> bool:
    return method == "GET" and "/manifests/" in path


def is_layer_get(digest: str) -> Callable[[str, str], bool]:
    return lambda method, path: method == "GET" and path.endswith(f"/blobs/{digest}")


def pull_all(ref: str, out: Path) -> str:
    return write_image(open_image(parse_reference(ref)), open_destination(parse_reference(f"oci:{out}:v1"))).digest


@pytest.fixture
def pushed(registry: Registry, busybox_image: str, repository_name: str) -> str:
    skopeo("copy", "--dest-tls-verify=false", busybox_image, registry.ref(repository_name, "v1"))
    return repository_name


def test_transient_5xx_answers_are_retried(front: Front, pushed: str, busybox_image: str, tmp_path: Path) -> None:
    front.faults.append(Fault(is_manifest_get, unavailable, times=2))
    assert pull_all(front.ref(pushed), tmp_path / "out") == open_image(parse_reference(busybox_image)).digest
    assert sum(1 for m, p, _ in front.seen if is_manifest_get(m, p)) == 3


def test_a_registry_that_keeps_failing_is_given_up_after_a_few_tries(front: Front, pushed: str) -> None:
    front.faults.append(Fault(is_manifest_get, unavailable, times=100))
    with pytest.raises(NetworkError, match="HTTP 503 .*UNAVAILABLE: try later"):
        open_image(parse_reference(front.ref(pushed)))
    assert sum(1 for m, p, _ in front.seen if is_manifest_get(m, p)) == ATTEMPTS
    run = subprocess.run([sys.executable, "-m", "sconify", "inspect", front.ref(pushed)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == NetworkError.exit_code
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_blob_downloads_follow_redirects_to_storage(
    front: Front, registry: Registry, pushed: str, busybox_image: str, tmp_path: Path
) -> None:
    def redirect(handler: BaseHTTPRequestHandler, _: requests.Response | None) -> None:
        handler.reply(307, b"", {"Location": registry.url + handler.path})  # type: ignore[attr-defined]

    front.faults.append(Fault(lambda m, p: m == "GET" and "/blobs/sha256:" in p, redirect, times=100))
    assert pull_all(front.ref(pushed), tmp_path / "out") == open_image(parse_reference(busybox_image)).digest
    assert front.faults[0].hits >= 2  # config and layer came from "storage"


def test_a_download_that_breaks_off_resumes_with_a_range(
    front: Front, pushed: str, busybox_image: str, tmp_path: Path
) -> None:
    layer = open_image(parse_reference(busybox_image)).layers[0].descriptor

    def break_off(handler: BaseHTTPRequestHandler, resp: requests.Response | None) -> None:
        assert resp is not None and resp.status_code == 200
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(resp.content)))
        handler.end_headers()
        handler.wfile.write(resp.content[: len(resp.content) // 2])
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)

    front.faults.append(Fault(is_layer_get(layer.digest), break_off, forward_first=True))
    assert pull_all(front.ref(pushed), tmp_path / "out") == open_image(parse_reference(busybox_image)).digest
    gets = [rng for m, p, rng in front.seen if is_layer_get(layer.digest)(m, p)]
    assert gets[0] is None and gets[1] is not None and gets[1].startswith("bytes=")
    assert int(gets[1].removeprefix("bytes=").rstrip("-")) > 0


def _fail_third_patch(front: Front, forward_first: bool) -> None:
    front.faults.append(Fault(lambda m, p: m == "PATCH" and sum(x == "PATCH" for x, _, _ in front.seen) == 3,
                              unavailable, forward_first=forward_first))


def test_a_chunk_that_did_not_arrive_is_resent_from_what_the_registry_holds(
    front: Front, busybox_image: str, repository_name: str
) -> None:
    _fail_third_patch(front, forward_first=False)  # the 3rd chunk never reaches the registry
    ref = front.ref(repository_name)
    dest = RegistryDestination(parse_reference(ref), TransportOptions(), chunk_size=128 << 10)
    result = write_image(open_image(parse_reference(busybox_image)), dest)
    assert front.faults[0].hits == 1
    statuses = [p for m, p, _ in front.seen if m == "GET" and "/blobs/uploads/" in p]
    assert statuses, "the client asked the registry how much of the upload it holds"
    assert result.digest == open_image(parse_reference(busybox_image)).digest
    out = skopeo("inspect", "--tls-verify=false", ref, check=False)
    assert out.returncode == 0, out.stderr
    assert result.digest in out.stdout


def test_a_chunk_whose_answer_was_lost_is_a_clean_network_error_and_moves_no_tag(
    front: Front, registry: Registry, busybox_image: str, repository_name: str
) -> None:
    # The 3rd chunk reaches the registry but its answer is lost: distribution's upload URL (with the offset it
    # signed) is then stale and the upload cannot be resumed; the copy must stop cleanly, with no tag.
    _fail_third_patch(front, forward_first=True)
    dest = RegistryDestination(parse_reference(front.ref(repository_name)), TransportOptions(),
                               chunk_size=128 << 10)
    with pytest.raises(NetworkError, match="run the copy again"):
        write_image(open_image(parse_reference(busybox_image)), dest)
    assert registry.tags(repository_name) == []


def test_a_schema1_manifest_is_refused_as_unsupported(front: Front, pushed: str) -> None:
    schema1 = json.dumps({"schemaVersion": 1, "name": pushed, "tag": "v1", "architecture": "amd64",
                          "fsLayers": [], "history": [], "signatures": []}).encode()

    def old_manifest(handler: BaseHTTPRequestHandler, _: requests.Response | None) -> None:
        handler.reply(200, schema1, {  # type: ignore[attr-defined]
            "Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"})

    front.faults.append(Fault(is_manifest_get, old_manifest))
    with pytest.raises(UnsupportedError, match="schema 1"):
        open_image(parse_reference(front.ref(pushed)))


def test_a_manifest_that_does_not_match_its_announced_digest_is_refused(front: Front, pushed: str) -> None:
    def wrong_digest(handler: BaseHTTPRequestHandler, resp: requests.Response | None) -> None:
        assert resp is not None
        headers = dict(resp.headers)
        headers["Docker-Content-Digest"] = "sha256:" + "0" * 64
        handler.reply(resp.status_code, resp.content, headers)  # type: ignore[attr-defined]

    front.faults.append(Fault(is_manifest_get, wrong_digest, forward_first=True))
    with pytest.raises(IntegrityError, match="registry announced sha256:0000"):
        open_image(parse_reference(front.ref(pushed)))
