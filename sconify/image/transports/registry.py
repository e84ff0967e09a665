"""The ``docker://`` transport: images in a registry, read and written over the OCI distribution API."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode, urljoin

import requests
import urllib3
from oras.utils import append_url_params
from requests.adapters import HTTPAdapter

from sconify import __version__
from sconify.errors import (
    AuthError,
    DestinationError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    SconifyError,
    UsageError,
)
from sconify.image import mediatypes as mt
from sconify.image.model import Descriptor, Image, Platform, Readable, check_digest
from sconify.image.reference import DOCKER, Reference
from sconify.image.streams import CHUNK
from sconify.image.transports import TransportOptions
from sconify.image.transports.base import MAX_DOCUMENT, read_limited, resolve_image
from sconify.image.transports.registry_auth import (
    Authenticator,
    _reason,
    error_summary,
    find_credentials,
)

log = logging.getLogger(__name__)

# Uploads go in chunks of this size (one PATCH each); a chunk is the most a blob upload holds in memory.
UPLOAD_CHUNK = 16 << 20
# Socket read and send size: big blocks keep the per-block Python cost small at loopback speeds.
BLOCK = 4 * CHUNK
ATTEMPTS = 4  # tries for one request that fails transiently (connection reset, 5xx, 429)
BACKOFF = (0.2, 0.5, 1.0)  # seconds before the 2nd, 3rd and 4th try
MAX_RETRY_AFTER = 5.0
RESUMES = 3  # reconnections of one blob download that broke off
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
TIMEOUT = (10.0, 300.0)  # connect, read; a registry may take long to commit a big blob
PING_TIMEOUT = (10.0, 30.0)
SCHEMA1_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
)
# Schema 1 is accepted only so that it can be refused with a clear message rather than a 404.
MANIFEST_ACCEPT = ", ".join(
    [mt.OCI_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST, mt.DOCKER_LIST, *(f"{t};q=0.1" for t in SCHEMA1_TYPES)]
)


def is_loopback(registry: str) -> bool:
    """Whether a registry host (``host[:port]``) is on this machine: 127.0.0.0/8, ::1 or localhost."""
    host = registry
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_host(registry: str) -> str:
    """The host that serves a registry's API (Docker Hub's is not ``docker.io`` itself)."""
    return "registry-1.docker.io" if registry == "docker.io" else registry


def tls_context(cert_dir: str | None, verify: bool) -> ssl.SSLContext:
    """A TLS context like skopeo's ``--cert-dir``: system CAs plus ``*.crt`` from the directory, and client
    certificates from its ``*.cert``/``*.key`` pairs."""
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_dir:
        root = Path(cert_dir)
        if not root.is_dir():
            raise UsageError(f"the certificate directory {cert_dir!r} does not exist; give a directory with *.crt, "
                             "*.cert and *.key files.")
        try:
            for ca in sorted(root.glob("*.crt")):
                ctx.load_verify_locations(cafile=str(ca))
            for cert in sorted(root.glob("*.cert")):
                key = cert.with_suffix(".key")
                if not key.is_file():
                    raise UsageError(f"client certificate {str(cert)!r} has no key {key.name!r} beside it; add it.")
                ctx.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as exc:
            raise UsageError(f"cannot load the certificates in {cert_dir!r} ({exc}); check the files.") from None
    return ctx


class _RegistryAdapter(HTTPAdapter):
    """An HTTP adapter with our TLS contexts (verified or not), big socket blocks and no retries of its own."""

    def __init__(self, cert_dir: str | None) -> None:
        self._verified = tls_context(cert_dir, verify=True)
        self._unverified = tls_context(cert_dir, verify=False)
        super().__init__(pool_connections=4, pool_maxsize=16, max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        pool_kwargs["blocksize"] = BLOCK
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def build_connection_pool_key_attributes(self, request: Any, verify: Any, cert: Any = None) -> Any:
        host, pool = super().build_connection_pool_key_attributes(request, verify, None)
        if host.get("scheme") == "https":
            for key in ("ca_certs", "ca_cert_dir", "cert_file", "key_file"):
                pool.pop(key, None)
            pool["ssl_context"] = self._verified if verify else self._unverified
            pool["cert_reqs"] = "CERT_REQUIRED" if verify else "CERT_NONE"
        return host, pool

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # Trust comes from our SSL contexts; only say whether the peer must be verified.
        conn.cert_reqs = "CERT_REQUIRED" if verify else "CERT_NONE"
        conn.ca_certs = conn.ca_cert_dir = None


class _NoNetrc(requests.auth.AuthBase):
    """Keeps requests from adding ``~/.netrc`` credentials: sconify sends its own Authorization headers."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


