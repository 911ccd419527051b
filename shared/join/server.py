"""The registrar over HTTPS: what a joining node (which has no bus identity yet) can reach.

A threaded `http.server` (standard library) under TLS with the control plane's server certificate; each
request is handed to the registrar on the control plane's event loop. Client certificates are optional at
the TLS layer and checked against the CA: a node's certificate authenticates its `/leave`, the operator's
(`admin`) its `/revoke`. Every body is bounded, parsed strictly, and refused with a `Refusal` (HTTP 4xx)
when it is wrong; nothing a client sends reaches a log line unbounded, and no error becomes a traceback
for the client.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from cryptography import x509
from pydantic import BaseModel, ValidationError

from shared.identity import Identity, Role
from shared.join.invites import JoinRefused
from shared.join.protocol import JoinProof, JoinRequest, Refusal, RevokeRequest
from shared.join.registrar import Registrar
from shared.pki import Pki
from shared.telemetry import get_logger

__all__ = ["JoinServer"]

log = get_logger("qvm.join.server")
MAX_BODY = 64 * 1024
_STATUS = {"token_unknown": 403, "token_used": 403, "token_expired": 403, "token_foreign": 403,
           "token_node_mismatch": 403, "token_invalid": 400, "activation_failed": 403, "node_exists": 409,
           "ek_reused": 409, "session_unknown": 404, "not_authorized": 403, "certificate_superseded": 403}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may stall any read, the TLS handshake included

    def setup(self) -> None:
        super().setup()
        assert isinstance(self.connection, ssl.SSLSocket)
        self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are logged by the registrar (structured); the base class would print to stderr."""

    def do_GET(self) -> None:
        if self.path == "/ca":
            self._send(200, self.server.pki.ca_cert.read_bytes(), "application/x-pem-file")
        else:
            self._refuse(404, "not_found", "no such resource")

    def do_POST(self) -> None:
        try:
            body = self._body()
            registrar = self.server.registrar
            result: BaseModel
            if self.path == "/join":
                result = self._call(registrar.begin(_parse(JoinRequest, body)))
            elif self.path == "/join/proof":
                result = self._call(registrar.finish(_parse(JoinProof, body)))
            elif self.path == "/leave":
                ident, serial = self._peer()
                result = self._call(registrar.leave(str(ident), serial))
            elif self.path == "/revoke":
                ident, _ = self._peer()
                if ident.role is not Role.ADMIN:
                    raise JoinRefused("not_authorized", "only the operator may revoke a node")
                req = _parse(RevokeRequest, body)
                result = self._call(registrar.withdraw(req.node_id, req.reason, req.detail))
            else:
                raise JoinRefused("not_found", "no such resource")
        except JoinRefused as exc:
            status = 404 if exc.reason == "not_found" else _STATUS.get(exc.reason, 422)
            log.info("join request refused", extra={"path": self.path[:64], "reason": exc.reason})
            self._refuse(status, exc.reason, exc.detail)
            return
        except Exception:  # a bug or the bus: the client learns only that, the log has the rest
            log.exception("join request failed", extra={"path": self.path[:64]})
            self._refuse(503, "unavailable", "the control plane could not complete this request; try again")
            return
        self._send(200, result.model_dump_json().encode(), "application/json")

    # ------------------------------------------------------------ helpers
    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise JoinRefused("malformed", "bad Content-Length") from None
        if not 0 <= length <= MAX_BODY:
            raise JoinRefused("too_large", f"a request is at most {MAX_BODY} bytes")
        return self.rfile.read(length)

    def _peer(self) -> tuple[Identity, int]:
        """The identity and serial of the verified client certificate, if one was presented."""
        assert isinstance(self.connection, ssl.SSLSocket)
        der = self.connection.getpeercert(binary_form=True)
        if not der:
            raise JoinRefused("not_authorized", "this request needs a client certificate from the platform's CA")
        cert = x509.load_der_x509_certificate(der)
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName)
            return Identity.parse(names[0]), cert.serial_number
        except (x509.ExtensionNotFound, IndexError, ValueError):
            raise JoinRefused("not_authorized", "the client certificate names no qvm identity") from None

    def _call(self, coro: Coroutine[Any, Any, BaseModel]) -> BaseModel:
        return asyncio.run_coroutine_threadsafe(coro, self.server.loop).result(timeout=60)

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        self._send(status, Refusal(reason=reason[:64], detail=detail[:1024]).model_dump_json().encode(),
                   "application/json")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(p) for p in first["loc"])
        raise JoinRefused("malformed", f"{where}: {first['msg']}"[:300]) from None
    except (ValueError, json.JSONDecodeError):
        raise JoinRefused("malformed", "the body is not JSON") from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], registrar: Registrar, pki: Pki, loop: asyncio.AbstractEventLoop
                 ) -> None:
        super().__init__(address, _Handler)
        self.registrar = registrar
        self.pki = pki
        self.loop = loop
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        ctx.load_verify_locations(pki.ca_cert)
        ctx.verify_mode = ssl.CERT_OPTIONAL  # a joining node has none yet; leave/revoke check theirs
        # The handshake happens on the request's thread (first read), not in accept(): a client that
        # stalls it cannot hold up everyone else.
        self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that breaks off its TLS handshake is not an error worth a traceback."""
        log.info("join connection dropped", extra={"client": str(client_address)[:64]})


class JoinServer:
    """`start()` serves on a thread until `stop()`; requests run on `loop` (the registrar's)."""

    def __init__(self, registrar: Registrar, pki: Pki, host: str, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self._server = _Server((host, port), registrar, pki, loop)
        self._thread = threading.Thread(target=self._server.serve_forever, name="qvm-join", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"https://{host if isinstance(host, str) else host.decode()}:{port}"

    def start(self) -> str:
        self._thread.start()
        return self.url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
