"""A small bearer-token issuer for the test registry, following the distribution token spec.

It listens on 127.0.0.1 in a thread, checks HTTP basic credentials, and answers
``GET /token?service=...&scope=...`` with a JWT signed by an ECDSA P-256 key. The key's self-signed
certificate is the registry's ``rootcertbundle``; the JWT header names the key by its libtrust key id
(``kid``), which is what distribution 2.8 looks the key up by.

Policy, like a public registry's: a known user gets the requested actions that the user is allowed;
a request without credentials gets a token that grants nothing; wrong credentials get 401.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

ALL_ACTIONS = frozenset({"pull", "push", "delete", "*"})
TOKEN_LIFETIME = 300  # seconds; long enough for any test, short enough to look real


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The libtrust key id of a public key: base32 of the first 240 bits of SHA-256 of its DER
    SubjectPublicKeyInfo, in twelve groups of four characters joined by ':'."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Scope:
    """One requested or granted resource scope, e.g. ``repository:library/app:pull,push``."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        """Parse ``TYPE:NAME:ACTIONS``; the name may itself hold ':' (a host with a port)."""
        rtype, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        if not rtype or not name:
            raise ValueError(f"malformed scope {text!r}")
        return cls(rtype, name, tuple(a for a in actions.split(",") if a))

    def claim(self) -> dict:
        """The scope as an entry of the token's ``access`` claim."""
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class User:
    """An account of the issuer and the actions it may be granted on any resource."""

    password: str
    actions: frozenset[str] = ALL_ACTIONS


@dataclass(frozen=True)
class TokenRequest:
    """What the issuer saw and did, kept so that tests can check how a client asked."""

    account: str | None
    service: str
    requested: tuple[Scope, ...]
    granted: tuple[Scope, ...]
    status: int


@dataclass
class TokenIssuer:
    """A running token issuer; ``realm`` is its token URL, ``certificate_path`` the registry's trust root."""

    service: str
    issuer: str
    users: dict[str, User]
    workdir: Path
    realm: str = ""
    certificate_path: Path = field(default=Path())
    key_id: str = ""
    requests: list[TokenRequest] = field(default_factory=list)
    _key: ec.EllipticCurvePrivateKey | None = None
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> TokenIssuer:
        """Make the key and certificate, then serve on a free 127.0.0.1 port in a daemon thread."""
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.key_id = libtrust_key_id(self._key.public_key())
        self.certificate_path = self.workdir / "token-issuer.crt"
        self.certificate_path.write_bytes(self._self_signed_certificate().public_bytes(serialization.Encoding.PEM))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-issuer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def issue(self, account: str | None, scopes: list[Scope]) -> tuple[str, tuple[Scope, ...]]:
        """A signed token for ``account`` (None: anonymous) granting what it may have of ``scopes``."""
        allowed = self.users[account].actions if account is not None else frozenset()
        granted = []
        for scope in scopes:
            actions = tuple(a for a in scope.actions if a in allowed)
            if actions:
                granted.append(Scope(scope.type, scope.name, actions))
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account or "",
            "aud": self.service,
            "exp": now + TOKEN_LIFETIME,
            "nbf": now - 5,  # small slack for clock granularity between us and the registry
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": [s.claim() for s in granted],
        }
        return self._sign({"typ": "JWT", "alg": "ES256", "kid": self.key_id}, claims), tuple(granted)

    def _sign(self, header: dict, claims: dict) -> str:
        assert self._key is not None
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        # JWS ES256 wants the raw 64-byte r || s, not the DER encoding.
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def _self_signed_certificate(self) -> x509.Certificate:
        assert self._key is not None
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    def _authenticate(self, header: str | None) -> tuple[bool, str | None]:
        """(ok, account) for an Authorization header; no header is an anonymous, acceptable request."""
        if not header:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            username, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        user = self.users.get(username)
        if user is None or not secrets.compare_digest(user.password, password):
            return False, None
        return True, username

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self.requests.append(request)


def _handler_for(issuer: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sconify-test-token-issuer"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            if url.path != "/token":
                self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": "no such endpoint"}]})
                return
            query = parse_qs(url.query)
            service = query.get("service", [""])[0]
            try:
                scopes = [Scope.parse(s) for text in query.get("scope", []) for s in text.split(" ") if s]
            except ValueError as err:
                self._reply(400, {"errors": [{"code": "INVALID_SCOPE", "message": str(err)}]})
                return
            ok, account = issuer._authenticate(self.headers.get("Authorization"))
            if not ok or (service and service != issuer.service):
                status = 401 if not ok else 400
                issuer._record(TokenRequest(account, service, tuple(scopes), (), status))
                self._reply(
                    status,
                    {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                    {"WWW-Authenticate": f'Basic realm="{issuer.issuer}"'} if status == 401 else {},
                )
                return
            token, granted = issuer.issue(account, scopes)
            issuer._record(TokenRequest(account, service, tuple(scopes), granted, 200))
            issued_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._reply(
                200,
                {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME, "issued_at": issued_at},
            )

        def _reply(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # tests read issuer.requests instead of stderr chatter

    return Handler