class _Pieces:
    """A request body held as a list of byte blocks: sent block by block without joining them, and replayable
    (from any offset) when a request has to be repeated."""

    def __init__(self, blocks: list[bytes], skip: int = 0) -> None:
        self.blocks = blocks
        self.skip = skip
        self.total = sum(len(b) for b in blocks)

    def __len__(self) -> int:
        return self.total - self.skip

    def __iter__(self) -> Iterator[bytes | memoryview]:
        skip = self.skip
        for block in self.blocks:
            if skip >= len(block):
                skip -= len(block)
                continue
            yield memoryview(block)[skip:] if skip else block
            skip = 0

    def tail(self, skip: int) -> _Pieces:
        """The same body without its first ``skip`` bytes."""
        return _Pieces(self.blocks, self.skip + skip)


class _ChunkBuffer:
    """Collects writes of any size into blocks of about BLOCK bytes, for a chunk upload."""

    def __init__(self) -> None:
        self.blocks: list[bytes] = []
        self._current = bytearray()
        self.size = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if not self._current and len(data) >= BLOCK:
            self.blocks.append(bytes(data))
            return
        self._current += data
        if len(self._current) >= BLOCK:
            self.blocks.append(bytes(self._current))
            self._current = bytearray()

    def take(self) -> _Pieces:
        if self._current:
            self.blocks.append(bytes(self._current))
            self._current = bytearray()
        out = _Pieces(self.blocks)
        self.blocks, self.size = [], 0
        return out


class _StreamBody:
    """The next ``size`` bytes of a source stream as a request body: read block by block while they are sent,
    and kept until the request succeeds so that it can be repeated. ``last`` also reads to the end of the
    stream, so that a verifying reader checks the digest before the request completes."""

    def __init__(self, stream: Readable, size: int, last: bool, progress: Callable[[int], None] | None,
                 what: str) -> None:
        self._stream = stream
        self.size = size
        self._last = last
        self._progress = progress
        self._what = what
        self._blocks: list[bytes] = []
        self._have = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        yield from list(self._blocks)  # a repeated request first sends what was already read
        while self._have < self.size:
            data = self._stream.read(min(BLOCK, self.size - self._have))
            if not data:
                raise IntegrityError(f"{self._what} ended early; the source is truncated.")
            self._blocks.append(data)
            self._have += len(data)
            if self._progress is not None:
                self._progress(len(data))
            yield data
        if self._last and self._stream.read(1):
            raise IntegrityError(f"{self._what} is longer than its descriptor declares; the source is corrupt.")

    def tail(self, skip: int) -> _Pieces | _StreamBody:
        """The body without its first ``skip`` bytes (reads the rest of the chunk into memory if needed)."""
        if skip == 0:
            return self
        for _ in self:
            pass
        return _Pieces(self._blocks, skip)


def _media_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    value = content_type.split(";", 1)[0].strip()
    return value if value in mt.MANIFESTS or value in mt.INDEXES or value in SCHEMA1_TYPES else None


def _digest_of(data: bytes, algorithm: str) -> str:
    hasher = hashlib.sha512() if algorithm == "sha512" else hashlib.sha256()
    hasher.update(data)
    return f"{algorithm}:{hasher.hexdigest()}"


@dataclass
class TransferStats:
    """What a destination did with blobs, for reports and tests: found, mounted, uploaded (and how)."""

    blobs_present: int = 0
    blobs_mounted: int = 0
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0
    chunks_uploaded: int = 0
    mounted: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


