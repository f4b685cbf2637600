"""A tiny JWKS server for tests: serves a file a test may rewrite, and counts the fetches.

    python tests/jwks_server.py --port 8765 --file /tmp/jwks.json

GET /jwks.json serves the file as it is now (read on every request, so rewriting it rotates
the keys; a missing file is a 404). GET /hits answers how many /jwks.json requests were
served, as plain text. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


class JwksServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, file: Path) -> None:
        super().__init__(("127.0.0.1", port), JwksHandler)
        self.file = file
        self.hits = 0
        self.lock = threading.Lock()  # handler threads count concurrently


class JwksHandler(BaseHTTPRequestHandler):
    server: JwksServer

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/jwks.json":
            with self.server.lock:
                self.server.hits += 1
            try:
                body = self.server.file.read_bytes()
            except OSError:
                self._reply(404, b"no such file\n", "text/plain")
                return
            self._reply(200, body, "application/json")
        elif path == "/hits":
            with self.server.lock:
                hits = self.server.hits
            self._reply(200, str(hits).encode(), "text/plain")
        else:
            self._reply(404, b"not found\n", "text/plain")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a flood test makes dozens of requests; the count at /hits is what matters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", type=Path, required=True)
    args = parser.parse_args()
    server = JwksServer(args.port, args.file)
    print(f"jwks server on http://127.0.0.1:{args.port}/jwks.json", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
