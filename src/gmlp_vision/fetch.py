"""Models by Hugging Face Hub id: ``timm/gmlp_s16_224.ra3_in1k`` or ``hf-hub:ORG/NAME``, fetched with huggingface_hub.

Where a command takes a weights file or an export folder (``--init``, ``gmlp predict``, `predict.Classifier.load`), it
also takes a Hub id: a value that names no existing file or folder and reads ``ORG/NAME`` (timm's ids are such:
``timm/gmlp_s16_224.ra3_in1k``), or any value prefixed ``hf-hub:``. The repository's ``config.json`` and weights are
fetched by `huggingface_hub.snapshot_download` into its own cache (``HF_HOME``, ``HF_HUB_CACHE``), once; later runs,
and runs with ``HF_HUB_OFFLINE=1``, read them from there. huggingface_hub is the ``hub`` extra; without it, a Hub id is
one line that says how to install it. What the files hold is checked by whoever reads them, as for a local file.

``gmlp export --push-to-hub ORG/NAME`` uploads an export folder with the same library (`check_push` before any
work, then `push`): it needs a token (``hf auth login``, or ``HF_TOKEN``) and the network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gmlp_vision.errors import CheckpointError, ExportError, first_line, printable

HUB_EXTRA = "pip install 'gmlp-vision[hub]'"
PREFIX = "hf-hub:"
FILES = ("config.json", "model.safetensors", "pytorch_model.bin")  # what is fetched of a repository
WEIGHT_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".safetensors", ".onnx", ".ckpt"})  # a path, even when missing
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def hub_id(value: str | Path) -> str | None:
    """The Hub repository ``value`` names, or None when it is a path (see the module docstring).

    Raises:
        CheckpointError: an ``hf-hub:`` value that is no ``ORG/NAME`` id.
    """
    text = str(value)
    if text.startswith(PREFIX):
        repo = text[len(PREFIX) :]
        if not _ID.fullmatch(repo) or ".." in repo:
            raise CheckpointError(f"{printable(text)}: a Hub id reads {PREFIX}ORG/NAME")
        return repo
    if os.path.lexists(text) or Path(text).suffix in WEIGHT_SUFFIXES or ".." in text:
        return None
    return text if _ID.fullmatch(text) else None


def fetch(repo: str, what: str) -> Path:
    """The local folder holding ``repo``'s config and weights: fetched once, then read from the cache.

    Args:
        repo: the repository id (`hub_id`).
        what: how the messages name the value (``--init``, ``MODEL``).

    Raises:
        CheckpointError: no huggingface_hub (with the install line); the repository is neither in the cache nor
            reachable (offline, or no network); it does not exist; it holds none of the weight files.
    """
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{what} {repo}: fetching from the Hugging Face Hub needs huggingface_hub: {HUB_EXTRA}"
        ) from None
    try:
        folder = Path(snapshot_download(repo, allow_patterns=list(FILES)))
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{what} {repo}: no such file or folder here, and no such model on the Hugging Face Hub"
        ) from None
    except LocalEntryNotFoundError:
        offline = getattr(constants, "HF_HUB_OFFLINE", False)
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise CheckpointError(
            f"{what} {repo}: not in the Hugging Face cache and {where}; fetch it once online"
        ) from None
    except Exception as e:  # huggingface_hub's HTTP, validation and file errors: one line for all
        raise CheckpointError(f"{what} {repo}: could not be fetched ({first_line(e)})") from None
    if not any((folder / name).is_file() for name in FILES[1:]):
        raise CheckpointError(f"{what} {repo}: the repository holds no {' or '.join(FILES[1:])}")
    return folder


def weights_file(folder: Path) -> Path:
    """The weights file of a fetched repository: ``model.safetensors``, else ``pytorch_model.bin``."""
    return next((folder / name for name in FILES[1:] if (folder / name).is_file()), folder / FILES[1])


def check_push(repo: str) -> None:
    """Refuse, before anything is exported, an upload to ``repo`` that cannot start.

    Raises:
        ExportError: not an ``ORG/NAME`` id; no huggingface_hub (with the install line); ``HF_HUB_OFFLINE`` set; no
            token.
    """
    if not _ID.fullmatch(repo) or ".." in repo:
        raise ExportError(f"--push-to-hub {printable(repo)}: a Hub repository reads ORG/NAME")
    try:
        from huggingface_hub import constants, get_token
    except ImportError:
        raise ExportError(f"--push-to-hub needs huggingface_hub: {HUB_EXTRA}") from None
    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise ExportError("--push-to-hub cannot upload while HF_HUB_OFFLINE is set")
    if get_token() is None:
        raise ExportError("--push-to-hub needs a Hugging Face token: run `hf auth login`, or set HF_TOKEN")


def push(folder: Path, repo: str, files: list[str]) -> str:
    """Upload ``files`` of ``folder`` to the model repository ``repo`` (made if missing); returns its address.

    Only ``files`` go: what the export wrote, never the rest of a folder it was written into.

    Raises:
        ExportError: the Hub refused or could not be reached (one line: the library's reason).
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo, folder_path=folder, repo_type="model", commit_message="gmlp export", allow_patterns=files
        )
    except Exception as e:  # huggingface_hub's HTTP and validation errors, and the network's
        raise ExportError(f"--push-to-hub {repo}: the upload failed ({first_line(e)})") from None
    return str(url)


__all__ = ["FILES", "HUB_EXTRA", "PREFIX", "check_push", "fetch", "hub_id", "push", "weights_file"]
