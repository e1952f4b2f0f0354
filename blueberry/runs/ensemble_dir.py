"""The directory of an ensemble run (`--ensemble N`): which runs are its members.

    RUN/ensemble.json     {"format": 1, "members": ["members/0", "members/1", ...]}
    RUN/members/<i>/      an ordinary run each (config, tokenizer, checkpoints, metrics, summary)
    RUN/config.json       the ensemble's config; RUN/tokenizer.json the members' tokenizer
    RUN/summary.json      the ensemble's figures (the mixture's bits per byte) and each member's

A member's path is relative to RUN or absolute. `blueberry ensemble RUN RUN ... --out DIR` (combine_runs)
writes such a directory around finished runs it does not copy: absolute member paths, "combined": true.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import CheckpointError, UsageError
from .layout import ENSEMBLE as ENSEMBLE_FILE
FORMAT = 1


def member_dir(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / "members" / str(index)


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def write_ensemble_file(run_dir: Path, members: int | list[Path], combined: bool = False) -> None:
    """RUN/ensemble.json naming `members` run directories: RUN/members/<i> for a count, else the paths given
    (`combined`: an ensemble of finished runs, which `blueberry ensemble` made and nothing resumes)."""
    listed = [str(member_dir(Path("."), i)) for i in range(members)] if isinstance(members, int) else \
        [str(m) for m in members]
    spec = {"format": FORMAT, "members": listed, **({"combined": True} if combined else {})}
    atomic_write_text(Path(run_dir) / ENSEMBLE_FILE, json.dumps(spec, indent=2) + "\n")


def refuse_to_resume_combined(run_dir: str | Path) -> None:
    """A `blueberry ensemble` directory has nothing of its own to train: a resume of it is refused."""
    if is_combined(run_dir):
        raise UsageError(f"{run_dir} combines finished runs (blueberry ensemble): it has nothing to resume; "
                         "resume a member's run directory instead")


def is_combined(run_dir: str | Path) -> bool:
    """An ensemble that `blueberry ensemble` made of finished runs (nothing of it trains or resumes)."""
    try:
        return json.loads((Path(run_dir) / ENSEMBLE_FILE).read_text()).get("combined") is True
    except (OSError, ValueError, AttributeError):
        return False


def ensemble_members(run_dir: str | Path) -> list[Path]:
    """The member run directories of an ensemble run (relative paths are to `run_dir`), each checked to exist."""
    path = Path(run_dir) / ENSEMBLE_FILE
    try:
        spec = json.loads(path.read_text())
        members = [m if m.is_absolute() else Path(run_dir) / m for m in map(Path, spec["members"])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable ensemble description ({type(exc).__name__}: {exc})") from None
    missing = [str(m) for m in members if not m.is_dir()]
    if missing:
        raise CheckpointError(f"{run_dir} is an ensemble whose member(s) {', '.join(missing)} are missing; "
                              "restore them, or use one member's run directory alone")
    return members
