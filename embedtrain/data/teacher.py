"""The teacher-embedding cache for embedding distillation: every distinct query and passage text of
the training data, embedded once by a teacher model, looked up by text while the student trains.

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
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from embedtrain.data.nemotron import DataError, content_hash
from embedtrain.data.shards import MANIFEST, PreparedDataset

CACHE_FORMAT = "embedtrain-teacher-cache-v1"
METADATA = "teacher.json"
SIDES = ("query", "passage")
PLURAL = {"query": "queries", "passage": "passages"}
CACHE_DTYPES = ("float16", "float32")
CHUNK = 2048  # texts read, hashed and encoded at a time: bounds the memory of texts on large datasets
COPY_ROWS = 65536  # embedding rows reordered at a time when the tables are sorted by hash


def hashes_file(side):
    return f"{side}-hashes.npy"


def embeddings_file(side):
    return f"{side}-embeddings.npy"


def rebuild_command(metadata, folder):
    """The command line that builds the cache at `folder` again, from what teacher.json recorded."""
    subsets = f" --subsets {','.join(metadata['subsets'])}" if metadata.get("subsets") else ""
    dtype = f" --cache-dtype {metadata['cache_dtype']}" if metadata.get("cache_dtype") else ""
    return (
        f"embedtrain encode {metadata.get('teacher', 'TEACHER')} --teacher-cache {metadata.get('data', 'DATA')}"
        f"{subsets}{dtype} --output {folder}"
    )


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
    Pickles as its path and metadata, so a DataLoader worker maps its own view."""

    def __init__(self, path):
        self.path = Path(path)
        self.metadata = read_cache_metadata(self.path)
        self.tables = {}

    @property
    def dim(self):
        """Width of the teacher's embeddings."""
        return int(self.metadata["teacher_dim"])

    def __len__(self):
        return sum(self.metadata["counts"].values())

    def __getstate__(self):
        return {"path": self.path, "metadata": self.metadata}

    def __setstate__(self, state):
        self.path, self.metadata, self.tables = state["path"], state["metadata"], {}

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
                f"other data or subsets; rebuild it with `{rebuild_command(self.metadata, self.path)}`"
            )
        return np.asarray(embeddings[rows], dtype=np.float32)


def subset_prompts(dataset, policy):
    """{subset: {"query": prompt, "passage": prompt}}: the teacher's own prompts for each subset
    (with their joiner), as `embedtrain eval` gives them to the model."""
    prompts = {}
    for name in dataset.names:
        query, passage = policy.for_subset(dataset.info[name])
        prompts[name] = {"query": query, "passage": passage}
    return prompts


def shard_batches(table):
    """The record batches of a ShardedTable (empty shards left out)."""
    return [batch for batch in (table.batch(shard) for shard in range(len(table.paths))) if batch is not None]


def passage_rows(dataset, name):
    """{corpus_id: sorted unique doc rows} of every positive and hard negative of subset `name`'s
    queries (a query's doc rows resolve in the corpus its row names)."""
    rows = {}
    for batch in shard_batches(dataset.queries[name]):
        corpora = np.array(batch.column("corpus").to_pylist(), dtype=object)
        for column in ("positives", "negs"):
            lists = batch.column(column)
            counts = np.diff(lists.offsets.to_numpy(zero_copy_only=False))
            owners = np.repeat(corpora, counts)
            values = lists.flatten().to_numpy(zero_copy_only=False)
            for corpus in set(corpora.tolist()):
                rows.setdefault(corpus, []).append(values[owners == corpus])
    return {corpus: np.unique(np.concatenate(parts)) for corpus, parts in rows.items()}


def query_texts(dataset, name):
    """(count, iterator of text chunks) of every query of subset `name`, in stored order."""
    table = dataset.queries[name]

    def chunks():
        for batch in shard_batches(table):
            column = batch.column("question")
            for start in range(0, len(column), CHUNK):
                yield column.slice(start, CHUNK).to_pylist()

    return len(table), chunks()


