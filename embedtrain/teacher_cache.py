"""Building a teacher-embedding cache (`embedtrain encode TEACHER --teacher-cache DATA --output
CACHE_DIR`): every distinct query and passage text of the training data embedded once by the
teacher, each subset with the teacher's own prompts, written in the layout embedtrain.data.teacher
describes and reads. The folder is written whole into a temporary folder next to the output, then
renamed, so a killed run never leaves a folder that looks complete.
"""

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from embedtrain.config import resolve_path
from embedtrain.data.nemotron import content_hash
from embedtrain.data.prepare import prepare
from embedtrain.data.shards import MANIFEST, PreparedDataset
from embedtrain.data.teacher import (
    CACHE_FORMAT,
    METADATA,
    SIDES,
    embeddings_file,
    hashes_file,
    read_cache_metadata,
)
from embedtrain.errors import DataError, UsageError
from embedtrain.inference import BiEncoder
from embedtrain.inference.batching import encode_texts

PLURAL = {"query": "queries", "passage": "passages"}
CACHE_DTYPES = ("float16", "float32")
CHUNK = 2048  # texts read, hashed and encoded at a time: bounds the memory of texts on large datasets
COPY_ROWS = 65536  # embedding rows reordered at a time when the tables are sorted by hash


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
    """The prepared dataset folder of `data_path` (resolved: see write_teacher_cache): itself when
    it is one, else a raw dataset (folder or file `embedtrain prepare` reads) prepared into
    `work`/prepared, as `embedtrain train` prepares a raw data.path."""
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
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype {cache_dtype!r}: expected one of {', '.join(CACHE_DTYPES)}")
    data_path = resolve_path(str(data_path))  # assets:NAME, as in a recipe's data.path
    output = Path(output).resolve()
    check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = sibling_folder(output, "tmp")
    try:
        prepared = prepared_folder(data_path, work, subsets)
        dataset = PreparedDataset(prepared, subsets)
        model = BiEncoder.from_pretrained(teacher, device=device, dtype=dtype)
        encoder, tokenizer = model.module, model.tokenizer
        policy, max_length = model.prompt_policy, model.max_seq_length
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


def teacher_cache_command(teacher, data_path, output, subsets=None, cache_dtype="float16", **options):
    """`embedtrain encode --teacher-cache`: `subsets` as given to --subsets (comma-separated names,
    checked before the teacher loads), write_teacher_cache, and a line saying what was written.
    `options`: write_teacher_cache's batch_size, max_tokens, device and dtype."""
    names = [name.strip() for name in subsets.split(",")] if subsets is not None else None
    if names is not None and not all(names):
        raise UsageError(f"--subsets {subsets!r}: expected comma-separated subset names, e.g. FEVER,SciFact.")
    summary = write_teacher_cache(teacher, data_path, output, cache_dtype=cache_dtype, subsets=names, **options)
    counts = summary["counts"]
    print(
        f"wrote the teacher cache of {counts['query']:,} queries and {counts['passage']:,} passages "
        f"({summary['teacher_dim']} dims, {cache_dtype}) to {output}",
        flush=True,
    )
