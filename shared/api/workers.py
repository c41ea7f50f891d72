"""`serve --workers N`: N uvicorn servers, each listening on its own SO_REUSEPORT socket on the same port.

uvicorn's own workers share one listening socket, and an event loop that wakes for it accepts every
connection waiting there: a burst of keep-alive clients lands on one worker and stays there while the
others idle. With a socket each, the kernel spreads new connections over the workers evenly. A worker
that dies after it started is replaced, and `on_replaced` is called in this (the parent) process: work the
dead worker held only in its memory (the embedded batch queue's chunks) is queued again there. One that
cannot start (exit code 3, as uvicorn's) stops the server. A worker whose parent is gone stops itself.
"""

import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from ..errors import CaError
from ..serve_limits import ConnectionLimits
from .connections import bounded_protocol

APP = "shared.api:app_from_environment"
STARTUP_FAILURE = 3  # uvicorn's exit code for a server that could not start
RETRY_REPLACED_SECONDS = 2.0  # between tries of an `on_replaced` that raised (the ledger away, say)
log = logging.getLogger("device_ca.serve")
uvicorn_log = logging.getLogger("uvicorn.error")


def serve_workers(
    host: str,
    port: int,
    workers: int,
    log_level: str,
    access_log: bool,
    app: str = APP,
    factory: bool = True,
    limits: ConnectionLimits | None = None,
    on_replaced: Callable[[], object] | None = None,
) -> None:
    """Run `app` (an import string; with `factory`, of a function that makes the app) until SIGINT or
    SIGTERM, each worker's connections bounded by `limits` (None: uvicorn's own protocol, unbounded).
    `on_replaced` is called here, in the parent, each time workers that died were replaced (once for all
    those found dead at one wake); when it raises, it is logged and tried again every
    RETRY_REPLACED_SECONDS until it returns, so that what it recovers is never dropped. Where the platform
    has no SO_REUSEPORT (Windows), uvicorn's own workers run instead, and `on_replaced` is never called.
    CaError when the port is taken or a worker cannot start."""
    http = bounded_protocol(limits) if limits else "auto"
    if not hasattr(socket, "SO_REUSEPORT"):  # not on Windows: uvicorn's shared socket, then
        uvicorn.run(
            app,
            factory=factory,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            access_log=access_log,
            http=http,
            ws="none",
        )
        return
    context = multiprocessing.get_context("spawn")
    options = (host, listening_port(host, port), log_level, access_log, app, factory, limits)
    stop = _stop_on_signals()
    running = [_start(context, options) for _ in range(workers)]
    owed, next_try = False, 0.0  # whether on_replaced is to be called, and not before when
    while not stop.is_set():
        multiprocessing.connection.wait([process.sentinel for process in running], timeout=0.5)
        for index, process in enumerate(running):
            if process.is_alive() or stop.is_set():
                continue
            if process.exitcode == STARTUP_FAILURE:
                _stop_all(running)
                raise CaError("a worker could not start; its error is above", "worker-failed")
            log.warning("worker %s exited with code %s; starting another", process.pid, process.exitcode)
            running[index] = _start(context, options)
            owed = on_replaced is not None
        if owed and not stop.is_set() and time.monotonic() >= next_try:
            owed, next_try = _recover(on_replaced)
    _stop_all(running)


def _recover(on_replaced: Callable[[], object] | None) -> tuple[bool, float]:
    """Call `on_replaced`: (whether it is still owed, when to try again)."""
    try:
        if on_replaced is not None:
            on_replaced()
    except Exception as error:  # the server keeps serving; what it would recover is tried again soon
        log.warning(
            "after a worker was replaced: %s: %s; trying again in %g s",
            type(error).__name__,
            error,
            RETRY_REPLACED_SECONDS,
        )
        return True, time.monotonic() + RETRY_REPLACED_SECONDS
    return False, 0.0


def listening_port(host: str, port: int) -> int:
    """Check that nothing listens on the port, not even another server's SO_REUSEPORT workers, which
    workers' own sockets would silently join; port 0 becomes a free port. CaError "port-in-use" when it is
    taken, "cannot-listen" when the port or address cannot be had otherwise."""
    probe = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        return probe.getsockname()[1]
    except OSError as error:
        code = "port-in-use" if error.errno == errno.EADDRINUSE else "cannot-listen"
        raise CaError(f"cannot listen on {host}:{port}: {error.strerror}", code) from None
    finally:
        probe.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _start(context: multiprocessing.context.SpawnContext, options: tuple) -> multiprocessing.Process:
    process = context.Process(target=_worker, args=options, name="device-ca-worker")
    process.start()
    return process


def _stop_on_signals() -> threading.Event:
    """Set on SIGINT or SIGTERM (Ctrl-C reaches the workers too: they stop themselves)."""
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def _stop_all(running: list[multiprocessing.Process]) -> None:
    for process in running:
        if process.is_alive():
            process.terminate()  # SIGTERM: uvicorn finishes the requests in flight, then exits
    for process in running:
        process.join()


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn says where it listens only when it opened the socket itself; say it once listening."""
        await super().startup(sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            uvicorn_log.info("Uvicorn running on http://%s:%d in worker %d", host, port, os.getpid())


def _worker(
    host: str, port: int, log_level: str, access_log: bool, app: str, factory: bool, limits: ConnectionLimits | None
) -> None:
    _log_service_to_stderr()
    listener = socket.socket(_family(host), socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        print(f"serve: cannot listen on {host}:{port}: {error.strerror}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    http = bounded_protocol(limits) if limits else "auto"
    config = uvicorn.Config(
        app,
        factory=factory,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        http=http,
        ws="none",  # the API has no WebSocket routes: an upgrade request is an ordinary request
    )
    server = _Server(config)
    threading.Thread(target=_stop_with_parent, args=(server,), name="parent-watch", daemon=True).start()
    server.run(sockets=[listener])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _stop_with_parent(server: uvicorn.Server) -> None:
    """Stop this worker, as SIGTERM would, once the `serve` process is gone (killed with SIGKILL, say): an
    orphan would keep the port, so that the next `serve` could not start and queue again what was lost."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    multiprocessing.connection.wait([parent.sentinel])
    log.warning("worker %d: the serve process is gone; stopping", os.getpid())
    server.should_exit = True


def _log_service_to_stderr() -> None:
    """A worker process logs the service's records (error IDs among them) on stderr, as `serve` does."""
    logger = logging.getLogger("device_ca")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
