"""A real S3 API on localhost for tests: moto's server, and a relay that drops connections.

The relay sits between the client (s3fs) and moto and cuts connections in the middle of a
response body, as a flaky network does, so retries are tested against real sockets.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

BUCKET = "shards"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free 127.0.0.1 port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> None:
    """Every file under `folder` (dot-files and the builder's records left out) to the bucket."""
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            client.upload_file(str(path), bucket, f"{prefix}/{relative.as_posix()}")


class DroppingRelay:
    """TCP relay to `upstream_port`: connections whose responses pass `cut_after` bytes are
    closed there, the first `cuts` times (None: every time)."""

    def __init__(self, upstream_port: int, cut_after: int, cuts: int | None = 1) -> None:
        self.upstream_port, self.cut_after, self.cuts_left = upstream_port, cut_after, cuts
        self.cuts_done = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._respond, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        _close(source, target)

    def _respond(self, upstream: socket.socket, client: socket.socket) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if sent + len(data) > self.cut_after and self._take_cut():
                    client.sendall(data[: max(0, self.cut_after - sent)])
                    break
                client.sendall(data)
                sent += len(data)
        _close(upstream, client)

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cuts_left is not None and self.cuts_left <= 0:
                return False
            if self.cuts_left is not None:
                self.cuts_left -= 1
            self.cuts_done += 1
            return True


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def client_environment(endpoint: str, cache_dir: Path | None = None) -> dict[str, str]:
    """What a subprocess needs to read s3:// URLs from the test server."""
    env = {**os.environ, **CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    if cache_dir is not None:
        env["SHARD_CACHE_DIR"] = str(cache_dir)
    return env