class RegistryClient:
    """HTTP access to one repository of one registry: scheme and TLS, auth, bounded retries, error mapping.

    The first request pings ``/v2/`` to choose HTTPS or (loopback or ``tls_verify=False`` only) plain HTTP and
    to learn the auth challenge; the session is shared by the threads that copy layers.
    """

    def __init__(self, registry: str, repository: str, options: TransportOptions, push: bool = False) -> None:
        self.registry = registry
        self.repository = repository
        self.push = push
        self.host = api_host(registry)
        self.options = options
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"sconify/{__version__}"
        if is_loopback(registry):
            self.session.trust_env = False  # no proxy for this machine's own registries
        else:
            self.session.auth = _NoNetrc()
        adapter = _RegistryAdapter(options.cert_dir)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.base: str | None = None
        self.verify = options.tls_verify is not False
        if options.tls_verify is False:
            # The user asked for it; urllib3 would otherwise warn on stderr at every request.
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            log.info("TLS certificates of registry %s are not verified (--no-tls-verify)", registry)
        self._ready = threading.Lock()
        self.auth = Authenticator(
            registry, self.session, lambda: find_credentials(registry, options.creds, options.authfile),
            lambda: self.verify,
        )

    @property
    def scopes(self) -> tuple[str, ...]:
        return (f"repository:{self.repository}:{'pull,push' if self.push else 'pull'}",)

    def url(self, path: str) -> str:
        self.ensure_ready()
        return f"{self.base}/v2/{self.repository}{path}"

    # -- transport --------------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        data: Any = None,
        stream: bool = False,
        retry: bool = True,
        timeout: tuple[float, float] = TIMEOUT,
        verify: bool | None = None,
    ) -> requests.Response:
        """One request with bounded retries of transient failures; connection failures become NetworkError."""
        attempts = ATTEMPTS if retry else 1
        for attempt in range(attempts):
            try:
                resp = self.session.request(
                    method, url, headers=headers, data=data, stream=stream, timeout=timeout,
                    verify=self.verify if verify is None else verify,
                )
            except requests.exceptions.SSLError as exc:
                raise _TLSError(f"the TLS connection to registry {self.registry} failed ({_reason(exc)}); trust its "
                                "CA certificate or, at your own risk, use --no-tls-verify.") from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt + 1 < attempts:
                    log.debug("%s %s failed (%s); retrying", method, url, exc)
                    time.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                    continue
                raise NetworkError(f"cannot reach registry {self.registry} ({_reason(exc)}); check that it runs "
                                   "and that the address is right.") from None
            except requests.RequestException as exc:
                raise NetworkError(f"a request to registry {self.registry} failed ({_reason(exc)}).") from None
            if resp.status_code in RETRY_STATUSES and attempt + 1 < attempts:
                delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                try:
                    delay = max(delay, min(float(resp.headers.get("Retry-After", 0)), MAX_RETRY_AFTER))
                except ValueError:
                    pass
                log.debug("%s %s answered %s; retrying in %.1f s", method, url, resp.status_code, delay)
                resp.close()
                time.sleep(delay)
                continue
            return resp
        raise AssertionError("unreachable")

    def ensure_ready(self) -> None:
        """Ping ``/v2/`` once: choose the scheme and learn the auth challenge."""
        if self.base is not None:
            return
        with self._ready:
            if self.base is not None:
                return
            loopback = is_loopback(self.registry)
            candidates: list[tuple[str, bool]]
            if self.options.tls_verify is False:
                candidates = [("https", False), ("http", False)]
            elif self.options.tls_verify is None and loopback:
                candidates = [("https", True), ("http", False)]
            else:
                candidates = [("https", True)]
            first: SconifyError | None = None
            for scheme, verify in candidates:
                url = f"{scheme}://{self.host}/v2/"
                try:
                    resp = self._send("GET", url, {}, timeout=PING_TIMEOUT, verify=verify)
                except _TLSError as exc:
                    first = first or exc
                    continue
                with resp:
                    if resp.status_code in (200, 401):
                        self.base, self.verify = f"{scheme}://{self.host}", verify
                        if resp.status_code == 401:
                            self.auth.learn(resp.headers.get("WWW-Authenticate"))
                        log.debug("registry %s speaks %s", self.registry, scheme)
                        return
                    first = first or NetworkError(
                        f"{scheme}://{self.host}/v2/ answered HTTP {resp.status_code} ({error_summary(resp)}); "
                        f"{self.registry} does not look like a container registry."
                    )
            assert first is not None
            raise first

    def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        data: Any = None,
        stream: bool = False,
        scopes: tuple[str, ...] | None = None,
        retry: bool = True,
    ) -> requests.Response:
        """A request with auth: answer the registry's 401 challenge once; a second 401 is an auth error."""
        self.ensure_ready()
        scopes = scopes or self.scopes
        for attempt in range(2):
            sent = dict(headers or {})
            authorization = self.auth.authorization(scopes)
            if authorization:
                sent["Authorization"] = authorization
            resp = self._send(method, url, sent, data, stream, retry)
            if resp.status_code != 401:
                return resp
            challenge = resp.headers.get("WWW-Authenticate")
            resp.close()
            self.auth.forget(scopes)
            if attempt == 0 and self.auth.learn(challenge):
                continue
            break
        raise self.auth.denied(self.repository, push=any(s.endswith("push") for s in scopes))

    def fail(self, resp: requests.Response, doing: str) -> SconifyError:
        """The error for an unexpected answer, with the registry's own message."""
        status = resp.status_code
        summary = error_summary(resp)
        resp.close()
        if status == 404:
            return NotFoundError(f"registry {self.registry} found nothing while {doing} ({summary}).")
        if status == 403:
            if self.push:
                return DestinationError(f"registry {self.registry} denied {doing} ({summary}); "
                                        "ask for push rights or choose another destination.")
            return AuthError(f"registry {self.registry} denied {doing} ({summary}); check your credentials.")
        if status < 500 and self.push:
            return DestinationError(f"registry {self.registry} refused {doing} with HTTP {status} ({summary}).")
        return NetworkError(f"registry {self.registry} failed {doing} with HTTP {status} ({summary}); "
                            "try again later.")

    # -- reading ------------------------------------------------------------------------------------------

    def get_manifest(self, reference: str, name: str, accept: str = MANIFEST_ACCEPT) -> requests.Response:
        """GET a manifest or index by tag or digest; a 404 is a NotFoundError naming ``name``."""
        resp = self.request("GET", self.url(f"/manifests/{reference}"), {"Accept": accept}, stream=True)
        if resp.status_code == 404:
            summary = error_summary(resp)
            resp.close()
            raise NotFoundError(f"{name} does not exist ({summary}); check the repository and the tag or digest.")
        if resp.status_code != 200:
            raise self.fail(resp, f"reading the manifest of {name}")
        return resp

    def read_manifest(self, reference: str, name: str, accept: str = MANIFEST_ACCEPT,
                      ) -> tuple[bytes, str | None, str | None]:
        """The exact bytes, media type and announced digest of a manifest or index."""
        with self.get_manifest(reference, name, accept) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_DOCUMENT:
                raise IntegrityError(f"the manifest of {name} is {length} bytes, more than {MAX_DOCUMENT}; "
                                     "that is not an image manifest.")
            parts, size = [], 0
            for part in resp.iter_content(CHUNK):
                parts.append(part)
                size += len(part)
                if size > MAX_DOCUMENT:
                    raise IntegrityError(f"the manifest of {name} is larger than {MAX_DOCUMENT} bytes; "
                                         "that is not an image manifest.")
            return b"".join(parts), _media_type(resp.headers.get("Content-Type")), \
                resp.headers.get("Docker-Content-Digest")

    def blob_response(self, digest: str, name: str, offset: int = 0) -> requests.Response:
        """GET a blob as a stream (following redirects to storage), from ``offset`` if not 0."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self.request("GET", self.url(f"/blobs/{digest}"), headers, stream=True)
        if resp.status_code == 404:
            resp.close()
            raise NotFoundError(f"blob {digest} is missing from {name}; the image in the registry is incomplete, "
                                "push it again.")
        if resp.status_code not in (200, 206):
            raise self.fail(resp, f"reading blob {digest} of {name}")
        return resp


class _TLSError(NetworkError):
    """A TLS handshake or certificate failure (the ping tries plain HTTP next on loopback)."""


class _BlobReader(io.RawIOBase):
    """The raw bytes of a blob from a registry; a download that breaks off resumes where it stopped."""

    def __init__(self, client: RegistryClient, desc: Descriptor, name: str) -> None:
        super().__init__()
        self._client = client
        self._desc = desc
        self._name = name
        self._offset = 0
        self._resumes = 0
        self._resp: requests.Response | None = client.blob_response(desc.digest, name)

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while part := self.read(CHUNK):
                parts.append(part)
            return b"".join(parts)
        while self._resp is not None:
            try:
                data = self._resp.raw.read(n, decode_content=False)
            except (urllib3.exceptions.HTTPError, OSError, requests.RequestException) as exc:
                self._resume(exc)
                continue
            if not data:
                self._resp.close()
                self._resp = None
            self._offset += len(data)
            return data
        return b""

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _resume(self, exc: BaseException) -> None:
        assert self._resp is not None
        self._resp.close()
        self._resp = None
        if self._resumes >= RESUMES:
            raise NetworkError(f"the download of blob {self._desc.digest} from registry {self._client.registry} "
                               f"broke off {self._resumes + 1} times ({_reason(exc)}); try again later.")
        log.debug("download of %s broke off at %d (%s); resuming", self._desc.digest, self._offset, exc)
        time.sleep(BACKOFF[min(self._resumes, len(BACKOFF) - 1)])
        self._resumes += 1
        resp = self._client.blob_response(self._desc.digest, self._name, self._offset)
        if resp.status_code == 206:
            if not (resp.headers.get("Content-Range") or "").startswith(f"bytes {self._offset}-"):
                resp.close()
                raise NetworkError(f"registry {self._client.registry} resumed blob {self._desc.digest} at the wrong "
                                   "offset; try again later.")
        else:  # the server ignores ranges: skip what we already have
            left = self._offset
            while left:
                skipped = resp.raw.read(min(left, CHUNK), decode_content=False)
                if not skipped:
                    break
                left -= len(skipped)
        self._resp = resp

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        super().close()


class RegistryBlobSource:
    """Blobs and documents of one repository in a registry (a BlobSource and DocumentStore).

    ``registry`` and ``repository`` tell a destination in the same registry that it can mount blobs from here.
    """

    def __init__(self, client: RegistryClient, name: str) -> None:
        self.client = client
        self.name = name
        self.registry = client.registry
        self.repository = client.repository

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        return _BlobReader(self.client, desc, self.name)  # type: ignore[return-value]

    def read_document(self, desc: Descriptor) -> bytes:
        if desc.size > MAX_DOCUMENT:
            raise IntegrityError(f"document {desc.digest} of {self.name} declares {desc.size} bytes, more than "
                                 f"{MAX_DOCUMENT}; that is not an image document.")
        with self.open_blob(desc) as f:
            return read_limited(f, f"document {desc.digest} of {self.name}")


def open_registry_image(ref: Reference, platform: Platform | None, options: TransportOptions | None = None) -> Image:
    """Open the image ``docker://REGISTRY/REPO[:TAG|@DIGEST]`` names, choosing ``platform`` from an index."""
    assert ref.transport == DOCKER and ref.registry and ref.repository
    options = options or TransportOptions()
    client = RegistryClient(ref.registry, ref.repository, options)
    name = str(ref)
    data, media_type, announced = client.read_manifest(ref.digest or ref.tag or "latest", name)
    expected = ref.digest or announced
    if expected:
        check_digest(expected, f"the digest the registry announced for {name}")
        actual = _digest_of(data, expected.split(":", 1)[0])
        if actual != expected:
            said = "the reference names" if ref.digest else "the registry announced"
            raise IntegrityError(f"the manifest of {name} has digest {actual} but {said} {expected}; "
                                 "the registry or the network corrupted it.")
    source = RegistryBlobSource(client, name)

    def fetch(desc: Descriptor) -> bytes:
        accept = ", ".join(dict.fromkeys([desc.media_type, *MANIFEST_ACCEPT.split(", ")]) if desc.media_type
                           else [MANIFEST_ACCEPT])
        return client.read_manifest(desc.digest, f"{name} (manifest {desc.digest})", accept)[0]

    return resolve_image(source, source, data, media_type, platform, name, fetch_manifest=fetch)


