"""The ``docker-daemon:NAME[:TAG]`` transport: images in a Docker engine, moved as docker-archives through the
Docker SDK (the engine's save streamed into an anonymous temporary file; a staged archive streamed into its load).

The SDK (not python-on-whales, which drives the docker CLI binary) talks to the engine's API directly, streams
both ways and reports a missing image as a typed error. It is imported only when a docker-daemon: reference is
used, so no conversion needs an engine otherwise. The engine is the one ``TransportOptions.daemon_host`` names,
else ``DOCKER_HOST`` (with ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH``), else the default socket.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sconify.errors import BadReferenceError, DestinationError, NetworkError, NotFoundError
from sconify.image.model import BlobSource, Descriptor, Image, Platform, Readable, parse_json_document
from sconify.image.reference import DOCKER_ARCHIVE, Reference
from sconify.image.transports.base import BlobWriter
from sconify.image.transports.docker_archive import (
    DockerArchiveDestination,
    DockerArchiveStore,
    open_archive_image,
    tar_stream,
)

if TYPE_CHECKING:
    from sconify.image.transports import TransportOptions

log = logging.getLogger(__name__)

DEFAULT_HOST = "unix:///var/run/docker.sock"
# Answering "version" takes an engine milliseconds; a save or load of a big image may take many minutes.
CONNECT_TIMEOUT = 30
TRANSFER_TIMEOUT = 3600


def daemon_host(options: TransportOptions | None) -> str:
    """The engine address used: the option, else ``DOCKER_HOST``, else the default unix socket."""
    return (options.daemon_host if options else None) or os.environ.get("DOCKER_HOST") or DEFAULT_HOST


def _reason(exc: BaseException) -> str:
    """A short cause for a failed connection: the innermost OS error if there is one."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, FileNotFoundError):
            return "no socket there"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, PermissionError):
            return "permission denied"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__
    return str(exc).split("\n", 1)[0][:200]


def _unreachable(host: str, exc: BaseException) -> NetworkError:
    return NetworkError(
        f"the Docker daemon at {host} is not reachable ({_reason(exc)}); start dockerd or set DOCKER_HOST "
        "to the socket of a running engine."
    )


def connect(options: TransportOptions | None) -> tuple[Any, str]:
    """A low-level Docker SDK client (``docker.APIClient``) of an engine that answered, and the engine's
    address; NetworkError if none answers."""
    import docker  # the SDK is needed only for docker-daemon: references

    host = daemon_host(options)
    kwargs: dict[str, Any] = {} if options and options.daemon_host else docker.utils.kwargs_from_env()
    kwargs["base_url"] = host
    try:
        api = docker.APIClient(version="auto", timeout=CONNECT_TIMEOUT, **kwargs)
    except docker.errors.DockerException as exc:
        raise _unreachable(host, exc) from None
    api.timeout = TRANSFER_TIMEOUT
    return api, host


def _api_errors(
    host: str, what: str, refused: Callable[[str], Exception]
) -> tuple[tuple[type[BaseException], ...], Callable[[BaseException], Exception]]:
    """The SDK exceptions worth translating and how: a missing image becomes NotFoundError, a lost
    connection NetworkError, any other answer of the engine ``refused(explanation)``."""
    import docker
    import requests

    def translate(exc: BaseException) -> Exception:
        if isinstance(exc, docker.errors.NotFound):
            return NotFoundError(f"{what} is not in the Docker daemon at {host}; pull, load or build it first.")
        if isinstance(exc, docker.errors.APIError):
            return refused(str(exc.explanation or exc).rstrip("."))
        return _unreachable(host, exc)

    return (docker.errors.DockerException, requests.exceptions.RequestException), translate  # type: ignore[return-value]


def open_daemon_image(ref: Reference, platform: Platform | None, options: TransportOptions | None) -> Image:
    """Open ``docker-daemon:NAME[:TAG]`` (or an image ID): the engine saves it into an anonymous temporary
    file, which is then read as a docker-archive (and deleted when the image is no longer used)."""
    name = str(ref)
    wanted = ref.docker_name or ref.digest
    assert wanted is not None
    api, host = connect(options)
    catch, translate = _api_errors(
        host, f"image {wanted}",
        lambda why: NetworkError(f"the Docker daemon at {host} could not save {wanted}: {why}."),
    )
    spool = tempfile.TemporaryFile(prefix="sconify-daemon-")  # noqa: SIM115 - the store owns it from here
    try:
        try:
            api.inspect_image(wanted)  # a clear "not found" before the save starts
            for chunk in api.get_image(wanted):
                spool.write(chunk)
        except catch as exc:
            raise translate(exc) from None
        spool.flush()
        spool.seek(0)
        store = DockerArchiveStore(Path(f"{host}#{wanted}"), name, fileobj=spool)
        return open_archive_image(store, Reference(DOCKER_ARCHIVE, path=store.name, index=0), platform, name)
    except BaseException:
        spool.close()
        raise
    finally:
        api.close()


