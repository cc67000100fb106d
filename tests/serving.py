"""Test helpers for the HTTP server: run an app under uvicorn on 127.0.0.1 (a free port) in a thread,
encode images as data URLs, and a small local HTTP server that plays a remote image host."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import uvicorn
from PIL import Image


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 at a free port; yields the base URL ("http://127.0.0.1:PORT")."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def data_url(image: Image.Image, format: str = "PNG") -> str:
    return f"data:image/{format.lower()};base64,{base64.b64encode(encode(image, format)).decode()}"


def encode(image: Image.Image, format: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **({"quality": 90} if format in ("JPEG", "WEBP") else {}))
    return out.getvalue()


class ImageHost:
    """A local HTTP server with fixed routes: path -> handler(request_handler). Records every request's
    path and Host header in `seen`."""

    def __init__(self, routes: dict[str, Callable[[BaseHTTPRequestHandler], None]]) -> None:
        self.seen: list[tuple[str, str]] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.seen.append((self.path, self.headers.get("Host", "")))
                route = routes.get(self.path)
                if route is None:
                    self.send_error(404)
                else:
                    try:
                        route(self)
                    except (BrokenPipeError, ConnectionResetError):  # the client gave up: expected
                        pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(status: int, body: bytes = b"", headers: dict[str, str] | None = None, delay: float = 0.0):
    def handler(h: BaseHTTPRequestHandler) -> None:
        time.sleep(delay)
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handler