def corpus_texts(table, rows):
    """Texts of the sorted doc `rows` of a corpus ShardedTable, in that order (one take per shard)."""
    shards = np.searchsorted(table.starts, rows, side="right") - 1
    texts = []
    for shard in np.unique(shards):
        local = rows[shards == shard] - table.starts[shard]
        texts += table.batch(int(shard)).column("text").take(local).to_pylist()
    return texts


def passage_texts(dataset, name):
    """(count, iterator of text chunks) of the doc rows every positive and negative of subset
    `name` refers to, corpus by corpus; a doc row once per corpus."""
    rows = passage_rows(dataset, name)

    def chunks():
        for corpus, corpus_rows in rows.items():
            for start in range(0, len(corpus_rows), CHUNK):
                yield corpus_texts(dataset.corpora[corpus], corpus_rows[start : start + CHUNK])

    return sum(len(r) for r in rows.values()), chunks()


class SideWriter:
    """Appends one side's embeddings (in `cache_dtype`) to a raw file and collects their hashes,
    then writes both tables sorted by hash."""

    def __init__(self, folder, side, dim, cache_dtype):
        self.folder, self.side, self.dim, self.dtype = Path(folder), side, dim, np.dtype(cache_dtype)
        self.raw_path = self.folder / f"{side}-embeddings.raw"
        self.raw = open(self.raw_path, "wb")
        self.hashes = []

    def append(self, hashes, embeddings):
        self.raw.write(np.ascontiguousarray(embeddings, dtype=self.dtype).tobytes())
        self.hashes.append(np.asarray(hashes, dtype=np.int64))

    def finish(self):
        """Write <side>-hashes.npy (sorted) and <side>-embeddings.npy (rows in the same order); returns the count."""
        self.raw.close()
        hashes = np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.int64)
        order = np.argsort(hashes, kind="stable")
        np.save(self.folder / hashes_file(self.side), hashes[order])
        out = np.lib.format.open_memmap(
            self.folder / embeddings_file(self.side), mode="w+", dtype=self.dtype, shape=(len(hashes), self.dim)
        )
        if len(hashes):
            raw = np.memmap(self.raw_path, dtype=self.dtype, mode="r", shape=(len(hashes), self.dim))
            for start in range(0, len(order), COPY_ROWS):
                out[start : start + COPY_ROWS] = raw[order[start : start + COPY_ROWS]]
            del raw
        out.flush()
        del out
        self.raw_path.unlink()
        return len(hashes)


def encode_side(side, dataset, prompts, embed, writer, progress):
    """Embed every distinct text of one side, subset by subset with each subset's prompt, into
    `writer`. Returns the number of distinct texts that occur in several subsets with different
    prompts (embedded once, with the first subset's)."""
    read = query_texts if side == "query" else passage_texts
    sources = [(name, *read(dataset, name)) for name in dataset.names]
    first_prompt, shared = {}, set()  # hash -> the prompt its text was embedded with
    bar = tqdm(
        total=sum(count for _, count, _ in sources), desc=f"teacher {PLURAL[side]}", unit="text", disable=not progress
    )
    for name, _, chunks in sources:
        prompt = prompts[name][side]
        for texts in chunks:
            kept, hashes = [], []
            for text in texts:
                key = content_hash(text)
                if key not in first_prompt:
                    first_prompt[key] = prompt
                    kept.append(text)
                    hashes.append(key)
                elif first_prompt[key] != prompt:
                    shared.add(key)
            if kept:
                writer.append(hashes, embed(kept, prompt))
            bar.update(len(texts))
    bar.close()
    return len(shared)


def prepared_folder(data_path, work, subsets):
    """The prepared dataset folder of `data_path`: itself when it is one, else a raw dataset
    (folder or file `embedtrain prepare` reads) prepared into `work`/prepared, as
    `embedtrain train` prepares a raw data.path."""
    from embedtrain.data.prepare import prepare

    data_path = Path(data_path)
    if not data_path.exists():
        raise DataError(f"--teacher-cache {data_path}: no such folder or file")
    if (data_path / MANIFEST).is_file():
        return data_path
    target = Path(work) / "prepared"
    prepare(data_path, target, list(subsets) if subsets else None)
    return target


