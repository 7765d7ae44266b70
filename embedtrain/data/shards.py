"""Arrow IPC shards: the prepared form of the dataset, and its memory-mapped reader.

Layout of a prepared folder:
    manifest.json                 subsets, instructions, row counts, shard files and sha256
    <subset>/corpus-00000.arrow   id, text                          (row r = doc r of the subset)
    <subset>/queries-00000.arrow  question_id, question, corpus, positives, positive_hashes, negs, length
        corpus: the corpus_id the doc rows refer to; positives: doc rows of every pos_doc in stored
        order (an id listed twice kept once); positive_hashes: content_hash of each positive's text
        (every known positive is masked out of its query's negative pool); negs: doc rows of
        neg_doc in stored (ranked) order; length: chars of question + first positive.

Every shard is one record batch, so a memory-mapped read is zero-copy and row access is O(1).
Readers open files lazily, so DataLoader workers each map their own view after fork. Mappings are
advised random access (no read-ahead), and `release()` drops the pages a process has touched
(they stay in the page cache), so a reader's RSS does not grow with the dataset it has read.
"""

import bisect
import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedtrain.data.nemotron import Example
from embedtrain.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "embedtrain-shards-v2"  # v2: every positive of a query (v1 kept only pos_doc[0])
QUERY_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("question", pa.string()),
        ("corpus", pa.string()),
        ("positives", pa.list_(pa.int64())),
        ("positive_hashes", pa.list_(pa.int64())),
        ("negs", pa.list_(pa.int64())),
        ("length", pa.int64()),
    ]
)
CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
PREPARE_AGAIN = "prepare the source dataset again with this embedtrain (`embedtrain prepare SRC OUT`, into a new OUT)"


