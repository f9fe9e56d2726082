"""A small HTTP proxy for tests: forwards every request to a real server and counts what passed through.

    with CountingProxy("http://127.0.0.1:8000") as proxy:
        backend = ...(base_url=proxy.url)
        ...
        assert proxy.count("POST", "/v1/completions") == 1

It binds 127.0.0.1 on a free port, serves requests concurrently (one thread each, so concurrent clients stay
concurrent upstream) and records each request's method, path and JSON body. Streaming is not supported (the
evalhost backends do not stream).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding", "content-encoding",
}


class CountingProxy:
    def __init__(self, upstream: str, timeout_s: float = 600.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: list[dict[str, Any]] = []  # {"method", "path", "body" (parsed JSON or None)}
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=timeout_s)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                with proxy._lock:
                    proxy.requests.append({"method": self.command, "path": self.path.split("?", 1)[0],
                                           "body": body})
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                try:
                    resp = proxy._client.request(self.command, proxy.upstream + self.path, content=raw,
                                                 headers=headers)
                except httpx.HTTPError as exc:
                    payload = f"proxy: upstream failed: {type(exc).__name__}".encode()
                    self.send_response(502)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="counting-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "CountingProxy":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def __enter__(self) -> "CountingProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- what passed through -----------------------------------------------------------------
    def matching(self, method: str, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["method"] == method and r["path"] == path]

    def count(self, method: str, path: str) -> int:
        return len(self.matching(method, path))

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
