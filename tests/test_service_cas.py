"""Policy upload to a CAS: ``POST /v1/sessions`` over TLS with a client certificate, against a real TLS server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_service_support import CertificateSet, TinyCas

from sconify.errors import NetworkError
from sconify.service.cas import upload_session
from sconify.service.config import Cas

SESSION = b"name: app\nversion: '0.3.10'\nservices:\n- name: app\n  mrenclaves: ['00']\n"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    return CertificateSet(tmp_path_factory.mktemp("cas-certs"))


@pytest.fixture
def cas(certs: CertificateSet) -> Iterator[TinyCas]:
    server = TinyCas(certs)
    yield server
    server.stop()


@pytest.fixture
def session_file(tmp_path: Path) -> Path:
    path = tmp_path / "session.yml"
    path.write_bytes(SESSION)
    path.chmod(0o600)
    return path


def test_the_session_reaches_the_cas_with_the_client_certificate(cas: TinyCas, certs: CertificateSet,
                                                                 session_file: Path) -> None:
    config = Cas(cas.url, cert=str(certs.client_cert), key=str(certs.client_key), ca=str(certs.ca), timeout=5)
    assert upload_session(config, session_file) == "created"
    assert len(cas.sessions) == 1
    assert cas.sessions[0]["body"] == SESSION
    assert cas.sessions[0]["client"] == "sconify-service"
    assert cas.sessions[0]["content_type"] == "application/yaml"


def test_without_a_client_certificate_the_upload_fails(cas: TinyCas, certs: CertificateSet,
                                                        session_file: Path) -> None:
    with pytest.raises(NetworkError, match="CAS"):
        upload_session(Cas(cas.url, ca=str(certs.ca), timeout=5), session_file)
    assert cas.sessions == []


def test_a_client_certificate_from_another_ca_is_refused(cas: TinyCas, certs: CertificateSet, session_file: Path,
                                                          tmp_path: Path) -> None:
    rogue = CertificateSet(tmp_path / "rogue")
    config = Cas(cas.url, cert=str(rogue.client_cert), key=str(rogue.client_key), ca=str(certs.ca), timeout=5)
    with pytest.raises(NetworkError):
        upload_session(config, session_file)
    assert cas.sessions == []


def test_a_cas_with_an_unknown_certificate_is_not_trusted(cas: TinyCas, certs: CertificateSet, session_file: Path,
                                                          tmp_path: Path) -> None:
    other = CertificateSet(tmp_path / "other")
    config = Cas(cas.url, cert=str(certs.client_cert), key=str(certs.client_key), ca=str(other.ca), timeout=5)
    with pytest.raises(NetworkError, match="TLS"):
        upload_session(config, session_file)
    assert cas.sessions == []


@pytest.mark.parametrize(("status", "outcome"), [(409, "exists"), (500, None), (403, None)])
def test_cas_answers(certs: CertificateSet, session_file: Path, status: int, outcome: str | None) -> None:
    server = TinyCas(certs, status=status)
    try:
        config = Cas(server.url, cert=str(certs.client_cert), key=str(certs.client_key), ca=str(certs.ca), timeout=5)
        if outcome is None:
            with pytest.raises(NetworkError, match=f"HTTP {status}"):
                upload_session(config, session_file)
        else:
            assert upload_session(config, session_file) == outcome
    finally:
        server.stop()
