"""A TCP proxy on 127.0.0.1 that counts the bytes a server sends back: how much a client really fetched.

Used to measure what sharded reads of an S3 object cost: put it in front of moto's S3 server,
point ``AWS_ENDPOINT_URL_S3`` at the proxy, read, and compare ``bytes_from_server`` with the
object's size.

Usage:
    >>> with ByteCountingProxy("127.0.0.1", moto_port) as proxy:
    ...     os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url
    ...     ...  # read the object
    ...     proxy.bytes_from_server
"""

# Standard library imports
import socket
import socketserver
import threading
from typing import Any


class ByteCountingProxy:
    """Forwards every connection to a target and counts the bytes the target sends back."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.bytes_from_server = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream = socket.create_connection(proxy.target)
                pump = threading.Thread(target=proxy._pipe, args=(self.request, upstream, False), daemon=True)
                pump.start()
                proxy._pipe(upstream, self.request, True)
                pump.join(5)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The proxy's URL."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "ByteCountingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _pipe(self, source: socket.socket, target: socket.socket, count: bool) -> None:
        """Copy one direction until it closes."""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if count:
                    with self._lock:
                        self.bytes_from_server += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