class DaemonDestination:
    """Writes an image into a Docker engine: the blobs of a docker-archive are staged in a temporary directory
    and streamed as one archive into the engine's load on commit, then tagged as the reference says; nothing
    reaches the engine before that."""

    stages_locally = True  # the engine gets the archive at commit, never before
    accepted_compressions = DockerArchiveDestination.accepted_compressions
    preferred_compression = DockerArchiveDestination.preferred_compression
    families: tuple[str, ...] = DockerArchiveDestination.families

    def __init__(self, ref: Reference, options: TransportOptions | None = None) -> None:
        self.name = str(ref)
        if ref.repository is None or (ref.digest and not ref.tag):
            raise BadReferenceError(
                f"{self.name}: an image written into a Docker daemon needs a name, docker-daemon:NAME[:TAG]; "
                "an image ID or digest cannot name it."
            )
        self.ref = replace(ref, tag=ref.tag or "latest", digest=None)
        self._options = options
        connect(options)[0].close()  # fail before any work if there is no engine
        # Blobs are staged as for a docker-archive in a private temporary directory; the archive itself is
        # never written, it is streamed into the engine on commit.
        self._tmp = Path(tempfile.mkdtemp(prefix="sconify-daemon-"))
        archive_ref = Reference(
            DOCKER_ARCHIVE, path=str(self._tmp / "image.tar"), registry=self.ref.registry,
            repository=self.ref.repository, tag=self.ref.tag,
        )
        try:
            self._archive = DockerArchiveDestination(archive_ref)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._config: str | None = None

    def has_blob(self, desc: Descriptor) -> bool:
        return self._archive.has_blob(desc)

    def put_blob(self, desc: Descriptor, stream: Readable, progress: Callable[[int], None] | None = None) -> None:
        self._archive.put_blob(desc, stream, progress)

    def new_blob(self, media_type: str, size_hint: int | None = None) -> BlobWriter:
        return self._archive.new_blob(media_type, size_hint)

    def mount_blob(self, desc: Descriptor, source: BlobSource) -> bool:
        return False

    def put_manifest(self, data: bytes, media_type: str) -> None:
        self._archive.put_manifest(data, media_type)
        config = parse_json_document(data, f"the manifest written to {self.name}").get("config") or {}
        self._config = Descriptor.from_json(config, "the config descriptor").digest

    def commit(self) -> str:
        try:
            self._load(self._archive.stage())
        finally:
            self.abort()
        return f"docker-daemon:{self.ref.docker_name}"

    def _load(self, members: list[tuple[str, Path | None]]) -> None:
        """Stream the staged archive into the engine's load endpoint (no archive file is written), then tag."""
        api, host = connect(self._options)
        catch, translate = _api_errors(
            host, f"image {self.ref.docker_name}",
            lambda why: DestinationError(f"{self.name}: the Docker daemon at {host} refused the image: {why}."),
        )
        try:
            _check_load_output(api.load_image(tar_stream(members)), host, self.name)
            # The archive's RepoTags already name the image; tagging again makes the result independent of
            # how the engine treats RepoTags (and moves the tag if an older image had it).
            if self._config is not None:
                api.tag(self._config, self.ref.name, self.ref.tag, force=True)
        except catch as exc:
            raise translate(exc) from None
        finally:
            api.close()

    def abort(self) -> None:
        self._archive.abort()
        shutil.rmtree(self._tmp, ignore_errors=True)


def _check_load_output(messages: Iterable[Any], host: str, name: str) -> None:
    """Read the engine's progress messages of a load to the end; an error message becomes DestinationError."""
    for message in messages:
        if not isinstance(message, dict):
            continue
        detail = message.get("errorDetail") or {}
        error = message.get("error") or (detail.get("message") if isinstance(detail, dict) else None)
        if error:
            raise DestinationError(f"{name}: the Docker daemon at {host} refused the image: {error}.")
        if message.get("stream"):
            log.info("%s", str(message["stream"]).strip())

