"""Blob streaming: digest/size verification, compression detected from bytes, DiffID checks."""

import gzip
import hashlib
import io
import os
import subprocess
import zlib

import pytest
import zstandard

from sconify.errors import IntegrityError, UnsupportedError
from sconify.image import mediatypes as mt
from sconify.image.model import Descriptor
from sconify.image.streams import (
    DecompressingReader,
    GzipWriter,
    TarWriter,
    VerifyingReader,
    detect_compression,
    open_verified_blob,
    open_verified_tar,
)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BytesSource:
    name = "test-source"

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def open_blob(self, desc: Descriptor):
        return io.BytesIO(self.blobs[desc.digest])


def test_verifying_reader_passes_good_bytes():
    data = os.urandom(3 << 20)
    r = VerifyingReader(io.BytesIO(data), digest(data), len(data), "blob")
    assert r.read() == data


def test_verifying_reader_refuses_wrong_digest_at_the_end():
    data = b"x" * 1000
    r = VerifyingReader(io.BytesIO(data), digest(b"y" * 1000), 1000, "blob X")
    with pytest.raises(IntegrityError, match="blob X has digest"):
        r.read()


def test_verifying_reader_refuses_excess_bytes_early():
    data = b"x" * 5000
    r = VerifyingReader(io.BytesIO(data), digest(data), 100, "blob")
    with pytest.raises(IntegrityError, match="larger than the 100 bytes"):
        r.read(4096)


def test_verifying_reader_refuses_short_blob():
    data = b"x" * 50
    r = VerifyingReader(io.BytesIO(data), digest(data), 100, "blob")
    with pytest.raises(IntegrityError, match="has 50 bytes"):
        r.read()


def test_compression_is_detected_from_bytes_not_media_type():
    plain = b"hello" * 100
    assert detect_compression(gzip.compress(plain)) == mt.GZIP
    assert detect_compression(zstandard.ZstdCompressor().compress(plain)) == mt.ZSTD
    assert detect_compression(plain) == mt.NONE
    with pytest.raises(UnsupportedError):
        detect_compression(b"BZh91AY&SY")


@pytest.mark.parametrize("compress", [gzip.compress, lambda b: zstandard.ZstdCompressor().compress(b), lambda b: b])
def test_open_verified_tar_decompresses_and_checks_diff_id(compress):
    plain = os.urandom(1 << 20) + b"text" * 100000
    blob = compress(plain)
    desc = Descriptor(mt.OCI_LAYER_GZIP, digest(blob), len(blob))  # the label is deliberately not trusted
    with open_verified_tar(BytesSource({desc.digest: blob}), desc, digest(plain)) as tar:
        assert tar.read() == plain


def test_open_verified_tar_refuses_wrong_diff_id():
    plain = b"content" * 1000
    blob = gzip.compress(plain)
    desc = Descriptor(mt.OCI_LAYER_GZIP, digest(blob), len(blob))
    with pytest.raises(IntegrityError, match="DiffID"):
        open_verified_tar(BytesSource({desc.digest: blob}), desc, digest(b"other")).read()


def test_truncated_gzip_is_refused_even_when_the_digest_matches():
    plain = os.urandom(200000)
    blob = gzip.compress(plain)[:-100]  # a truncated stream whose descriptor was made after truncation
    with pytest.raises(IntegrityError, match="truncated gzip"):
        DecompressingReader(io.BytesIO(blob), "layer L").read()


def test_multi_member_gzip_is_read_whole():
    a, b = b"first" * 1000, b"second" * 1000
    blob = gzip.compress(a) + gzip.compress(b)
    assert DecompressingReader(io.BytesIO(blob), "layer").read() == a + b


def test_raw_copy_checks_diff_id_on_the_side():
    plain = b"layer bytes" * 10000
    blob = gzip.compress(plain)
    desc = Descriptor(mt.OCI_LAYER_GZIP, digest(blob), len(blob))
    source = BytesSource({desc.digest: blob})
    assert open_verified_blob(source, desc, digest(plain)).read() == blob
    with pytest.raises(IntegrityError, match="DiffID"):
        open_verified_blob(source, desc, digest(b"nope")).read()


def test_gzip_writer_is_deterministic_and_has_no_name_or_time():
    data = os.urandom(100000) + b"abc" * 50000
    outs = []
    for _ in range(2):
        buf = io.BytesIO()
        w = GzipWriter(buf)
        w.write(data)
        w.close()
        outs.append(buf.getvalue())
        assert w.diff_id == digest(data)
    assert outs[0] == outs[1]
    header = outs[0][:10]
    assert header[3] == 0  # no FNAME/FCOMMENT/FEXTRA flags
    assert header[4:8] == b"\0\0\0\0"  # mtime zero
    assert gzip.decompress(outs[0]) == data