class _Upload:
    """One blob upload session: chunks PATCHed in order (resumed from the registry's ``Range`` after a
    failure), then a PUT with the digest."""

    def __init__(self, dest: RegistryDestination, url: str) -> None:
        self.dest = dest
        self.client = dest.client
        self.url = url
        self.offset = 0

    def _follow(self, resp: requests.Response) -> None:
        location = resp.headers.get("Location")
        if location:
            self.url = urljoin(self.url, location)

    def _status(self) -> int:
        """Ask the registry how many bytes of this upload it holds (its ``Range`` answer)."""
        resp = self.client.request("GET", self.url)
        with resp:
            if resp.status_code in (400, 404, 416):
                # e.g. distribution, whose upload URLs carry a signed offset that a lost answer leaves stale
                raise NetworkError(f"registry {self.client.registry} lost track of an upload to {self.dest.name} "
                                   f"after a failed request ({error_summary(resp)}); run the copy again (blobs "
                                   "already uploaded are skipped).")
            if resp.status_code not in (200, 204):
                raise self.client.fail(resp, f"resuming an upload to {self.dest.name}")
            self._follow(resp)
            return _range_end(resp) + 1

    def patch(self, body: _Pieces | _StreamBody) -> None:
        start, size = self.offset, len(body)
        sent = 0
        for attempt in range(ATTEMPTS):
            if sent == size:  # after a failure the registry turned out to hold the whole chunk
                break
            part = body.tail(sent)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start + sent}-{start + size - 1}",
                "Content-Length": str(len(part)),
            }
            try:
                resp = self.client.request("PATCH", self.url, headers, data=part, retry=False)
            except NetworkError:
                if attempt + 1 == ATTEMPTS:
                    raise
                time.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                sent = self._resync(start, size)
                continue
            if resp.status_code in RETRY_STATUSES or resp.status_code == 416:
                if attempt + 1 == ATTEMPTS:
                    raise self.client.fail(resp, f"uploading a chunk to {self.dest.name}")
                resp.close()
                time.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                sent = self._resync(start, size)
                continue
            if resp.status_code not in (202, 204):
                raise self.client.fail(resp, f"uploading a chunk to {self.dest.name}")
            with resp:
                self._follow(resp)
                held = _range_end(resp) + 1 if resp.headers.get("Range") else start + size
            if held != start + size:
                if not start <= held < start + size:
                    raise DestinationError(f"registry {self.client.registry} holds {held} bytes of an upload to "
                                           f"{self.dest.name} after {start + size} were sent; try again.")
                sent = held - start  # it kept only part of the chunk: send the rest
                continue
            self.dest.stats.add(bytes_uploaded=len(part))
            sent = size
        if sent == size:
            self.offset = start + size
            self.dest.stats.add(chunks_uploaded=1)
            return
        raise DestinationError(f"registry {self.client.registry} did not accept a chunk of an upload to "
                               f"{self.dest.name} after {ATTEMPTS} tries; try again later.")

    def _resync(self, start: int, size: int) -> int:
        held = self._status()
        if not start <= held <= start + size:
            raise DestinationError(f"registry {self.client.registry} lost part of an upload to {self.dest.name} "
                                   f"(it holds {held} bytes, {start} were confirmed); try again.")
        return held - start

    def finish(self, digest: str, body: _Pieces | _StreamBody | None = None) -> None:
        """Close the upload with its digest (and the whole blob as body for a one-request upload)."""
        url = append_url_params(self.url, {"digest": digest})
        if body is not None and not len(body):
            for _ in body:  # an empty blob: still let the verifying stream check it
                pass
            body = None
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body) if body else 0)}
        resp = self.client.request("PUT", url, headers, data=body if body else None)
        with resp:
            if resp.status_code in (200, 201, 204):
                announced = resp.headers.get("Docker-Content-Digest")
                if announced and announced != digest:
                    raise IntegrityError(f"registry {self.client.registry} stored blob {digest} as {announced}; "
                                         "the upload was corrupted, try again.")
                if body:
                    self.dest.stats.add(chunks_uploaded=1, bytes_uploaded=len(body))
                return
            summary = error_summary(resp)
            if resp.status_code == 404 and "BLOB_UPLOAD" in summary:
                raise NetworkError(f"registry {self.client.registry} lost track of an upload to {self.dest.name} "
                                   f"({summary}); run the copy again (blobs already uploaded are skipped).")
            if resp.status_code == 400 and "DIGEST_INVALID" in summary:
                raise IntegrityError(f"registry {self.client.registry} computed another digest than {digest} for "
                                     f"the blob uploaded to {self.dest.name}; the upload was corrupted, try again.")
            raise self.client.fail(resp, f"finishing the upload of blob {digest} to {self.dest.name}")

    def cancel(self) -> None:
        """Best effort: tell the registry to drop the unfinished upload."""
        try:
            self.client._send("DELETE", self.url, _auth_headers(self.client), retry=False).close()
        except SconifyError:
            pass


