"""Local destinations for notebooks and tutorials: HTTP servers on this machine only.

``LocalServer()`` listens where bridge sessions reach this machine: the Podman bridge gateway
(e.g. 10.88.0.1) with rootful Podman, this machine's own address with rootless Podman (what
``host.containers.internal`` names in a session); ``LocalServer("127.0.0.1")``
listens on the host's loopback, which only host-mode containers reach. Each counts its hits, so
a refused connection can be seen not to have arrived.
"""

from __future__ import annotations

import http.server
import threading

from . import host
from .errors import MinoError
from .runtime import Engine


def bridge_gateway(engine: Engine | None = None) -> str:
    """This machine as bridge sessions reach it (see the module doc)."""
    engine = engine or Engine.connect()
    seen = host.seen_from_sessions(engine.facts(), engine.networks())
    if not seen:
        raise MinoError("no address where bridge sessions reach this machine", "`mino-jupyter doctor` checks the engine")
    return seen[0]


class LocalServer:
    def __init__(self, host: str | None = None, port: int = 0, body: str = "hello from the notebook's server"):
        self.host = host or bridge_gateway()
        self.hits = 0
        self.body = body
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.hits += 1
                data = (server.body + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        try:
            self._httpd = http.server.ThreadingHTTPServer((self.host, port), Handler)
        except OSError as exc:
            raise MinoError(f"cannot listen on {self.host}: {exc.strerror}",
                            "the bridge interface exists while a bridge container runs: run a %%mino cell first") from None
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, name="mino-demo-server", daemon=True).start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __repr__(self) -> str:
        return f"LocalServer({self.url}, hits={self.hits})"
