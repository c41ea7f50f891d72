"""What one connection may cost `serve`: bounds that uvicorn's httptools protocol does not set itself.

uvicorn with httptools buffers a request's headers without limit and waits for them without end (a
connection that sent half a header line stayed open indefinitely; 30 that each sent 8 MB of one header
grew the server by 250 MB), and it closes a connection right after answering even while the client is
still sending a body it will never read, which the kernel turns into a reset that can destroy the answer
(a 413 became "connection reset" for clients that say `Connection: close`).

`bounded_protocol(limits)` is uvicorn's own HttpToolsProtocol with four bounds added:

- **Header bytes.** The request line and headers of one request may take `max_header_bytes`; past that
  the answer is 431 and the connection closes. What is fed to the parser is counted before it is fed,
  so the parser never holds more than that. Trailers after a chunked body are not kept, and what comes
  after the headers beyond the body (chunk framing and trailers) may be at most `max_header_bytes` plus
  8 bytes per body byte; past that the answer is 431 (or, answered already, the connection closes).
- **A deadline to send the request.** From the connection's start, or a request's first byte, its
  headers and body must have arrived within `request_timeout` seconds, or the answer is 408 and the
  connection closes (an idle connection that never sent a byte is just closed). Keep-alive idle time
  between requests is uvicorn's own `timeout_keep_alive`.
- **Open connections.** Past `max_connections` at once, a new connection is answered 503 with
  Retry-After and closed.
- **Closing after an early answer.** When the connection is closed while the client may still be sending
  (an answer given before the body was read, a refusal above), the server first ends its side (FIN
  after the answer), then reads and drops what still comes, up to `drain_bytes` and `drain_seconds`,
  and only then closes. The client, done sending, reads the whole answer.

So a connection costs at most `max_header_bytes` of buffered headers (bodies are capped by the app: 8 KiB,
10 MiB for a batch, 64 KiB otherwise) for at most `request_timeout` seconds, and there are at most
`max_connections` of them.
Everything else is uvicorn's. The class relies on uvicorn's protocol callbacks (pinned in requirements.txt).
A client that pipelines requests and breaks a bound with a later one may see the answer in progress cut
short: the connection is closed at once rather than after it.
"""

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..serve_limits import ConnectionLimits

REFUSAL_DRAIN_SECONDS = 1.0  # a connection refused for being one too many is not kept long

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def bounded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with `limits` (for `uvicorn.Config(http=...)`)."""
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), {"limits": limits})


class BoundedHttpProtocol(HttpToolsProtocol):
    limits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        self._lost = False
        self._draining = False
        self._drained = 0
        self._linger: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._awaiting_headers = True  # the next request's headers have not all arrived
        self._header_bytes = 0  # of those, how many have come
        self._in_message = False  # a request has begun and its body has not all arrived
        self._after_headers = 0  # bytes of this request after its headers: body, chunk framing, trailers
        self._body_bytes = 0  # of those, how many were body
        super().connection_made(_ClosingTransport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too-many-connections", "the server has too many open connections; try again shortly")
            return
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        for timer in (self._deadline, self._linger):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._draining:
            self._drop(len(data))
            return
        while data and self._awaiting_headers and not self.transport.is_closing():
            room = self.limits.max_header_bytes - self._header_bytes
            if room <= 0:
                message = f"the request's headers are larger than {self.limits.max_header_bytes} bytes"
                self._refuse(431, "headers-too-large", message)
                self._drop(len(data))
                return
            if self._deadline is None:  # the first byte of a request on a kept-alive connection
                self._arm_deadline()
            piece, data = data[:room], data[room:]
            self._header_bytes += len(piece)
            super().data_received(piece)
        if data and not self.transport.is_closing():
            self._after_headers += len(data)
            super().data_received(data)
            if self._beyond_the_body() and not self.transport.is_closing():
                self._stop_reading_extras()
        elif data and self._draining:  # the parser refused a piece (400) and the rest is being dropped
            self._drop(len(data))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = True
        if self._deadline is None:
            self._arm_deadline()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        super().on_headers_complete()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._awaiting_headers:
            super().on_header(name, value)
        # else a trailer after a chunked body: the API reads none, so none is kept

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def _beyond_the_body(self) -> bool:
        """Whether what came after the headers is more than body, chunk framing (a few bytes per chunk, each
        chunk at least a byte) and trailers of the header bound could be. Trailers are parsed, not read by
        the app, so without this a request could send them without end while its answer is long gone."""
        extras = self._after_headers - self._body_bytes
        return extras > self.limits.max_header_bytes + 8 * self._body_bytes

    def _stop_reading_extras(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self._close_after_drain(0)  # answered already: nothing more of this request is wanted
        else:
            message = f"the request's trailers and chunk framing are larger than {self.limits.max_header_bytes} bytes"
            self._refuse(431, "headers-too-large", message)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_message = False
        self._awaiting_headers, self._header_bytes = True, 0
        self._after_headers = self._body_bytes = 0
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    # -- the bounds ------------------------------------------------------------------------------------

    def _arm_deadline(self) -> None:
        self._deadline = self.loop.call_later(self.limits.request_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if not self._awaiting_headers:  # its headers came, its body did not: the app stops waiting for it
            if cycle is not None and not cycle.response_started:
                cycle.disconnected = True
                cycle.message_event.set()
                self._refuse(408, "request-timeout", self._late())
            else:
                self.transport.close()
        elif cycle is not None and not cycle.response_complete:  # pipelined behind an answer in progress
            cycle.keep_alive = False
        elif self._header_bytes or self._in_message:
            self._refuse(408, "request-timeout", self._late())
        else:  # never sent a byte
            self.transport.close()

    def _late(self) -> str:
        return f"the request did not arrive within {self.limits.request_timeout:g} seconds"

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer `status` with the API's error shape, then close (draining what the client still sends)."""
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        head = [b"HTTP/1.1 %d %s" % (status, _REASONS[status])]
        head += [b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]
        if status == 503:
            head.append(b"retry-after: 1")
        self._raw.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self._close_after_drain(REFUSAL_DRAIN_SECONDS if status == 503 else self.limits.drain_seconds)

    def close_transport(self) -> None:
        """Called for every close of this connection: drain first while the client may still be sending."""
        if self._lost or self._draining:
            return
        if self._in_message or (self._awaiting_headers and self._header_bytes):
            self._close_after_drain(self.limits.drain_seconds)
        else:
            self._raw.close()

    def _close_after_drain(self, seconds: float) -> None:
        if self._lost or self._draining:
            return
        self._draining = True
        self.transport.close()  # marks the wrapper closing, so that uvicorn writes nothing more
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        try:
            self._raw.resume_reading()
            if self._raw.can_write_eof():
                self._raw.write_eof()  # the answer, then FIN: the client learns there is nothing more
        except (OSError, RuntimeError):
            self._raw.close()
            return
        self._linger = self.loop.call_later(seconds, self._raw.close)

    def _drop(self, size: int) -> None:
        self._drained += size
        if self._drained > self.limits.drain_bytes:
            self._raw.close()


class _ClosingTransport:
    """The transport as uvicorn's protocol sees it: `close()` goes through the protocol's draining close,
    and once closing, writes are dropped (the drain has already ended this side)."""

    def __init__(self, transport: asyncio.Transport, protocol: BoundedHttpProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._protocol.close_transport()

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self._closing:
            self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
