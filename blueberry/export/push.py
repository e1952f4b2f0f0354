"""`blueberry push`: upload an export to the Hugging Face Hub (HfApi.create_repo, then upload_folder).

The source is a directory written by `export --format hf`, or a run (or checkpoint), which the command
line (cli/use_cmds.py) exports to a temporary directory first, with its model card naming the repository.
The Hub is the one HF_ENDPOINT names (default huggingface.co); the token comes from --token, else HF_TOKEN
or the saved login.
Every expected failure (no such source, offline mode, the Hub refusing) is one line, exit 2.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from ..runs.layout import CHECKPOINTS


def is_export(path: Path) -> bool:
    """A directory written by `export --format hf` (a run directory keeps its weights under checkpoints/)."""
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file() \
        and not (path / CHECKPOINTS).exists()


def check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") > 1 or not repo_id.strip("/") or " " in repo_id:
        raise UsageError(f"repo id {repo_id!r}: give NAME or OWNER/NAME")


def upload(folder: Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create `repo_id` (kept if it exists) and upload `folder` into it; returns the repository's URL."""
    from huggingface_hub import HfApi  # a dependency of transformers
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload with blueberry push")
    except OfflineModeIsEnabled:
        raise UsageError("blueberry push: HF_HUB_OFFLINE is set; unset it to reach the Hub") from None
    except HfHubHTTPError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"blueberry push: the Hub refused {repo_id}: {first}") from None
    except (OSError, ValueError) as exc:  # connection refused, malformed answers
        raise UsageError(f"blueberry push: cannot upload to {api.endpoint}: {exc}") from None
    return str(url)
