"""The teacher-embedding cache for embedding distillation: every distinct query and passage text of
the training data, embedded once by a teacher model, looked up by text while the student trains.
This module reads a cache; embedtrain.teacher_cache writes one:

    embedtrain encode exported/teacher --teacher-cache /data/prepared --output /data/teacher-cache

Layout of a cache folder (written whole into a temporary folder next to it, then renamed, so a
killed run never leaves a folder that looks complete):

    teacher.json                  format, teacher, dim, dtype, counts, data, subsets, prompts, date
    query-hashes.npy              sorted int64 content_hash of each distinct query text
    query-embeddings.npy          (count, dim) float16/float32, row r = the text of hash r
    passage-hashes.npy, passage-embeddings.npy    the same for every positive and hard negative

Keys are `content_hash` of the raw text, before any prompt, one table per side: the teacher embeds
the same text differently as a query and as a passage. The teacher gets its own prompts for each
subset (embedtrain.prompts, as `embedtrain eval` prompts it). A text that occurs in several subsets
whose prompts differ is embedded once, with the prompt of the first of them (subsets in manifest
order); teacher.json counts those texts per side ("shared_across_prompts").

`TeacherCache` reads the arrays memory-mapped (numpy.load(mmap_mode="r")) on first lookup and finds
rows with numpy.searchsorted, so opening a cache of millions of texts costs no RAM up front and a
DataLoader worker can open (or unpickle) its own cheaply.
"""

import json
from pathlib import Path

import numpy as np

from embedtrain.data.nemotron import content_hash
from embedtrain.errors import DataError

CACHE_FORMAT = "embedtrain-teacher-cache-v1"
METADATA = "teacher.json"
SIDES = ("query", "passage")


def hashes_file(side):
    return f"{side}-hashes.npy"


def embeddings_file(side):
    return f"{side}-embeddings.npy"


def rebuild_command(metadata, folder, data=None):
    """The command line that builds the cache at `folder` again: with the teacher and dtype that
    teacher.json recorded, for the data that teacher.json recorded or, given `data` = (path,
    subsets or None), for that data (a cache that lacks texts of the training data must be built
    for the training data, not again for the data it was built for)."""
    path, subsets = data if data is not None else (metadata.get("data", "DATA"), metadata.get("subsets"))
    subsets = f" --subsets {','.join(subsets)}" if subsets else ""
    dtype = f" --cache-dtype {metadata['cache_dtype']}" if metadata.get("cache_dtype") else ""
    teacher = metadata.get("teacher", "TEACHER")
    return f"embedtrain encode {teacher} --teacher-cache {path}{subsets}{dtype} --output {folder}"


def read_cache_metadata(folder):
    """teacher.json of a cache folder; a folder without one, or of another format, is refused."""
    folder = Path(folder)
    path = folder / METADATA
    if not path.is_file():
        raise DataError(
            f"{folder} is not a teacher cache (no {METADATA}); build one with "
            "`embedtrain encode TEACHER --teacher-cache DATA --output CACHE_DIR`"
        )
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); rebuild the teacher cache") from err
    if not isinstance(metadata, dict) or metadata.get("format") != CACHE_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise DataError(
            f"{folder}: teacher cache format {found!r}, expected {CACHE_FORMAT!r}; rebuild it with "
            f"`{rebuild_command(metadata if isinstance(metadata, dict) else {}, folder)}`"
        )
    return metadata


def check_side(side):
    if side not in SIDES:
        raise ValueError(f"side {side!r}: expected one of {', '.join(SIDES)}")


class TeacherCache:
    """Teacher embeddings of a cache folder by text. Construction reads teacher.json only (and
    refuses a folder that is not a cache); each side's arrays are memory-mapped on its first lookup.
    Pickles as its path and metadata, so a DataLoader worker maps its own view. `data`: the training
    data (data.path, data.subsets or None) the cache serves, named by the hint when a text is missing."""

    def __init__(self, path, data=None):
        self.path = Path(path)
        self.metadata = read_cache_metadata(self.path)
        self.data = None if data is None else (str(data[0]), list(data[1]) if data[1] else None)
        self.tables = {}

    @property
    def dim(self):
        """Width of the teacher's embeddings."""
        return int(self.metadata["teacher_dim"])

    def __len__(self):
        return sum(self.metadata["counts"].values())

    def __getstate__(self):
        return {"path": self.path, "metadata": self.metadata, "data": self.data}

    def __setstate__(self, state):
        self.path, self.metadata, self.data, self.tables = state["path"], state["metadata"], state["data"], {}

    def table(self, side):
        """(sorted hashes, embeddings) of one side, memory-mapped on first use and checked against
        teacher.json (a truncated or mismatched file is an error, not wrong rows)."""
        if side not in self.tables:
            hashes = np.load(self.path / hashes_file(side), mmap_mode="r")
            embeddings = np.load(self.path / embeddings_file(side), mmap_mode="r")
            expected = (int(self.metadata["counts"][side]), self.dim)
            if hashes.shape != expected[:1] or embeddings.shape != expected:
                raise DataError(
                    f"{self.path}: {side} tables hold {hashes.shape} hashes and {embeddings.shape} embeddings, "
                    f"{METADATA} says {expected}; rebuild the cache with `{rebuild_command(self.metadata, self.path)}`"
                )
            self.tables[side] = hashes, embeddings
        return self.tables[side]

    def lookup(self, texts, side):
        """float32 (len(texts), dim) teacher embeddings of raw `texts` (no prompt) on `side`
        ("query" or "passage"). A text that is not in that side's table is an error naming it."""
        check_side(side)
        if isinstance(texts, str):
            raise TypeError("TeacherCache.lookup takes a list of texts, not one string")
        texts = list(texts)
        hashes, embeddings = self.table(side)
        keys = np.array([content_hash(text) for text in texts], dtype=np.int64)
        rows = np.minimum(np.searchsorted(hashes, keys), max(len(hashes) - 1, 0))
        found = hashes[rows] == keys if len(hashes) else np.zeros(len(keys), dtype=bool)
        if not found.all():
            missing = np.flatnonzero(~found)
            raise DataError(
                f"{self.path}: the {side} text {texts[missing[0]][:80]!r} is not in this teacher cache "
                f"({len(missing)} of {len(texts)} looked-up {side} texts are missing): the cache was built for "
                f"other data or subsets ({self.metadata.get('data', 'unknown')}); build it for this data with "
                f"`{rebuild_command(self.metadata, self.path, self.data or ('DATA', None))}`"
            )
        return np.asarray(embeddings[rows], dtype=np.float32)
