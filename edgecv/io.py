"""Atomic file writes: every file under a run dir is written to a temporary file in the same folder,
fsynced, then moved into place with os.replace, so an interrupted run never leaves a half-written file.
And one writer per run dir: a lock file naming its holder, locked with a POSIX record lock that the kernel
drops when the holder dies (a kill -9 leaves a stale file, which the next run takes over)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from edgecv.errors import EdgecvError

LOCK_FILE = ".lock"  # in the run dir: {"pid", "command", "host", "started"} of the run writing into it


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file handle whose content appears at `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; the file should follow the umask like any other
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temporary file and os.replace: never a half-written checkpoint."""
    import torch

    with atomic_open(path) as fh:
        torch.save(obj, fh)


def lock_run_dir(run_dir: Path, command: str) -> tuple[int, dict | None]:
    """Take `run_dir`'s lock for this process: (its file descriptor, for `unlock_run_dir`; the holder a
    killed run left behind and whose lock was taken over, or None). A live holder: one line, exit 2.
    A POSIX lock belongs to the process: take it once per process, and never open the file elsewhere."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES / EAGAIN: a live process holds it
            holder = _read_holder(fd, wait_s=0.5)
            os.close(fd)
            raise EdgecvError(f"run dir {run_dir} is in use by {describe_holder(holder)}; wait for it or use "
                              "--out") from None
        if _is_current(fd, path):
            break
        os.close(fd)  # its holder removed the file while letting go: lock the file now at `path`
    stale = _read_holder(fd)
    me = {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    return fd, stale


def unlock_run_dir(run_dir: Path, fd: int) -> None:
    """Let the run dir go: the file is removed while still locked, so no one locks a file on its way out."""
    with contextlib.suppress(OSError):
        os.unlink(run_dir / LOCK_FILE)
    os.close(fd)


def describe_holder(holder: dict | None) -> str:
    """'pid 1234 (edgecv compress r.yaml) since 17:02' (the date too when not today)."""
    if not holder:
        return "another edgecv run (its lock file names no process)"
    started = str(holder.get("started", ""))
    day, _, clock = started.partition("T")
    since = clock[:5] if day == time.strftime("%Y-%m-%d") else f"{day} {clock[:5]}".strip()
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    since = f" since {since}" if since else ""
    return f"pid {holder.get('pid', '?')}{where} ({holder.get('command', '?')}){since}"


def _read_holder(fd: int, wait_s: float = 0.0) -> dict | None:
    """The lock file's JSON (retried for `wait_s`: a new holder writes it just after locking)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict) or time.monotonic() >= deadline:
            return holder if isinstance(holder, dict) else None
        time.sleep(0.02)


def _is_current(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
