"""A dataset named by its Hugging Face id (e.g. nvidia/embed-nemotron-dataset-v1): downloaded into the
Hugging Face cache with huggingface_hub (resumable; only the selected subsets' folders), or read from
the cache when offline (HF_HUB_OFFLINE=1) or when the Hub cannot be reached."""

import re
from pathlib import Path

from embedtrain.errors import DataError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_dataset(src, subsets=None):
    """(local folder or file, how the manifest names the source) for `src`: a path, or a Hub id."""
    path = Path(src)
    if path.exists():
        return path, str(path.resolve())
    if not HUB_ID.fullmatch(str(src)):
        raise DataError(f"{src}: no such file or folder, and not a Hugging Face dataset id (owner/name)")
    folder = download(str(src), subsets)
    return folder, f"{src}@{folder.name}"


def download(repo, subsets=None):
    """The local snapshot folder of dataset `repo` (the cached one when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError

    patterns = None
    if subsets:
        patterns = [f"{name}/*" for name in subsets] + ["README.md", "*.json"]
    try:
        return Path(snapshot_download(repo, repo_type="dataset", allow_patterns=patterns))
    except HFValidationError as err:
        raise DataError(f"{repo}: not a valid Hugging Face dataset id: {err}") from err
    except Exception as err:  # noqa: BLE001 - network, auth and cache errors all end here, in one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{repo}: cannot download it and it is not in the Hugging Face cache (HF_HOME) ({reason}); "
            "download it where there is network (`hf download --repo-type dataset "
            f"{repo}`) or pass a local folder"
        ) from err
