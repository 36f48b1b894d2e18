"""Listeners for network tests: they count what arrives, so "refused" is checked at the target too."""

from __future__ import annotations

import socket
import threading
import time
import uuid


def wait_port(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    """True once something accepts connections on host:port, False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class TcpListener:
    """Accepts connections, answers a minimal HTTP 200, counts every accepted connection."""

    def __init__(self, host: str, port: int = 0, scope: str | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        address = (host, port, 0, socket.if_nametoindex(scope)) if scope else (host, port)
        self.sock.bind(address)
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self.token = uuid.uuid4().hex[:8]  # the body says which listener answered
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            try:
                conn.settimeout(2)
                conn.recv(4096)
                body = f"{self.token}\n".encode()
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            finally:
                conn.close()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() so the socket really closes
        except OSError:
            pass
        self.sock.close()


class UdpListener:
    def __init__(self, host: str, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.hits = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                self.sock.recv(2048)
            except OSError:
                return
            self.hits += 1

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()




class StreamingListener:
    """Serves one endless HTTP response, a line every `every` seconds, and watches its own TCP
    state: how much waits for an acknowledgement (a cut flow stops acknowledging)."""

    def __init__(self, host: str, every: float = 0.02):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.every = every
        self.conn = None
        self.sent = 0
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conn = conn
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
            while not self._stop.wait(self.every):
                conn.sendall(b"tick\n")
                self.sent += 1
        except OSError:
            pass

    def unacknowledged(self) -> int:
        """Bytes of the served connection that the peer has not acknowledged (SIOCOUTQ)."""
        import array
        import fcntl
        import termios

        if self.conn is None:
            return 0
        buf = array.array("i", [0])
        fcntl.ioctl(self.conn.fileno(), termios.TIOCOUTQ, buf)
        return buf[0]

    def close(self):
        self._stop.set()
        for s in (self.conn, self.sock):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
