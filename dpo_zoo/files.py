"""Small file-system helpers: a file's sha256, atomic writes (temporary file, fsync, rename) of files
and folders, fsync of folders, an advisory lock between processes, a full disk turned into a
:class:`~dpo_zoo.errors.DiskFullError`, and :class:`WriterLock` (one writer per output folder)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union


def sha256_path(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in 4 MiB blocks (no memo)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync'd, then renamed:
    readers see the old file or the new one, never a part. Out of space: a
    :class:`~dpo_zoo.errors.DiskFullError` naming ``path`` and the bytes needed, the temporary file removed."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_full_as_error(path, needed=len(data), written=temp):
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (released when the process dies, so a killed holder never blocks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ==================================================================== a full disk

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def free_bytes(path: Union[str, Path]) -> Optional[int]:
    """Bytes free to this user on the file system holding ``path`` (its nearest existing folder)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(err: BaseException, path: Union[str, Path, None] = None) -> bool:
    """Whether ``err`` (or an error it was raised from) is a write that ran out of space: ENOSPC or a
    quota (EDQUOT), or a library's own wrapping of one (torch's ``PytorchStreamWriter ... file write
    failed`` and safetensors' I/O errors keep no errno, so for them the file system of ``path`` must
    also be nearly full: under 1 MiB free)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        text = str(err)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        if path is not None and ("write failed" in text or "failed writing" in text or "unexpected pos" in text):
            free = free_bytes(path)
            if free is not None and free < (1 << 20):
                return True
        err = err.__cause__ or err.__context__
    return False


def tree_bytes(path: Union[str, Path]) -> int:
    """Bytes of a file, or of every file under a folder (0 when absent)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


@contextlib.contextmanager
def disk_full_as_error(target: Union[str, Path], needed: Optional[int] = None, what: str = "",
                       written: Optional[Union[str, Path]] = None) -> Iterator[None]:
    """Turn a write that runs out of space inside the block into a :class:`~dpo_zoo.errors.DiskFullError`
    naming ``target``, the bytes ``needed`` (when known), the bytes written so far (of ``written``,
    default ``target``) and what is free. The caller removes what is half-written."""
    from dpo_zoo.errors import DiskFullError

    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if not is_disk_full(err, target):
            raise
        raise DiskFullError(target, needed=needed, written=tree_bytes(written or target), free=free_bytes(target),
                            what=what) from None


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_folder(target: Union[str, Path]) -> Iterator[Path]:
    """Yield ``<target>.tmp`` to fill; when the block ends without error it is flushed and renamed to
    ``target`` (an existing ``target`` is moved aside first and deleted after), so a reader sees the
    old folder or the whole new one, never a part. On an error the temporary folder is deleted."""
    target = Path(target)
    temp = target.with_name(target.name + ".tmp")
    if temp.exists():
        shutil.rmtree(temp)  # left by a write that was killed
    temp.mkdir(parents=True)
    try:
        yield temp
        with disk_full_as_error(temp):
            _fsync_tree(temp)
        aside = target.with_name(target.name + ".replaced")
        if aside.exists():
            shutil.rmtree(aside)
        if target.exists():
            os.replace(target, aside)
        os.replace(temp, target)
        _fsync_dir(target.parent)
        if aside.exists():
            shutil.rmtree(aside)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


# ==================================================================== one writer per folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class WriterLock:
    """At most one process writes a folder (a run's ``train.output_dir``, a prep's ``prep.output_dir``).

    ``acquire`` creates ``<folder>/.dpo-zoo-writer.lock`` with ``O_CREAT | O_EXCL`` holding JSON
    ``{pid, host, started, command}``; a second writer is refused (it does not wait) with a
    :class:`~dpo_zoo.errors.WriterLockError` naming the first one's pid, host, start and command. A
    lock whose process is dead (same host, no such pid) is stale: it is taken over, with a note. A lock
    from another host cannot be checked from here; the message says to delete the file once that
    process is known to be gone. Checking and taking over happen under an advisory ``flock`` of a
    side file, so two processes never both take over the same stale lock. ``release`` removes the
    lock only when it is still this process's. Use as a context manager.
    """

    NAME = ".dpo-zoo-writer.lock"

    def __init__(self, folder: Union[str, Path], command: Optional[str] = None):
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self.command = command
        self.held = False
        self.note: Optional[str] = None

    def _mine(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": self.command or shlex.join(sys.argv)}

    def holder(self) -> Optional[Dict[str, Any]]:
        """The JSON of the current lock file (``{}`` when unreadable), None when there is none."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            value = json.loads(text)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def acquire(self) -> "WriterLock":
        from dpo_zoo.errors import WriterLockError

        self.folder.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.folder / (self.NAME + ".guard")):
            holder = self.holder()
            if holder is not None:
                host, pid = holder.get("host"), holder.get("pid")
                ours = host == socket.gethostname()
                if ours and pid == os.getpid():
                    raise WriterLockError(f"{self.folder} is already being written by this process (pid {pid})")
                if ours and isinstance(pid, int) and _pid_alive(pid):
                    raise WriterLockError(
                        f"{self.folder} is being written by another dpo-zoo process: pid {pid} on {host}, "
                        f"started {holder.get('started', '?')} ({holder.get('command', '?')}). Wait for it to "
                        f"finish or stop it (kill -TERM {pid} saves and stops it), or choose another folder")
                if not ours and host:
                    raise WriterLockError(
                        f"{self.folder} is being written by pid {pid} on host {host}, started "
                        f"{holder.get('started', '?')} ({holder.get('command', '?')}); this host cannot check "
                        f"that process. If it is gone, delete {self.path} and run again")
                what = f"pid {pid} on {host}" if pid else "an unreadable lock"
                self.note = f"took over the stale writer lock {self.path} ({what} is no longer running)"
                self.path.unlink(missing_ok=True)
            data = (json.dumps(self._mine()) + "\n").encode()
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self.holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
