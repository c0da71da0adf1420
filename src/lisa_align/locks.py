"""Inter-process locks (the ``filelock`` library, ``flock(2)`` underneath), so that runs never race.

* :class:`ArtifactLock`: held while a shared artifact is built (the tiny base, an aligned model that
  runs share through ``align.output_dir``, a tokenised cache entry, a GGUF conversion, a wheel). Its
  file is ``<parent>/.<name>.lock`` beside the artifact ``<parent>/<name>``. A second process waits for
  it, then finds the finished artifact and reuses it; how long it waited is reported.
* :class:`RunDirLock`: ``RUN_DIR/.lock``, held while a run writes to its run folder. It never waits: a
  second run on the same folder gets a one-line :class:`~lisa_align.errors.LisaError` naming the
  holder's PID and host.

The holder writes ``<lock>.owner`` (JSON: pid, host, since, what) for those messages. An ``flock`` is
released by the kernel when its holder dies, even by SIGKILL, so a lock left by a dead process never
blocks anyone: the waiter takes over at once and finds what the dead one left (a Trainer work folder
is resumed from its last complete checkpoint; a half-written temporary folder is removed). A lock file
and its side file are removed on release, while the lock is still held, so folders stay clean (a
sweep's ``_aligned/`` holds only models); a process that then wins the flock on the removed inode
sees that the path no longer names it and retries on the new file, so two holders never coexist. A
killed holder leaves its files behind, harmlessly: the next holder reuses and overwrites them. Locks are
re-entrant within one process (the same object per lock file).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lisa_align.errors import LisaError

log = logging.getLogger(__name__)
OWNER_SUFFIX = ".owner"
RUN_LOCK_FILE = ".lock"
REPORT_EVERY_S = 60.0  # a long wait is reported again this often


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of the artifact ``target``: ``<parent>/.<name>.lock``."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def owner_path(lock: str | os.PathLike) -> Path:
    return Path(f"{lock}{OWNER_SUFFIX}")


def read_owner(lock: str | os.PathLike, *, patience: float = 0.0) -> dict[str, Any] | None:
    """The holder's record (pid, host, since, what), or None; ``patience`` seconds are given to a holder
    that has just taken the lock and not yet written it."""
    deadline = time.monotonic() + patience
    while True:
        try:
            rec = json.loads(owner_path(lock).read_text(encoding="utf-8"))
            if isinstance(rec, dict) and "pid" in rec:
                return rec
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def describe_owner(rec: dict[str, Any] | None) -> str:
    """``pid 123 on host-a (since 2026-01-02 10:00:00)``, or ``another process`` without a record."""
    if not rec:
        return "another process"
    since = rec.get("since")
    when = f" (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))})" if isinstance(since, (int, float)) \
        else ""
    return f"pid {rec.get('pid')} on {rec.get('host')}{when}"


def _write_owner(lock: Path, what: str) -> None:
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time(), 3), "what": what}
    tmp = lock.with_name(f"{lock.name}{OWNER_SUFFIX}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(rec), encoding="utf-8")
        os.replace(tmp, owner_path(lock))
    except OSError:  # a read-only or full disk: the record is for messages only
        tmp.unlink(missing_ok=True)


class _Held:
    """One lock file held by this process: the filelock object and how many holders share it here."""

    def __init__(self, path: Path):
        from filelock import FileLock

        self.path = path
        self.lock = FileLock(str(path), thread_local=False)
        self.count = 0


_HELD: dict[str, _Held] = {}
_GUARD = threading.RLock()


def _acquire(path: Path, what: str, timeout: float) -> bool:
    """Take ``path`` (re-entrant in this process); False when another process holds it past ``timeout``."""
    from filelock import Timeout

    key = os.path.abspath(path)
    with _GUARD:
        held = _HELD.get(key)
        if held is not None and held.count > 0:
            held.count += 1
            return True
        held = _HELD[key] = _HELD.get(key) or _Held(path)
        deadline = time.monotonic() + timeout
        while True:
            try:
                held.lock.acquire(timeout=max(deadline - time.monotonic(), 0))
            except Timeout:
                return False
            if _names_locked_file(held.lock, path):
                break
            held.lock.release(force=True)  # the inode we locked was removed by the previous holder: again
        held.count = 1
    _write_owner(path, what)
    return True


def _names_locked_file(lock, path: Path) -> bool:
    """Whether ``path`` still names the inode that ``lock`` holds (filelock 4 checks this itself; this
    covers older releases; True when the descriptor is not exposed)."""
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
    if not isinstance(fd, int):
        return True
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _release(path: Path) -> None:
    key = os.path.abspath(path)
    with _GUARD:
        held = _HELD.get(key)
        if held is None or held.count == 0:
            return
        held.count -= 1
        if held.count:
            return
        try:  # removed while still held (see the module's note), then released
            owner_path(path).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        except OSError:
            pass
        held.lock.release(force=True)
        del _HELD[key]


class ArtifactLock:
    """``with ArtifactLock(target, what="align") as lock:`` holds ``target``'s lock, waiting while another
    process builds it; ``lock.waited`` is the seconds waited (0.0 when it was free) and ``lock.holder``
    the record of the process it waited for. ``on_wait(holder)`` is called once when a wait begins."""

    def __init__(self, target: str | os.PathLike, *, what: str = "", path: str | os.PathLike | None = None,
                 on_wait: Callable[[dict[str, Any] | None], None] | None = None):
        self.target = Path(target)
        self.path = Path(path) if path is not None else lock_path(self.target)
        self.what = what or self.target.name
        self.on_wait = on_wait
        self.waited = 0.0
        self.holder: dict[str, Any] | None = None

    def acquire(self) -> ArtifactLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if _acquire(self.path, self.what, timeout=0):
            return self
        t0 = time.monotonic()
        self.holder = read_owner(self.path, patience=0.5)
        log.warning("%s: waiting for %s, which %s is building (lock %s)", self.what, self.target,
                    describe_owner(self.holder), self.path)
        if self.on_wait is not None:
            self.on_wait(self.holder)
        while not _acquire(self.path, self.what, timeout=REPORT_EVERY_S):
            log.warning("%s: still waiting for %s (%.0fs; held by %s)", self.what, self.path,
                        time.monotonic() - t0, describe_owner(read_owner(self.path)))
        self.waited = round(time.monotonic() - t0, 2)
        return self

    def release(self) -> None:
        _release(self.path)

    def __enter__(self) -> ArtifactLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunDirLock:
    """``RUN_DIR/.lock``: taken without waiting; a folder in use by another process raises a one-line
    LisaError naming its PID and host. A run folder this lock created is removed again on release when
    nothing else was written to it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RUN_LOCK_FILE
        self._created = False
        self._held = False

    def acquire(self) -> RunDirLock:
        if self._held:
            return self
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not _acquire(self.path, f"run {self.run_dir}", timeout=0):
            owner = read_owner(self.path, patience=1.0)
            raise LisaError(f"{self.run_dir} is in use by another run ({describe_owner(owner)}): wait for it "
                            f"to finish, or stop it; a lock left by a killed run is freed by itself "
                            f"({self.path})")
        self._held = True
        return self

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        _release(self.path)
        if self._created:
            try:
                self.run_dir.rmdir()  # only when empty: a run stopped before it wrote anything
            except OSError:
                pass

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
