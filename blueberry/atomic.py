"""Writes that a kill at any moment cannot leave half done, and refusals to write over what is not ours.

The project's rule: no command removes or overwrites a file it cannot prove it wrote.

- `atomic_write_text` / `atomic_write_bytes`: the content goes to a temporary name in the same directory,
  is fsynced, then `os.replace`d onto the final name: a reader sees the old file or the new one, never a mix.
- `building_dir(out)`: an output directory (`export`, `import`, `quantize`) is built under a temporary name
  beside `out` and renamed to `out` only when complete; a failure or a kill leaves `out` as it was.
  Leftover temporaries are named `.NAME.partial-*`: ours by construction, never the user's files.
- `refuse_non_empty(out, what)`: exit 2 (UsageError) when `out` holds anything at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: not every file system lets a directory be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread, for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _plain_mode(path: Path, base: int) -> int:
    """The mode a plain open() or mkdir() would leave: the existing entry's, else `base` less the umask
    (mkstemp's 0o600 and mkdtemp's 0o700 would hide the output from every other user)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return base & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary file in the same directory, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _plain_mode(path, 0o666))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def refuse_non_empty(out: str | Path, what: str = "output directory") -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not empty; choose a new {what} (nothing was overwritten)")


@contextmanager
def building_dir(out: str | Path, what: str = "output directory"):
    """Yield a fresh temporary directory beside `out`; on success it becomes `out` (which must be absent or
    empty), on any failure it is removed and `out` is left as it was."""
    out = Path(out)
    refuse_non_empty(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        refuse_non_empty(out, what)  # someone wrote there meanwhile: keep theirs
        os.chmod(tmp, _plain_mode(out, 0o777))
        os.replace(tmp, out)  # onto an empty directory or no entry: atomic
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
