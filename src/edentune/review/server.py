"""Starting the review app: a free loopback port by default, a random token, uvicorn in-process."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdentuneError

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    if not is_loopback(host) and not allow_remote:
        raise EdentuneError(f"--host {host} would serve your conversations beyond this machine",
                            hint="keep the default 127.0.0.1, or add --allow-remote if you really mean it (anyone with the token can then decide)")


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str
    token: str
    port: int
    server: object
    thread: threading.Thread | None

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)


def serve(ws_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False,
          token: str | None = None, background: bool = False) -> Running:
    """Run the app on host:port (0: a free one). `background`: in a thread (tests), returned once it
    accepts connections; otherwise the returned object's server is started by `run_forever`."""
    import uvicorn

    from .app import create_app, url_for

    check_host(host, allow_remote)
    token = token or secrets.token_urlsafe(24)
    port = port or free_port(host)
    shown = f"[{host}]" if ":" in host else host
    allowed = None if allow_remote and not is_loopback(host) else {f"{shown}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"}
    app = create_app(ws_dir, token, allowed_hosts=allowed)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    running = Running(url_for(host, port, token), token, port, server, None)
    if background:
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.thread = thread
        import time

        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        else:
            raise EdentuneError(f"the review server did not start on {host}:{port}")
    return running
