"""The nvidia/embed-nemotron-dataset-v1 layout: one folder per subset holding dataset_metadata.json,
queries.parquet and corpus.parquet. Shared names and checks for `prepare` (embedtrain.data.prepare)."""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from embedtrain.errors import DataError

METADATA_KEYS = ("corpus_id", "query_instruction", "passage_instruction", "ids_only")
QUERY_COLUMNS = ("question_id", "question", "corpus_id", "pos_doc", "neg_doc")
CORPUS_COLUMNS = ("id", "text")


@dataclass
class Example:
    """One training example: a query and its passages (positive first, then k hard negatives), with
    the content hashes of all the query's known positives (none of them may count as a negative;
    Examples built outside prepared data may list none)."""

    subset: str
    query: str
    passages: list[str]
    question_id: str = ""
    positive_hashes: list[int] = field(default_factory=list)


def content_hash(text):
    """64-bit hash of a passage's text: the same text under another id (or corpus) is the same passage."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def subset_folders(root, names=None):
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder")
    found = sorted(p for p in root.iterdir() if (p / "dataset_metadata.json").is_file())
    if names is None:
        if not found:
            raise DataError(f"data.path: {root} holds no subset folders (none has dataset_metadata.json)")
        return found
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise DataError(
            f"data.subsets: {', '.join(missing)} not found under {root}; available: {', '.join(p.name for p in found)}"
        )
    return [root / n for n in names]


def read_metadata(folder):
    path = folder / "dataset_metadata.json"
    if not path.is_file():
        raise DataError(f"{folder.name}: missing {path}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{folder.name}: {path} is not valid JSON: {err}") from err
    absent = [k for k in METADATA_KEYS if k not in meta]
    if absent:
        raise DataError(f"{folder.name}: {path} lacks key(s) {', '.join(absent)}")
    return meta
