"""A real HTTP server on the loopback address that serves a folder of shards, with faults on request.

    with ShardServer(folder) as server:
        server.url("shard-000000.tar")            # http://127.0.0.1:PORT/shard-000000.tar
        server.url("shard-000001.tar", cut=5000)  # the body stops after 5000 bytes, every time
        server.url("shard-000002.tar", cut=5000, times=1)   # ... on the first request only
        server.url("missing.tar")                 # 404

Responses carry the whole file's Content-Length, so a cut body is a broken download to the client (curl
exits 18), as when a connection to object storage drops mid-transfer. ``server.requests`` counts the
requests per path.
"""

from __future__ import annotations

import http.server
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlparse


class ShardServer:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.requests: Counter = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server name)
                url = urlparse(self.path)
                name = url.path.lstrip("/")
                server.requests[name] += 1
                file = server.folder / name
                if not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                query = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
                cut = query.get("cut")
                if cut is not None and server.requests[name] > query.get("times", 1 << 30):
                    cut = None
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data if cut is None else data[:cut])
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str, cut: int | None = None, times: int | None = None) -> str:
        query = [f"cut={cut}"] if cut is not None else []
        if times is not None:
            query.append(f"times={times}")
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}" + ("?" + "&".join(query) if query else "")

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
