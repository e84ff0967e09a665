"""Jobs files: the schema names the job and the field of each mistake; defaults, templates and relative paths; the
idempotency key changes with what changes the output and with nothing else, and never holds a key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from fixtures.builder import build_image
from sconify.batch.jobs import JobSpec, job_key, key_identities, load_jobs, parse_jobs, pin_source
from sconify.errors import KeyMaterialError, NotFoundError, UsageError


def _jobs(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobs.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("keys")
    (base / "fspf.key").write_text("ab" * 32 + "\n")
    (base / "other.key").write_text("cd" * 32 + "\n")
    for name in ("enc.pem", "enc2.pem"):
        subprocess.run([sys.executable, "-m", "sconify", "keys", "generate", "--enclave", str(base / name)],
                       check=True, capture_output=True)
    return base


def test_defaults_templates_and_relative_paths(tmp_path: Path) -> None:
    path = _jobs(tmp_path, """\
        version: 1
        defaults:
          destination: oci:out/{name}:conf
          fspf_key: keys/fspf.key
          encrypt: /app
          env: {MODE: prod, DEBUG: false}
          heap: 256M
        jobs:
          - name: web
            source: oci:images:web
          - source: docker://registry.example/vendor/api:2.1
            destination: docker://registry.example/confidential/api:2.1
            policy-out: /srv/policies/api
            encrypt: [/srv, /etc/api]
            command: "/usr/bin/api --port 80"
            env: ["A=1", "B=x=y"]
            threads: 8
            session: api-session
        """)
    parsed = load_jobs(path)
    web, api = parsed.specs
    base = tmp_path.resolve()
    assert web.name == "web"
    assert web.source == f"oci:{base}/images:web"
    assert web.destination == f"oci:{base}/out/web:conf"
    assert web.policy_out == str(base / "policies" / "web")
    assert web.fspf_key == str(base / "keys" / "fspf.key")
    assert web.encrypt == ("/app",)
    assert web.env == ("MODE=prod", "DEBUG=false")
    assert web.heap == "256M"
    # A job's own value replaces the default; the name comes from the source when not given.
    assert api.name == "api-2.1"
    assert api.destination == "docker://registry.example/confidential/api:2.1"
    assert api.policy_out == "/srv/policies/api"
    assert api.encrypt == ("/srv", "/etc/api")
    assert api.command == ("/usr/bin/api", "--port", "80")
    assert api.env == ("A=1", "B=x=y")
    options = api.convert_options()
    assert options.threads == 8 and options.session == "api-session" and options.heap == "256M"
    assert options.env == (("A", "1"), ("B", "x=y"))


def test_schema_errors_name_the_job_and_the_field(tmp_path: Path) -> None:
    path = _jobs(tmp_path, """\
        defaults:
          destination: oci:out/{name}
        jobs:
          - name: first
            source: oci:a
          - name: second
            source: oci:b
            threads: four
          - name: third
            source: oci:c
            encrpyt: /app
          - name: fourth
            dlopen: sometimes
        """)
    with pytest.raises(UsageError) as err:
        load_jobs(path)
    message = err.value.message
    assert "has 4 errors" in message
    assert "job 2 ('second'), field 'threads': 'four' is not of type 'integer'" in message
    assert "job 3 ('third'): unknown field 'encrpyt' (did you mean 'encrypt'?)" in message
    assert "job 4 ('fourth'): 'source' is missing" in message
    assert "job 4 ('fourth'), field 'dlopen': 'sometimes' is not one of off, protected, unprotected" in message
    assert "first" not in message


def test_semantic_errors_name_the_job(tmp_path: Path) -> None:
    path = _jobs(tmp_path, """\
        jobs:
          - name: a
            source: oci:x
            destination: oci:y
          - name: a
            source: oci:z
            destination: oci:w
          - name: b
            source: "ftp://host/image"
            destination: oci:v
          - name: c
            source: oci:u
        """)
    with pytest.raises(UsageError) as err:
        load_jobs(path)
    message = err.value.message
    assert "job 2 ('a'): the name is already used by job 1" in message
    assert "job 3 ('b'): unknown transport 'ftp'" in message
    assert "job 4 ('c'): no 'destination' is given" in message


def test_a_missing_or_broken_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        load_jobs(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match="not valid YAML at line 2"):
        load_jobs(_jobs(tmp_path, "jobs:\n  - name: a: b\n"))
    with pytest.raises(UsageError, match="must be a mapping with a 'jobs' list"):
        parse_jobs(["a"], tmp_path / "x.yaml")
    with pytest.raises(UsageError, match="unknown jobs file version 2"):
        parse_jobs({"version": 2, "jobs": [{"source": "oci:a", "destination": "oci:b"}]}, tmp_path / "x.yaml")


def test_spec_round_trips_through_json() -> None:
    spec = JobSpec(name="n", source="oci:/a:b", destination="oci:/c:d", policy_out="/p", encrypt=("/x",),
                   env=("A=1",), command=("a", "b"), threads=2, src_tls_verify=False,
                   source_digest="sha256:" + "0" * 64)
    assert JobSpec.from_json(spec.to_json()) == spec
    # Unknown fields (from a newer sconify) are ignored, not refused.
    assert JobSpec.from_json({**spec.to_json(), "colour": "blue"}) == spec


def _spec(keys: Path, **changes: object) -> JobSpec:
    spec = JobSpec(name="n", source="oci:/images:v1", destination="oci:/out/n:latest", policy_out="/policies/n",
                   fspf_key=str(keys / "fspf.key"), enclave_key=str(keys / "enc.pem"),
                   source_digest="sha256:" + "1" * 64)
    return replace(spec, **changes)  # type: ignore[arg-type]


def test_key_follows_what_changes_the_output(keys: Path) -> None:
    base = _spec(keys)
    key = job_key(base)
    assert job_key(_spec(keys)) == key
    assert job_key(replace(base, name="renamed")) == key  # the name is a label
    assert job_key(replace(base, src_authfile="/x/config.json")) == key  # credentials are not output
    changed = [
        replace(base, source_digest="sha256:" + "2" * 64),
        replace(base, encrypt=("/app",)),
        replace(base, heap="1G"),
        replace(base, destination="oci:/out/other:latest"),
        replace(base, policy_out="/policies/other"),
        replace(base, fspf_key=str(keys / "other.key")),
        replace(base, enclave_key=str(keys / "enc2.pem")),
        replace(base, enclave_key=None),
    ]
    keys_seen = {job_key(s) for s in changed}
    assert key not in keys_seen and len(keys_seen) == len(changed)


def test_key_identities_are_fingerprints_never_the_keys(keys: Path) -> None:
    ids = key_identities(_spec(keys))
    secret = (keys / "fspf.key").read_text().strip()
    assert ids["fspf"] and secret not in str(ids) and len(ids["fspf"]) == 32
    assert ids["enclave"] and len(ids["enclave"]) == 64  # MRSIGNER
    assert ids["sign"] is None
    assert key_identities(_spec(keys, fspf_key=None, enclave_key=None)) == {
        "fspf": "random", "enclave": "generated", "sign": None}
    with pytest.raises(KeyMaterialError):
        key_identities(_spec(keys, fspf_key=str(keys / "missing.key")))


def test_the_runtime_is_part_of_the_key(keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(keys)
    monkeypatch.setenv("SCONIFY_RUNTIME", "/usr/bin/busybox")
    first = job_key(spec)
    monkeypatch.setenv("SCONIFY_RUNTIME", sys.executable)
    assert job_key(spec) != first


def test_pin_source_resolves_a_tag_to_the_manifest_digest(tmp_path: Path) -> None:
    built = build_image("busybox-sh", tmp_path / "layout", "v1")
    spec = JobSpec(name="n", source=f"oci:{tmp_path / 'layout'}:v1", destination="oci:/o", policy_out="/p")
    assert pin_source(spec).source_digest == built.digest
    digest_ref = JobSpec(name="n", source="docker://registry.example/a@sha256:" + "3" * 64, destination="oci:/o",
                         policy_out="/p")
    assert pin_source(digest_ref).source_digest == "sha256:" + "3" * 64
    # A tag resolved to another digest is another job.
    other = build_image("busybox-sh", tmp_path / "layout", "v1", compression="none")
    assert other.digest != built.digest
    assert job_key(pin_source(spec), {}) != job_key(replace(spec, source_digest=built.digest), {})


def test_generated_secrets_tls_files_and_volumes_take_convert_s_flags(tmp_path: Path) -> None:
    pytest.importorskip("sconify.policy.secrets")
    path = _jobs(tmp_path, """\
        defaults:
          destination: oci:out/{name}
        jobs:
          - name: db
            source: oci:images:db
            secret: db_password=ascii:size=24
            volume: [data:/var/lib/db]
          - name: bad
            source: oci:images:db
            secret: "no kind here"
        """)
    with pytest.raises(UsageError) as err:
        load_jobs(path)
    assert "job 2 ('bad'):" in err.value.message and "job 1" not in err.value.message
    data = yaml.safe_load(path.read_text())
    data["jobs"].pop()
    spec = parse_jobs(data, path).specs[0]
    assert spec.secret == ("db_password=ascii:size=24",) and spec.volume == ("data:/var/lib/db",)
    secrets = spec.convert_options().service_secrets  # type: ignore[attr-defined]
    assert [s.name for s in secrets.secrets] == ["db_password"]
    assert job_key(spec, {}) != job_key(replace(spec, secret=()), {})
