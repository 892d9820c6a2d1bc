"""A PEP 503 package index on 127.0.0.1 that pip really downloads from, and archives it accepts.

Tests add and withdraw files while it runs (`serve`, `withdraw`) or make it answer every request with
an HTTP status (`answer = 503`), to show how the project tells a refused package from a hiccup.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def project(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class PackageIndex:
    def __init__(self, delay_s: float = 0.0):
        self.files: dict[str, dict[str, bytes]] = {}  # project -> filename -> bytes
        self.answer: int | None = None  # every request answered with this status when set
        self.downloads: list[tuple[str, float]] = []
        self.page_requests: list[str] = []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if index.answer is not None:
                    return self.reply(index.answer, b"")
                parts = [p for p in self.path.split("/") if p]
                if len(parts) == 2 and parts[0] == "simple":
                    index.page_requests.append(parts[1])
                    served = index.files.get(project(parts[1]))
                    if not served:
                        return self.reply(404, b"")
                    links = "".join(f'<a href="/files/{f}#sha256={hashlib.sha256(b).hexdigest()}">{f}</a>\n'
                                    for f, b in served.items())
                    return self.reply(200, f"<html><body>\n{links}</body></html>".encode(), "text/html")
                if len(parts) == 2 and parts[0] == "files":
                    body = next((b for served in index.files.values() for f, b in served.items() if f == parts[1]), None)
                    if body is not None:
                        index.downloads.append((parts[1], time.monotonic()))
                        time.sleep(delay_s)
                        return self.reply(200, body, "application/octet-stream")
                self.reply(404, b"")

            def reply(self, status: int, body: bytes, kind: str = "text/plain"):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, name: str, filename: str, body: bytes) -> None:
        self.files.setdefault(project(name), {})[filename] = body

    def withdraw(self, name: str) -> None:
        self.files.pop(project(name), None)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def wheel(name: str, version: str, members: dict[str, bytes] | None = None) -> bytes:
    """A pure-Python wheel pip accepts (it checks the name and version against METADATA), byte-stable."""
    info = f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": b"",
    }
    return _zip({**(members or {}), **meta})


# An in-tree PEP 517 backend with no build requirements: pip prepares the sdist's metadata with it
# offline (a setuptools sdist would need setuptools from the index).
_BACKEND = '''
import os

def get_requires_for_build_wheel(config_settings=None):
    return []

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = "{stem}-{version}.dist-info"
    os.makedirs(os.path.join(metadata_directory, info))
    with open(os.path.join(metadata_directory, info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: {name}\\nVersion: {version}\\n")
    return info

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("download only")
'''


def sdist(name: str, version: str, members: dict[str, bytes]) -> bytes:
    """A .tar.gz sdist pip downloads offline; `members` are paths inside it, top folder included."""
    top = f"{name}-{version}"
    files = {
        f"{top}/pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "_backend"\nbackend-path = ["."]\n',
        f"{top}/_backend.py": _BACKEND.format(name=name, version=version, stem=re.sub(r"[-_.]+", "_", name)).encode(),
        f"{top}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        **members,
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mtime = len(data), 1577836800
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
