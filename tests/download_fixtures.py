"""Real servers on 127.0.0.1 for the download tests (no test functions here).

- `ShardServer`: a static HTTP file server with Range support, optional throttling and injected
  failures (the first N requests for a path answered 503), standing in for an https shard host.
- `FaultProxy`: a reverse proxy in front of moto's S3 server that answers 500 to the first N GETs
  of chosen object keys, so s3fs meets real server errors; it logs every request (to count GETs).
- `start_moto()`: moto's standalone S3 server as a subprocess.
Every server binds 127.0.0.1 on a free port and is shut down by the fixture that started it.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import s3fs


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients hang up mid-body on purpose (kill test)
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass


class ShardServer:
    """Serves files of `root` at /<name>; failures and throttling are per-test knobs."""

    def __init__(self, root: str, tls: ssl.SSLContext | None = None):
        self.root = root
        self.fail_first: dict[str, int] = {}  # path -> number of requests still to fail with 503
        self.failures = 0
        self.bytes_per_second: float | None = None
        self.etags: dict[str, str] = {}  # path -> ETag header to send
        self.hold: dict[str, threading.Event] = {}  # path -> body stalls halfway until the event is set
        self.requests: list[str] = []
        server = self

        class Handler(_Quiet):
            def _serve(self, body: bool):
                name = self.path.lstrip("/").split("?")[0]
                server.requests.append(f"{self.command} {name}")
                if server.fail_first.get(name, 0) > 0:
                    server.fail_first[name] -= 1
                    server.failures += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = os.path.join(server.root, name)
                if not os.path.isfile(path):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = open(path, "rb").read()
                start, end = 0, len(data) - 1
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    start = int(a) if a else 0
                    end = min(int(b), len(data) - 1) if b else len(data) - 1
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                chunk = data[start : end + 1]
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("Accept-Ranges", "bytes")
                if name in server.etags:
                    self.send_header("ETag", f'"{server.etags[name]}"')
                self.end_headers()
                if not body:
                    return
                step = 16_384
                if name in server.hold:
                    half = len(chunk) // 2
                    self.wfile.write(chunk[:half])
                    self.wfile.flush()
                    server.hold[name].wait(timeout=60)
                    chunk = chunk[half:]
                for i in range(0, len(chunk), step):
                    self.wfile.write(chunk[i : i + step])
                    if server.bytes_per_second:
                        time.sleep(step / server.bytes_per_second)

            def do_GET(self):
                self._serve(True)

            def do_HEAD(self):
                self._serve(False)

        self.httpd = _Server(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"http{'s' if tls else ''}://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def self_signed_tls(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 with a self-signed certificate (openssl), and the certificate's
    path, which clients trust through SSL_CERT_FILE."""
    import ssl

    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx, cert


class FaultProxy:
    """Forwards every request to `upstream` (host, port); the first N GETs of a key get a 500."""

    def __init__(self, upstream_port: int):
        self.fail_first: dict[str, int] = {}  # object key suffix -> GETs still to fail
        self.failures = 0
        self.requests: list[str] = []  # "GET /bucket/key" for every request forwarded or failed
        proxy = self

        class Handler(_Quiet):
            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.requests.append(f"{self.command} {self.path.split('?')[0]}")
                if self.command == "GET":
                    for key, left in proxy.fail_first.items():
                        if left > 0 and self.path.split("?")[0].endswith(key):
                            proxy.fail_first[key] -= 1
                            proxy.failures += 1
                            msg = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                            self.send_response(500)
                            self.send_header("Content-Type", "application/xml")
                            self.send_header("Content-Length", str(len(msg)))
                            self.end_headers()
                            self.wfile.write(msg)
                            return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{upstream_port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD's Content-Length is the object's size, not the (empty) body's.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.httpd = _Server(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def start_moto(timeout: float = 60.0) -> tuple[subprocess.Popen, int]:
    """moto's standalone S3 server on a free loopback port; returns (process, port) once it answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="module")
def moto_port():
    """A moto S3 server for the test module; import this fixture by name into the module that uses it."""
    proc, port = start_moto()
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def point_s3_at(monkeypatch, endpoint: str) -> None:
    """Point s3fs (and boto) at `endpoint` with moto's test credentials."""
    for name, value in [("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "testing"),
                        ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")]:
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # instances are cached by arguments, not by environment
