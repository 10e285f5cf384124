"""An overall deadline for an HTTP request, however slowly the other side sends or reads.

httpx's timeouts bound each single wait (connect, one read, one write), and a read timeout starts
again at every byte: a server that sends its headers and then one byte every few seconds keeps a
request open forever. httpx has no total timeout, so this module adds one below it, at the level
of the socket: every read and write of a connection (and the connect) waits at most until the
deadline of the request being made, and fails with a timeout once it has passed. The deadline
belongs to the request, not the connection: `deadline()` sets it for the code inside the `with`
(a context variable), so pooled connections serve later requests with their own deadline.

A transfer that moves data at a sane rate may be given more time: with `min_rate` (bytes per
second), every byte moved in either direction moves the deadline `1 / min_rate` seconds later, so
an upload running at `min_rate` or faster never reaches it, while a trickle earns (almost) nothing.

Used by the Ollama client (`export.deploy`) and the OpenAI-compatible eval backend
(`evaluate.backends`): `client_transport()` is the httpx transport both pass to their client.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

import httpcore
import httpx

_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("edentune_net_deadline", default=None)


class Deadline:
    def __init__(self, seconds: float, min_rate: float | None = None):
        self.seconds, self.min_rate = seconds, min_rate
        self.end = time.monotonic() + seconds
        self.expired = False  # set once a wait was cut short by this deadline

    def left(self) -> float:
        return self.end - time.monotonic()

    def moved(self, nbytes: int) -> None:
        if self.min_rate and nbytes > 0:
            self.end += nbytes / self.min_rate

    def bound(self, timeout: float | None) -> float:
        """`timeout` shortened to the time left; raises httpcore's timeout once none is left."""
        left = self.left()
        if left <= 0:
            self.expired = True
            raise httpcore.ReadTimeout(f"overall deadline of {self.seconds:g} s passed")
        return left if timeout is None else min(timeout, left)


@contextlib.contextmanager
def deadline(seconds: float, *, min_rate: float | None = None) -> Iterator[Deadline]:
    """Requests made inside (through `client_transport()`) end by `seconds` from now; after an
    httpx.TimeoutException, `.expired` tells whether it was this deadline."""
    state = Deadline(seconds, min_rate)
    token = _current.set(state)
    try:
        yield state
    finally:
        _current.reset(token)


def _wait(timeout: float | None, op):
    state = _current.get()
    if state is None:
        return op(timeout)
    try:
        return op(state.bound(timeout))
    except httpcore.TimeoutException:
        if state.left() <= 0:
            state.expired = True
        raise


class _Stream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = _wait(timeout, lambda t: self._stream.read(max_bytes, t))
        if (state := _current.get()) is not None:
            state.moved(len(data))
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _wait(timeout, lambda t: self._stream.write(buffer, t))
        if (state := _current.get()) is not None:
            state.moved(len(buffer))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None) -> _Stream:
        return _Stream(_wait(timeout, lambda t: self._stream.start_tls(ssl_context, server_hostname, t)))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend):
        self._backend = backend

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None) -> _Stream:
        return _Stream(_wait(timeout, lambda t: self._backend.connect_tcp(host, port, t, local_address, socket_options)))

    def connect_unix_socket(self, path, timeout=None, socket_options=None) -> _Stream:
        return _Stream(_wait(timeout, lambda t: self._backend.connect_unix_socket(path, t, socket_options)))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def client_transport() -> httpx.HTTPTransport:
    """An httpx transport whose connections obey `deadline()`. Given as `transport=`, it also means
    the client ignores proxy variables of the environment: edentune talks to the server directly."""
    transport = httpx.HTTPTransport()
    # httpx does not expose httpcore's `network_backend`; its pool reads this attribute for every
    # new connection (httpx 0.28-0.29, httpcore 1.0). A test drives a trickling server through it.
    pool = transport._pool
    pool._network_backend = _Backend(pool._network_backend)
    return transport
