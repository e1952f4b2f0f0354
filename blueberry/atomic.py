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


def _fsync_dir(path: Path) -> None:
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


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary file in the same directory, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
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
        os.replace(tmp, out)  # onto an empty directory or no entry: atomic
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
