"""TLS of the docker:// transport against a real registry serving HTTPS on 127.0.0.1 with its own CA:
verification by default (no silent fall-back to plain HTTP), ``cert_dir`` for the CA, ``tls_verify=False``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from infra.procs import die_with_parent, free_port, log_tail, stop_process, wait_until

from sconify.errors import NetworkError
from sconify.image.copy import write_image
from sconify.image.reference import parse_reference
from sconify.image.transports import TransportOptions, open_image
from sconify.image.transports.registry import RegistryDestination

pytestmark = pytest.mark.registry


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA certificate and a server certificate for 127.0.0.1 signed by it: (ca.crt, server.crt, server.key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("sconify test CA")).issuer_name(_name("sconify test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem(key))
    return paths


@dataclass
class TlsRegistry:
    host: str
    ca: Path
    proc: subprocess.Popen

    def ref(self, repository: str, tag: str = "v1") -> str:
        return f"docker://{self.host}/{repository}:{tag}"


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRegistry]:
    """Debian's docker-registry serving HTTPS only, with a certificate from a CA the system does not trust."""
    work = tmp_path_factory.mktemp("registry-tls")
    ca, cert, key = make_ca_and_server_cert(work / "pki")
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {"filesystem": {"rootdirectory": str(work / "storage")}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16),
                 "tls": {"certificate": str(cert), "key": str(key)}},
    }
    (work / "config.yml").write_text(json.dumps(config))
    log = open(work / "registry.log", "ab")  # noqa: SIM115 - closed after the registry stops
    proc = subprocess.Popen(["docker-registry", "serve", str(work / "config.yml")], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def answers() -> bool:
        try:
            return requests.get(f"https://127.0.0.1:{port}/v2/", verify=str(ca), timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        if not wait_until(answers, 10.0, proc):
            pytest.fail(f"the TLS registry did not start:\n{log_tail(work / 'registry.log')}", pytrace=False)
        yield TlsRegistry(f"127.0.0.1:{port}", ca, proc)
    finally:
        stop_process(proc, grace=5)
        log.close()


def test_an_unknown_ca_is_refused_even_on_loopback(tls_registry: TlsRegistry, busybox_image: str) -> None:
    dest = RegistryDestination(parse_reference(tls_registry.ref("tls/refused")))
    with pytest.raises(NetworkError, match="TLS .*certificate verification failed.*--no-tls-verify"):
        write_image(open_image(parse_reference(busybox_image)), dest)


def test_cert_dir_adds_the_ca_and_https_is_used(tls_registry: TlsRegistry, busybox_image: str, tmp_path: Path,
                                                ) -> None:
    certs = tmp_path / "certs.d"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(tls_registry.ca.read_bytes())
    options = TransportOptions(cert_dir=str(certs))
    dest = RegistryDestination(parse_reference(tls_registry.ref("tls/trusted")), options)
    result = write_image(open_image(parse_reference(busybox_image)), dest)
    assert dest.client.base == f"https://{tls_registry.host}"
    image = open_image(parse_reference(tls_registry.ref("tls/trusted")), options=options)
    assert image.digest == result.digest


def test_tls_verify_false_skips_verification(tls_registry: TlsRegistry, busybox_image: str) -> None:
    options = TransportOptions(tls_verify=False)
    dest = RegistryDestination(parse_reference(tls_registry.ref("tls/unverified")), options)
    result = write_image(open_image(parse_reference(busybox_image)), dest)
    assert dest.client.base == f"https://{tls_registry.host}"  # still TLS, just not verified
    assert open_image(parse_reference(tls_registry.ref("tls/unverified")), options=options).digest == result.digest