def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path, table):
    """Write one single-batch IPC file atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_batch(
            table.combine_chunks().to_batches()[0]
            if table.num_rows
            else pa.RecordBatch.from_pylist([], schema=table.schema)
        )
    os.replace(tmp, path)
    return {"file": path.name, "rows": table.num_rows, "sha256": sha256_of(path)}


def write_sharded(folder, prefix, table, shard_bytes):
    """Split `table` into shards of about `shard_bytes` and write them; returns their entries."""
    rows_per_shard = max(1, int(table.num_rows * shard_bytes / max(1, table.nbytes))) if table.num_rows else 1
    entries = []
    for index, start in enumerate(range(0, max(1, table.num_rows), rows_per_shard)):
        entries.append(write_shard(Path(folder) / f"{prefix}-{index:05d}.arrow", table.slice(start, rows_per_shard)))
    return entries


def read_manifest(folder):
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder} is not a prepared dataset (no {MANIFEST}); run `embedtrain prepare`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; {PREPARE_AGAIN}")
    return manifest


class ShardedTable:
    """Rows of a list of shards, addressed by one index; shards are memory-mapped on first use."""

    def __init__(self, folder, entries, schema=None):
        self.paths = [Path(folder) / e["file"] for e in entries]
        self.schema = schema
        self.starts = [0]
        for entry in entries:
            self.starts.append(self.starts[-1] + entry["rows"])
        self.batches = [None] * len(entries)
        self.mappings = []

    def __len__(self):
        return self.starts[-1]

    def batch(self, shard):
        if self.batches[shard] is None:
            with open(self.paths[shard], "rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            mapping.madvise(mmap.MADV_RANDOM)
            reader = pa.ipc.open_file(pa.py_buffer(mapping))
            if self.schema is not None and not reader.schema.equals(self.schema):
                # e.g. older shards under a newer manifest: prepare skips subsets it finished before
                raise DataError(
                    f"{self.paths[shard]}: columns {reader.schema.names}, expected {self.schema.names}; {PREPARE_AGAIN}"
                )
            self.batches[shard] = reader.get_batch(0) if reader.num_record_batches else None
            self.mappings.append(mapping)
        return self.batches[shard]

    def release(self):
        """Unmap the touched pages of every shard (read-only mappings: later reads fault them back in)."""
        for mapping in self.mappings:
            mapping.madvise(mmap.MADV_DONTNEED)

    def locate(self, row):
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} outside 0..{len(self) - 1}")
        shard = bisect.bisect_right(self.starts, row) - 1
        return self.batch(shard), row - self.starts[shard]

    def value(self, row, column):
        batch, offset = self.locate(row)
        return batch.column(column)[offset].as_py()


class PreparedDataset:
    """A prepared folder as one index space of queries (subsets in manifest order)."""

    def __init__(self, folder, subsets=None):
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        available = self.manifest["subsets"]
        names = list(subsets) if subsets else list(available)
        missing = [n for n in names if n not in available]
        if missing:
            raise DataError(
                f"data.subsets: {', '.join(missing)} not in {self.folder / MANIFEST}; available: {', '.join(available)}"
            )
        self.names = names
        self.info = {n: available[n] for n in names}
        self.queries = {n: ShardedTable(self.folder / n, available[n]["query_shards"], QUERY_SCHEMA) for n in names}
        # corpora are keyed by corpus_id: a query's doc rows resolve in the corpus its row names
        self.corpora = {
            meta["corpus_id"]: ShardedTable(self.folder / name, meta["corpus_shards"])
            for name, meta in available.items()
        }
        self.starts = [0]
        for name in names:
            self.starts.append(self.starts[-1] + len(self.queries[name]))

    def __len__(self):
        return self.starts[-1]

    def release(self):
        for table in [*self.queries.values(), *self.corpora.values()]:
            table.release()

    def subset_sizes(self):
        return [len(self.queries[n]) for n in self.names]

    def without_negatives(self, name):
        """(queries of subset `name` with no hard negative, the first one's question_id): from the
        list offsets of the negs column, without reading the negatives themselves."""
        table, count, first = self.queries[name], 0, None
        for shard in range(len(table.paths)):
            batch = table.batch(shard)
            if batch is None:
                continue
            negatives = batch.column("negs")
            empty = np.flatnonzero(np.diff(negatives.offsets.to_numpy(zero_copy_only=False)) == 0)
            if first is None and len(empty):
                first = batch.column("question_id")[int(empty[0])].as_py()
            count += len(empty)
        return count, first

    def require_negatives(self, hard_negatives):
        """With loss.hard_negatives > 0 every query must have a negative: checked when training
        sets up, before the engine starts (else the first query without one stops a DataLoader
        worker mid-run). The message names the subsets and how to get negatives."""
        if hard_negatives <= 0:
            return
        lacking = {name: self.without_negatives(name) for name in self.names}
        lacking = {name: found for name, found in lacking.items() if found[0]}
        self.release()
        if not lacking:
            return
        counts = ", ".join(
            f"{name}: {count} of {len(self.queries[name])} queries (first {first!r})"
            for name, (count, first) in lacking.items()
        )
        source = self.manifest.get("source") or "SRC"
        if "@" in source and not Path(source).exists():  # a Hub id, recorded as id@snapshot
            source = source.split("@")[0]
        raise DataError(
            f"{self.folder}: this data has no negatives ({counts} have no neg_doc) but "
            f"loss.hard_negatives={hard_negatives}: mine them with `embedtrain mine MODEL {source} MINED` "
            "(MODEL: an exported embedding model) and train on data.path=MINED, or set loss.hard_negatives=0 "
            "with loss.negatives=local or global"
        )

    def locate(self, index):
        position = bisect.bisect_right(self.starts, index) - 1
        return self.names[position], index - self.starts[position]

    def length(self, index):
        name, row = self.locate(index)
        return self.queries[name].value(row, "length")

    def example(self, index, hard_negatives, positive=0):
        """Query `index` with positive number `positive` (modulo its number of positives: the
        stream passes the query's epoch under data.positive_sampling=cycle), then `hard_negatives`
        of its negatives (cycled when it has fewer)."""
        name, row = self.locate(index)
        batch, offset = self.queries[name].locate(row)
        corpus = self.corpora[batch.column("corpus")[offset].as_py()]
        negatives = batch.column("negs")[offset].as_py()
        positives = batch.column("positives")[offset].as_py()
        doc_rows = [positives[positive % len(positives)]]
        if hard_negatives:
            if not negatives:
                raise DataError(
                    f"{name}: question_id {batch.column('question_id')[offset].as_py()!r} has no "
                    f"neg_doc but loss.hard_negatives={hard_negatives}"
                )
            doc_rows += [negatives[i % len(negatives)] for i in range(hard_negatives)]
        return Example(
            name,
            batch.column("question")[offset].as_py(),
            [corpus.value(r, "text") for r in doc_rows],
            batch.column("question_id")[offset].as_py(),
            batch.column("positive_hashes")[offset].as_py(),
        )
