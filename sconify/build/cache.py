"""A local cache of per-layer conversion work: header scans by blob digest, and sealed layers by everything
that determines them (content, visibility, regions, key identity, chunk size, output format).

A source layer already processed with the same regions and key is not processed again, so base layers
shared by many images are sealed once and a change to the top layer redoes only that layer. The cache holds
ciphertext and chunk tags, never keys or plaintext of encrypted files; it lives in a 0700 directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sconify import __version__
from sconify.analyze.files import LayerHeaders
from sconify.image.model import Descriptor

log = logging.getLogger(__name__)

FORMAT = 1
CACHE_ENV = "SCONIFY_CACHE"


@dataclass(frozen=True)
class CachedLayer:
    """A layer's output as a previous conversion made it."""

    descriptor: Descriptor
    diff_id: str
    action: str
    records: tuple[Any, ...]
    executable: bytes | None
    blob: Path | None  # the sealed blob, for rewritten layers


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class LayerCache:
    """Both caches in one directory: ``headers/<digest>`` and ``layers/<key>/{meta,blob}``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("headers", "layers"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_env(cls) -> LayerCache | None:
        value = os.environ.get(CACHE_ENV)
        return cls(Path(value)) if value else None

    # -- header scans (the HeaderCache protocol of sconify.analyze.files) --------------------------------

    def _header_path(self, digest: str) -> Path:
        return self.root / "headers" / f"{FORMAT}-{digest.replace(':', '-')}"

    def get(self, digest: str) -> LayerHeaders | None:
        try:
            data = self._header_path(digest).read_bytes()
            return pickle.loads(data)  # noqa: S301 - a cache this user wrote, in a 0700 directory
        except FileNotFoundError:
            return None
        except Exception as exc:  # a damaged entry is a miss, not a failure
            log.warning("ignoring a damaged header cache entry for %s (%s)", digest, exc)
            return None

    def put(self, digest: str, headers: LayerHeaders) -> None:
        _atomic_write(self._header_path(digest), pickle.dumps(headers, protocol=pickle.HIGHEST_PROTOCOL))

    # -- sealed layers --------------------------------------------------------------------------------------

    @staticmethod
    def layer_key(parts: dict[str, Any]) -> str:
        text = json.dumps({"format": FORMAT, "sconify": __version__, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def lookup(self, key: str) -> CachedLayer | None:
        entry = self.root / "layers" / key
        try:
            meta = pickle.loads((entry / "meta").read_bytes())  # noqa: S301 - see get()
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception as exc:
            log.warning("ignoring a damaged layer cache entry %s (%s)", key, exc)
            self.misses += 1
            return None
        blob = entry / "blob"
        if meta["action"] == "rewritten":
            if not blob.is_file() or blob.stat().st_size != meta["descriptor"].size:
                self.misses += 1
                return None
        self.hits += 1
        return CachedLayer(meta["descriptor"], meta["diff_id"], meta["action"], meta["records"], meta["executable"],
                           blob if meta["action"] == "rewritten" else None)

    def store(self, key: str, layer: CachedLayer, blob_tmp: Path | None) -> None:
        entry = self.root / "layers" / key
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=self.root / "layers"))
        try:
            if blob_tmp is not None:
                os.replace(blob_tmp, staging / "blob")
            meta = {"descriptor": layer.descriptor, "diff_id": layer.diff_id, "action": layer.action,
                    "records": layer.records, "executable": layer.executable}
            (staging / "meta").write_bytes(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL))
            if entry.exists():
                shutil.rmtree(staging)
                return
            os.replace(staging, entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def spool(self) -> tuple[Path, BinaryIO]:
        """A temporary file in the cache for a blob being written."""
        fd, tmp = tempfile.mkstemp(prefix=".blob-", dir=self.root / "layers")
        return Path(tmp), os.fdopen(fd, "wb")
