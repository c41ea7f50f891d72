"""The bounds on what one connection may cost `python cli.py serve`: their values and ranges, here so that
the CLI can offer them without importing the HTTP stack. shared/api/connections.py enforces them."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds on one `serve` process's connections (README "What one connection may cost serve").

    Sizes in bytes, times in seconds."""

    max_header_bytes: int = 32 * 1024  # a request's line and headers; past that: 431
    request_timeout: float = 10.0  # for a request's headers and body to arrive; past that: 408
    max_connections: int = 1000  # open at once; past that a new one is answered 503
    drain_bytes: int = 16 * 1024 * 1024  # read and dropped after an early answer, before closing
    drain_seconds: float = 5.0  # how long that may take


MIN_HEADER_BYTES = 1024
MAX_HEADER_BYTES = 1024 * 1024
MAX_CONNECTIONS = 100_000
MAX_REQUEST_TIMEOUT = 3600.0
