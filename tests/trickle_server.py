"""A server on 127.0.0.1 that answers every request with its headers at once, then a body one
byte at a time, forever: each byte comes well inside any read timeout, so only an overall
deadline ends the request. Optionally it sends `fast_bytes` at a sane rate instead (a real
transfer that takes longer than the deadline)."""

from __future__ import annotations

import socket
import threading


class TrickleServer:
    def __init__(self, interval: float = 0.25, *, fast_bytes: int = 0, chunk: int = 64 << 10, chunk_interval: float = 0.1):
        self.interval, self.fast_bytes, self.chunk, self.chunk_interval = interval, fast_bytes, chunk, chunk_interval
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.requests: list[bytes] = []  # the first line of each request
        self._stop = threading.Event()

    def __enter__(self) -> TrickleServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            self.requests.append(head.split(b"\r\n", 1)[0])
            size = self.fast_bytes or 10 ** 9
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n" % size)
                if self.fast_bytes:
                    body = b"{" + b" " * (size - 2) + b"}"
                    for i in range(0, size, self.chunk):
                        conn.sendall(body[i:i + self.chunk])
                        if self._stop.wait(self.chunk_interval):
                            return
                    return
                while not self._stop.wait(self.interval):
                    conn.sendall(b" ")
            except OSError:  # the client gave up: what the tests want
                return
