"""What every request passes before an endpoint sees it: host, origin, key, body size.

A local model server is reachable by every web page the user opens, through the browser:
- **DNS rebinding**: a page on ``evil.example`` whose name later resolves to 127.0.0.1
  reaches the server with ``Host: evil.example``; only the names the server is bound to
  (and ``localhost``) are accepted, unless ``allowed_hosts`` says otherwise.
- **Cross-origin requests**: a browser sends ``Origin`` with them. Without an allowed origin
  list no CORS header is ever sent and a request carrying a foreign ``Origin`` is refused
  (403), so a page cannot even fire a "simple" POST at the model.
- **Key**: with ``api_key`` set, every endpoint but ``/health`` needs
  ``Authorization: Bearer <key>`` (compared in constant time).
- **Size**: a body larger than ``max_body_bytes`` is refused (413) before it is parsed.

Refusals carry OpenAI's error body. This is a plain ASGI middleware: streaming responses
pass through untouched.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from edgellm.serve.protocol import error_body

__all__ = ["Guard", "GuardConfig", "is_loopback"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
OPEN_PATHS = frozenset({"/health"})


def is_loopback(host: str) -> bool:
    """True for names and addresses of this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostname(host_header: str) -> str:
    if host_header.startswith("["):  # [::1]:8080
        return host_header[1:].split("]", 1)[0].lower()
    return host_header.rsplit(":", 1)[0].lower() if host_header.count(":") == 1 else host_header.lower()


@dataclass(frozen=True)
class GuardConfig:
    """The checks' settings: ``allowed_hosts`` None means any host (a non-loopback bind)."""

    allowed_hosts: frozenset[str] | None
    allowed_origins: frozenset[str] = frozenset()
    api_key: str | None = None
    max_body_bytes: int = 1 << 20

    @classmethod
    def for_bind(cls, host: str, api_key: str | None = None, origins: Iterable[str] = (),
                 allowed_hosts: Iterable[str] | None = None, max_body_bytes: int = 1 << 20) -> GuardConfig:
        """Loopback binds accept loopback names only; other binds any name, unless listed."""
        if allowed_hosts is not None:
            hosts: frozenset[str] | None = frozenset(h.lower() for h in allowed_hosts)
        elif is_loopback(host):
            hosts = LOOPBACK_NAMES | {host.strip("[]").lower()}
        else:
            hosts = None
        return cls(hosts, frozenset(o.rstrip("/") for o in origins), api_key, max_body_bytes)


class Guard:
    """ASGI middleware applying :class:`GuardConfig` before the app."""

    def __init__(self, app: ASGIApp, config: GuardConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await _reply(send, *refusal)
            return
        origin = headers.get("origin")
        if origin and scope["method"] == "OPTIONS":
            await _reply(send, 204, None, self._cors(origin) + [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", b"authorization, content-type"),
                (b"access-control-max-age", b"600")])
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await _read_body(receive, headers, self.config.max_body_bytes)
            if body is None:
                await _reply(send, 413, error_body(
                    f"the request body is larger than the server's limit of {self.config.max_body_bytes} "
                    "bytes; send less or start the server with a larger --max-body", code="body_too_large"))
                return
            receive = _replay(body, receive)
        if origin:
            send = _with_headers(send, self._cors(origin))
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        cfg = self.config
        host = headers.get("host")
        if cfg.allowed_hosts is not None and (host is None or _hostname(host) not in cfg.allowed_hosts):
            return 400, error_body(f"Host {host!r} is not one this server answers to "
                                   f"({', '.join(sorted(cfg.allowed_hosts))}); use one of them, or start "
                                   "the server with --allowed-host", code="invalid_host")
        origin = headers.get("origin")
        if origin and origin.rstrip("/") not in cfg.allowed_origins:
            return 403, error_body(f"Origin {origin!r} is not allowed; start the server with "
                                   f"--cors-origin {origin} to allow it", code="origin_not_allowed")
        if cfg.api_key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                what = "a wrong API key" if token else "no API key"
                return 401, error_body(f"the request has {what}; send 'Authorization: Bearer <key>' with "
                                       "the server's --api-key", type="authentication_error",
                                       code="invalid_api_key")
        return None

    def _cors(self, origin: str) -> list[tuple[bytes, bytes]]:
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes | None:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the client's disconnect, when it comes

    return replay


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


async def _reply(send: Send, status: int, body: dict[str, Any] | None,
                 headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    data = b"" if body is None else json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})