def _auth_headers(client: RegistryClient) -> dict[str, str]:
    try:
        value = client.auth.authorization(client.scopes)
    except SconifyError:
        return {}
    return {"Authorization": value} if value else {}


def _range_end(resp: requests.Response) -> int:
    """The last byte offset of a ``Range: 0-N`` answer (-1 for none held)."""
    value = (resp.headers.get("Range") or "").removeprefix("bytes=")
    _, dash, end = value.partition("-")
    if not dash or not end.strip().isdigit():
        return -1
    return int(end)


class _RegistryBlobWriter:
    """A blob streamed to the registry as it is written (chunk by chunk), hashed on the way; its digest is
    known at ``commit``."""

    def __init__(self, dest: RegistryDestination, media_type: str) -> None:
        self._dest = dest
        self._media_type = media_type
        self._hash = hashlib.sha256()
        self._size = 0
        self._buffer = _ChunkBuffer()
        self._upload: _Upload | None = None

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self._size += len(data)
        self._buffer.add(data)
        if self._buffer.size >= self._dest.chunk_size:
            if self._upload is None:
                self._upload = self._dest._start_upload()
            self._upload.patch(self._buffer.take())
        return len(data)

    def commit(self) -> Descriptor:
        desc = Descriptor(self._media_type, "sha256:" + self._hash.hexdigest(), self._size)
        try:
            if self._upload is None:
                if self._dest.has_blob(desc):
                    return desc
                self._upload = self._dest._start_upload()
                self._upload.finish(desc.digest, self._buffer.take())
            else:
                if self._buffer.size:
                    self._upload.patch(self._buffer.take())
                self._upload.finish(desc.digest)
        except BaseException:
            self.abort()
            raise
        self._dest._done(self._upload)
        self._dest.stats.add(blobs_uploaded=1)
        return desc

    def abort(self) -> None:
        if self._upload is not None:
            self._dest._done(self._upload)
            self._upload.cancel()
            self._upload = None


