"""File modes as a normal tool leaves them: 0666/0777 less the process umask.

`tempfile.mkstemp` and `mkdtemp` create 0600 files and 0700 directories, right for private
scratch and wrong for what we rename into place as a result: an output's manifest.json, a fetched
model a serving container running as another user reads, the built-in model cache. Those get
the mode `open()` / `mkdir()` would have given them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_lock = threading.Lock()


def umask() -> int:
    """The process umask, without changing it: Linux reports it in /proc/self/status; elsewhere
    it is read by setting and restoring it (under a lock, the only way POSIX offers)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def as_created(path: str | os.PathLike[str], fd: int | None = None) -> None:
    """Give a file (by `fd` when open) or directory made private by tempfile the mode `open()` or
    `mkdir()` would have given it."""
    if fd is not None:
        os.fchmod(fd, 0o666 & ~umask())
    else:
        os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask())