def test_background_gzip_writer_gives_the_same_bytes_and_diff_id():
    data = [os.urandom(300000), b"text " * 200000, os.urandom(5)]
    outs = []
    for background in (False, True):
        buf = io.BytesIO()
        w = GzipWriter(buf, background=background)
        for part in data:
            w.write(part)
        w.close()
        outs.append((buf.getvalue(), w.diff_id, w.uncompressed_size))
    assert outs[0] == outs[1]
    assert gzip.decompress(outs[1][0]) == b"".join(data)


def test_background_gzip_writer_reports_a_failing_sink():
    class Full:
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

    w = GzipWriter(Full(), background=True)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(50):
            w.write(os.urandom(1 << 20))
        w.close()
    w.abandon()


def test_gzip_writer_stores_incompressible_bytes_in_one_ordinary_member():
    parts = [(b"text " * 50000, False), (os.urandom(300000), True), (b"x" * 10, False), (os.urandom(65535), True),
             (os.urandom(65536), True), (b"", True), (b"tail" * 1000, False)]
    data = b"".join(p for p, _ in parts)
    outs = []
    for background in (False, True):
        buf = io.BytesIO()
        w = GzipWriter(buf, background=background)
        for part, incompressible in parts:
            (w.write_incompressible if incompressible else w.write)(part)
        w.close()
        outs.append(buf.getvalue())
        assert w.diff_id == digest(data) and w.uncompressed_size == len(data)
    assert outs[0] == outs[1]
    blob = outs[0]
    assert gzip.decompress(blob) == data
    assert zlib.decompressobj(31).decompress(blob) == data
    assert subprocess.run(["gzip", "-dc"], input=blob, capture_output=True, check=True).stdout == data
    # the random parts are stored (a few bytes of framing per 64 KiB), the text is compressed
    random_bytes = 300000 + 65535 + 65536
    assert random_bytes < len(blob) < random_bytes + 2000


def test_gzip_writer_without_incompressible_writes_matches_a_plain_isal_member():
    from isal import isal_zlib

    data = b"abc" * 100000 + os.urandom(1000)
    buf = io.BytesIO()
    w = GzipWriter(buf)
    w.write(data)
    w.close()
    c = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    assert buf.getvalue() == c.compress(data) + c.flush()


def test_tar_writer_passes_bytes_through_and_leaves_the_diff_id_to_the_blob_digest():
    for background in (False, True):
        buf = io.BytesIO()
        w = TarWriter(buf, background=background)
        w.write(b"plain ")
        w.write_incompressible(b"cipher")
        w.close()
        assert buf.getvalue() == b"plain cipher" and w.diff_id is None and w.uncompressed_size == 12


@pytest.mark.parametrize("sink", [GzipWriter, TarWriter])
def test_a_sink_moved_to_a_thread_mid_stream_gives_the_same_bytes(sink: type) -> None:
    parts = [(b"text " * 30000, False), (os.urandom(200000), True), (b"more" * 5000, False), (os.urandom(70000), True)]
    outs = []
    for switch_at in (None, 0, 2):
        buf = io.BytesIO()
        w = sink(buf)
        for n, (part, incompressible) in enumerate(parts):
            if n == switch_at:
                w.go_background()  # from here on, a thread of its own does the work
            (w.write_incompressible if incompressible else w.write)(part)
        threaded = w._thread is not None
        w.close()
        assert threaded == (switch_at is not None)
        outs.append((buf.getvalue(), w.diff_id, w.uncompressed_size))
    assert outs[0] == outs[1] == outs[2]


def test_a_closed_sink_does_not_start_a_thread() -> None:
    w = TarWriter(io.BytesIO())
    w.write(b"x")
    w.close()
    w.go_background()
    assert w._thread is None


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_small_blob_that_inflates_hugely_is_read_in_bounded_memory(kind: str) -> None:
    import resource

    plain_size = 512 << 20  # zeros compress about a thousand to one
    if kind == "gzip":
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        blob = b"".join(c.compress(bytes(1 << 20)) for _ in range(plain_size >> 20)) + c.flush()
    else:
        z = zstandard.ZstdCompressor().compressobj()
        blob = b"".join(z.compress(bytes(1 << 20)) for _ in range(plain_size >> 20)) + z.flush()
    assert len(blob) < 2 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reader = DecompressingReader(io.BytesIO(blob), "layer")
    total = 0
    while chunk := reader.read(1 << 20):
        assert len(chunk) <= 1 << 20
        total += len(chunk)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert total == plain_size
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB while inflating"