class RegistryDestination:
    """Writes one image into a registry repository: blobs first (skipped when present, mounted from another
    repository of the same registry, else uploaded in chunks), the manifest last, under the tag (or by digest).
    Nothing is tagged before ``commit``."""

    stages_locally = False  # upload chunks leave the machine as they are written
    accepted_compressions = frozenset({mt.GZIP, mt.ZSTD, mt.NONE})
    preferred_compression = mt.GZIP
    families: tuple[str, ...] = ("oci", "docker")

    def __init__(self, ref: Reference, options: TransportOptions | None = None, chunk_size: int = UPLOAD_CHUNK,
                 ) -> None:
        assert ref.transport == DOCKER and ref.registry and ref.repository
        if chunk_size < 1:
            raise UsageError(f"the upload chunk size must be positive, not {chunk_size}.")
        self.ref = ref
        self.name = str(ref)
        self.registry = ref.registry
        self.repository = ref.repository
        self.chunk_size = chunk_size
        self.client = RegistryClient(ref.registry, ref.repository, options or TransportOptions(), push=True)
        self.stats = TransferStats()
        self._manifest: tuple[bytes, str] | None = None
        self._open: set[_Upload] = set()
        self._lock = threading.Lock()

    # -- blobs --------------------------------------------------------------------------------------------

    def has_blob(self, desc: Descriptor) -> bool:
        resp = self.client.request("HEAD", self.client.url(f"/blobs/{desc.digest}"))
        with resp:
            if resp.status_code == 200:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) != desc.size:
                    log.warning("registry %s has blob %s with %s bytes, not %d; uploading it again",
                                self.registry, desc.digest, length, desc.size)
                    return False
                self.stats.add(blobs_present=1)
                return True
            if resp.status_code == 404:
                return False
            raise self.client.fail(resp, f"checking for blob {desc.digest} in {self.name}")

    def mount_blob(self, desc: Descriptor, source: object) -> bool:
        """Mount a blob from another repository of the same registry (no bytes move); False if not possible."""
        registry, repository = getattr(source, "registry", None), getattr(source, "repository", None)
        if registry != self.registry or not repository or repository == self.repository:
            return False
        query = urlencode({"mount": desc.digest, "from": repository})
        scopes = (*self.client.scopes, f"repository:{repository}:pull")
        try:
            resp = self.client.request("POST", self.client.url(f"/blobs/uploads/?{query}"),
                                       {"Content-Length": "0"}, scopes=scopes)
        except (AuthError, DestinationError) as exc:
            log.debug("cannot mount %s from %s: %s", desc.digest, repository, exc)
            return False
        with resp:
            if resp.status_code == 201:
                self.stats.add(blobs_mounted=1)
                with self.stats._lock:
                    self.stats.mounted.append(desc.digest)
                return True
            if resp.status_code == 202:  # the registry started a plain upload instead; drop it
                upload = _Upload(self, urljoin(resp.url, resp.headers.get("Location") or ""))
                if resp.headers.get("Location"):
                    upload.cancel()
                return False
            log.debug("mount of %s from %s answered HTTP %s", desc.digest, repository, resp.status_code)
            return False

    def _start_upload(self) -> _Upload:
        url = self.client.url("/blobs/uploads/")
        resp = self.client.request("POST", url, {"Content-Length": "0"})
        with resp:
            if resp.status_code not in (201, 202) or not resp.headers.get("Location"):
                raise self.client.fail(resp, f"starting an upload to {self.name}")
            upload = _Upload(self, urljoin(resp.url, resp.headers["Location"]))
        with self._lock:
            self._open.add(upload)
        return upload

    def _done(self, upload: _Upload) -> None:
        with self._lock:
            self._open.discard(upload)

    def put_blob(self, desc: Descriptor, stream: Readable, progress: Callable[[int], None] | None = None) -> None:
        """Upload a blob whose descriptor is known: one PUT when it fits in a chunk, else PATCHed chunks; each
        request body is read from the stream while it is sent."""
        what = f"blob {desc.digest} for {self.name}"
        upload = self._start_upload()
        try:
            if desc.size <= self.chunk_size:
                upload.finish(desc.digest, _StreamBody(stream, desc.size, True, progress, what))
            else:
                offset = 0
                while offset < desc.size:
                    size = min(self.chunk_size, desc.size - offset)
                    upload.patch(_StreamBody(stream, size, offset + size == desc.size, progress, what))
                    offset += size
                upload.finish(desc.digest)
        except BaseException:
            self._done(upload)
            upload.cancel()
            raise
        self._done(upload)
        self.stats.add(blobs_uploaded=1)

    def new_blob(self, media_type: str, size_hint: int | None = None) -> _RegistryBlobWriter:
        return _RegistryBlobWriter(self, media_type)  # uploads stream in chunks: the size needs no planning

    # -- manifests ----------------------------------------------------------------------------------------

    def push_manifest(self, data: bytes, media_type: str, reference: str) -> str:
        """PUT exact manifest bytes under a tag or digest now; returns their digest. ``put_manifest`` plus
        ``commit`` is the usual way; this one is for the manifests of an index, pushed by digest first."""
        digest = _digest_of(data, "sha256")
        resp = self.client.request("PUT", self.client.url(f"/manifests/{reference}"),
                                   {"Content-Type": media_type}, data=data)
        with resp:
            if resp.status_code in (200, 201, 202, 204):
                announced = resp.headers.get("Docker-Content-Digest")
                if announced and announced.startswith("sha256:") and announced != digest:
                    raise IntegrityError(f"registry {self.registry} stored the manifest of {self.name} as "
                                         f"{announced}, not {digest}; it changed the bytes.")
                return digest
            if resp.status_code == 400:
                raise DestinationError(f"registry {self.registry} refused the manifest of {self.name} "
                                       f"({error_summary(resp)}); it may not support {media_type}.")
            raise self.client.fail(resp, f"storing the manifest of {self.name}")

    def put_manifest(self, data: bytes, media_type: str, platform: Platform | None = None) -> None:
        """Keep the manifest for ``commit``, which stores it and moves the tag after every blob is present."""
        self._manifest = (bytes(data), media_type)

    def commit(self) -> str:
        if self._manifest is None:
            raise DestinationError(f"{self.name}: nothing was written (no manifest); this is a bug in sconify.")
        data, media_type = self._manifest
        digest = _digest_of(data, "sha256")
        if self.ref.digest:
            wanted = _digest_of(data, self.ref.digest.split(":", 1)[0])
            if wanted != self.ref.digest:
                raise DestinationError(f"{self.name} names digest {self.ref.digest} but the image written has "
                                       f"{wanted}; drop @DIGEST from the destination.")
        self.push_manifest(data, media_type, self.ref.tag or self.ref.digest or digest)
        where = f"docker://{self.registry}/{self.repository}"
        return where + (f":{self.ref.tag}" if self.ref.tag else "") + f"@{digest}"

    def abort(self) -> None:
        """Cancel unfinished uploads; no tag was moved (blobs already uploaded stay, as usual in registries)."""
        with self._lock:
            uploads, self._open = list(self._open), set()
        for upload in uploads:
            upload.cancel()
