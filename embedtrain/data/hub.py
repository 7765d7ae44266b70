"""A dataset named by its Hugging Face id: downloaded into (or read from) the Hugging Face cache."""

from pathlib import Path


def resolve_dataset(src, subsets=None):
    """(local folder or file, how the manifest names the source) for `src`."""
    return Path(src), str(Path(src).resolve())
