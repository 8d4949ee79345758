"""Tokens and keys for the authorization tests, minted with PyJWT, and a JWKS server.

Also the hostile tokens PyJWT will not mint: ``alg: none`` and an HS256 token
whose secret is an RSA public key (algorithm confusion), built by hand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support.redis_server import free_port

SECRET = "s3cret-for-tests-only-" + "x" * 42  # 64 bytes: HS256, HS384 and HS512
AUDIENCE = "broker-tests"
ISSUER = "https://issuer.test"
JWT_SETTINGS = {
    "BROKER_JWT_SECRET": SECRET,
    "BROKER_JWT_AUDIENCE": AUDIENCE,
    "BROKER_JWT_ISSUER": ISSUER,
}
"""A broker's settings for the tokens made here (``hs_token(claims(...))``)."""


def claims(
    publish: list[str] | None = None,
    subscribe: list[str] | None = None,
    *,
    expires_in: float = 600,
    **extra: Any,
) -> dict[str, Any]:
    rights = {"publish": publish or [], "subscribe": subscribe or []}
    return {"exp": int(time.time() + expires_in), "aud": AUDIENCE, "iss": ISSUER} | {
        "broker": rights
    } | extra  # fmt: skip


def hs_token(payload: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=algorithm)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(payload: dict[str, Any], header: dict[str, Any]) -> str:
    """``header.payload.`` with no signature (``alg: none``)."""
    return f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(payload))}."


def confused_token(payload: dict[str, Any], public_pem: bytes) -> str:
    """HS256 over the token, keyed with the public key's PEM: the classic confusion."""
    signing_input = (
        f"{_b64(orjson.dumps({'alg': 'HS256', 'typ': 'JWT'}))}.{_b64(orjson.dumps(payload))}"
    )
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@dataclass
class KeyPair:
    """An asymmetric key, with its public half as PEM and as a JWK."""

    private: Any
    algorithm: str
    kid: str

    @classmethod
    def rsa(cls, kid: str = "rsa-1") -> KeyPair:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", kid)

    @classmethod
    def ec(cls, kid: str = "ec-1") -> KeyPair:
        return cls(ec.generate_private_key(ec.SECP256R1()), "ES256", kid)

    @property
    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.algorithm)
        return orjson.loads(algorithm.to_jwk(self.private.public_key())) | {
            "kid": self.kid,
            "use": "sig",
        }

    def token(self, payload: dict[str, Any], *, kid: str | None = "") -> str:
        """Signed with this key; ``kid`` "" means this key's own kid, None no kid."""
        headers = {} if kid is None else {"kid": kid or self.kid}
        return jwt.encode(payload, self.private, algorithm=self.algorithm, headers=headers)


@dataclass
class JwksServer:
    """A JWKS document served on 127.0.0.1, counting its fetches."""

    keys: list[KeyPair]
    fetches: int = 0
    drip_seconds: float = 0.0
    """When set, the answer, head and document, is sent a byte at a time, this long
    apart (for at most DRIP_FOR_SECONDS: then the connection closes, unfinished)."""
    scheme: str = "http"
    redirect_to: str | None = None
    """When set, every fetch is answered with a redirect (302) to this URL instead."""
    redirects: int = 0
    failing: bool = False
    """When set, every fetch is answered 503 (a key server down, or blocked on the way)."""
    failures: int = 0
    last_served_at: float | None = None
    """When (``time.monotonic()``) a document was last served: the broker's last good fetch."""
    _server: http.server.ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"{self.scheme}://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"

    def document(self) -> bytes:
        with self._lock:
            self.fetches += 1
            self.last_served_at = time.monotonic()
            return orjson.dumps({"keys": [key.jwk() for key in self.keys]})

    def refuses(self) -> bool:
        """Whether this fetch fails (counted), as ``failing`` says."""
        with self._lock:
            if self.failing:
                self.failures += 1
            return self.failing

    def failure_count(self) -> int:
        with self._lock:
            return self.failures

    def set_keys(self, keys: list[KeyPair]) -> None:
        with self._lock:
            self.keys = keys

    def fetch_count(self) -> int:
        with self._lock:
            return self.fetches

    def redirect_count(self) -> int:
        with self._lock:
            return self.redirects

    def redirect(self) -> str | None:
        """Where this fetch is sent instead (counted), if anywhere."""
        with self._lock:
            if self.redirect_to is not None:
                self.redirects += 1
            return self.redirect_to


DRIP_FOR_SECONDS = 10.0


@contextmanager
def serve_jwks(keys: list[KeyPair], tls: ssl.SSLContext | None = None) -> Iterator[JwksServer]:
    """The set served on 127.0.0.1 (over TLS with ``tls``, a server context)."""
    jwks = JwksServer(keys, scheme="https" if tls else "http")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if jwks.refuses():
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            location = jwks.redirect()
            if location is not None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = jwks.document()
            if not jwks.drip_seconds:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            answer = head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            until = time.monotonic() + DRIP_FOR_SECONDS
            for n in range(len(answer)):  # (its head too: a client may time reads only)
                if time.monotonic() > until:
                    return
                try:
                    self.wfile.write(answer[n : n + 1])
                    self.wfile.flush()
                except OSError:  # the client gave up on it
                    return
                time.sleep(jwks.drip_seconds)  # (a slow server, on purpose)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    # (a port of the run's TEST_PORT_RANGE, when one is set: the machine is shared)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    jwks._server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield jwks
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