def check_output(output):
    """An output that exists must be a teacher cache (rebuilt in its place) or an empty folder:
    anything else is refused before hours of encoding, never overwritten."""
    output = Path(output)
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    if output.is_dir() and (output / METADATA).is_file():
        read_cache_metadata(output)  # a folder of ours: replaced when the new cache is complete
        return
    raise DataError(f"--output {output} exists and is not a teacher cache; remove it or choose another folder")


def sibling_folder(output, tag):
    """A new, uniquely named hidden folder next to `output` (created with the usual permissions,
    unlike tempfile.mkdtemp's owner-only ones: a cache is often read by other users' jobs)."""
    folder = output.parent / f".{output.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return folder


def publish(work, output):
    """Put the finished cache at `output` by renames: a cache already there is moved aside, then
    removed, so `output` is at every moment either absent, the old cache or the complete new one."""
    output = Path(output)
    old = None
    if output.exists():
        old = sibling_folder(output, "old")
        os.replace(output, old / "cache")
    os.replace(work, output)
    if old is not None:
        shutil.rmtree(old)


def write_teacher_cache(
    teacher,
    data_path,
    output,
    *,
    batch_size=32,
    device=None,
    dtype=None,
    cache_dtype="float16",
    subsets=None,
    progress=True,
    max_tokens=None,
):
    """Encode every distinct query text and every distinct passage text (all positives and all hard
    negatives) of the training data at `data_path` with the teacher model folder `teacher`, and write
    the cache folder `output`. Returns the summary dict also written to output/teacher.json.

    `data_path`: a prepared folder, or a raw dataset prepared into the temporary folder first (and
    removed with it). The teacher embeds each subset's texts with its own prompts for that subset,
    truncated to its max_seq_length, normalised. `max_tokens` caps padded tokens per batch, as for
    `embedtrain encode`. Everything is written into a temporary folder next to `output`, renamed
    into place when complete; an existing cache at `output` is replaced then."""
    from embedtrain.encode import encode_texts, load_encoder

    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype {cache_dtype!r}: expected one of {', '.join(CACHE_DTYPES)}")
    output = Path(output).resolve()
    check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = sibling_folder(output, "tmp")
    try:
        prepared = prepared_folder(data_path, work, subsets)
        dataset = PreparedDataset(prepared, subsets)
        encoder, tokenizer, policy, max_length = load_encoder(teacher, dtype=dtype, device=device)
        dim = encoder.backbone.config.hidden_size
        prompts = subset_prompts(dataset, policy)

        def embed(texts, prompt):
            return encode_texts(encoder, tokenizer, texts, batch_size, max_length, max_tokens=max_tokens, prompt=prompt)

        counts, shared = {}, {}
        for side in SIDES:
            writer = SideWriter(work, side, dim, cache_dtype)
            shared[side] = encode_side(side, dataset, prompts, embed, writer, progress)
            counts[side] = writer.finish()
        from_raw = prepared != Path(data_path)
        summary = {
            "format": CACHE_FORMAT,
            "teacher": str(Path(teacher).resolve()),
            "teacher_dim": dim,
            "cache_dtype": cache_dtype,
            "counts": counts,
            "data": str(Path(data_path).resolve()),
            "prepared_from_raw": from_raw,
            "subsets": list(dataset.names),
            "prompt_source": policy.source,
            "prompts": prompts,
            "shared_across_prompts": shared,
            "max_length": max_length,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if from_raw:  # the cache is what was asked for: a prepared copy of the data would double its size
            shutil.rmtree(prepared)
        (work / METADATA).write_text(json.dumps(summary, indent=2) + "\n")
        publish(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary
