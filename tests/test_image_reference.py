"""Reference parsing in skopeo's transport syntax."""

import pytest

from sconify.errors import BadReferenceError
from sconify.image.reference import parse_reference


@pytest.mark.parametrize(
    ("text", "transport", "registry", "repository", "tag", "digest", "path"),
    [
        ("busybox", "docker", "docker.io", "library/busybox", "latest", None, None),
        ("busybox:1.36", "docker", "docker.io", "library/busybox", "1.36", None, None),
        ("docker://busybox", "docker", "docker.io", "library/busybox", "latest", None, None),
        ("127.0.0.1:5000/vendor/app:1.4", "docker", "127.0.0.1:5000", "vendor/app", "1.4", None, None),
        ("localhost/app", "docker", "localhost", "app", "latest", None, None),
        (
            "docker://quay.io/org/app@sha256:" + "a" * 64,
            "docker",
            "quay.io",
            "org/app",
            None,
            "sha256:" + "a" * 64,
            None,
        ),
        (
            "registry.example/app:v1@sha256:" + "b" * 64,
            "docker",
            "registry.example",
            "app",
            "v1",
            "sha256:" + "b" * 64,
            None,
        ),
        ("oci:/tmp/layout", "oci", None, None, None, None, "/tmp/layout"),
        ("oci:/tmp/layout:v2", "oci", None, None, "v2", None, "/tmp/layout"),
        ("oci:rel/dir:latest", "oci", None, None, "latest", None, "rel/dir"),
        ("oci-archive:/tmp/a.tar:x", "oci-archive", None, None, "x", None, "/tmp/a.tar"),
        ("docker-archive:/tmp/a.tar", "docker-archive", None, None, None, None, "/tmp/a.tar"),
        (
            "docker-archive:/tmp/a.tar:vendor/app:2",
            "docker-archive",
            "docker.io",
            "vendor/app",
            "2",
            None,
            "/tmp/a.tar",
        ),
        ("docker-daemon:app:1", "docker-daemon", "docker.io", "library/app", "1", None, None),
    ],
)
def test_parse_reference_accepts_skopeo_forms(text, transport, registry, repository, tag, digest, path):
    ref = parse_reference(text)
    assert (ref.transport, ref.registry, ref.repository, ref.tag, ref.digest, ref.path) == (
        transport,
        registry,
        repository,
        tag,
        digest,
        path,
    )


def test_reference_round_trips_through_its_string_form():
    for text in ["docker://127.0.0.1:5000/a/b:1", "oci:/x:t", "oci-archive:/y.tar", "docker-archive:/z.tar:@1"]:
        assert str(parse_reference(str(parse_reference(text)))) == str(parse_reference(text))


def test_docker_archive_index_form():
    assert parse_reference("docker-archive:/a.tar:@3").index == 3


def test_docker_name_uses_short_form_for_docker_hub():
    assert parse_reference("docker-daemon:app:1").docker_name == "app:1"
    assert parse_reference("127.0.0.1:5000/x/y:2").docker_name == "127.0.0.1:5000/x/y:2"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("dir:/tmp/x", "unknown transport 'dir'"),
        ("ftp://host/x", "unknown transport 'ftp'"),
        ("Upper/Case", "invalid repository name"),
        ("app@sha256:123", "malformed digest"),
        ("oci:", "names no path"),
        ("", "empty image reference"),
        ("app:bad tag", "invalid tag"),
        ("docker-archive:/a.tar:@x", "invalid image index"),
    ],
)
def test_bad_references_get_one_sentence_with_the_accepted_forms(text, fragment):
    with pytest.raises(BadReferenceError) as info:
        parse_reference(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 3
