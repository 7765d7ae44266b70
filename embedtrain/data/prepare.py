"""`embedtrain prepare SRC OUT`: validate a local copy of embed-nemotron-dataset-v1, resolve doc ids
to rows of their corpus, and write Arrow IPC shards plus a manifest (embedtrain.data.shards).

Every problem is reported with subset, file and row. By default any problem fails the run (after
listing all of them); with `skip_bad_rows` the offending rows are left out and each one is written
to OUT/skipped_rows.jsonl. Subsets are prepared in parallel processes; a subset whose shards were
completed for the same source files is skipped when prepare is run again.
"""

import json
import os
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from embedtrain.data import parquet
from embedtrain.data.formats import location, to_layout
from embedtrain.data.hub import resolve_dataset
from embedtrain.data.nemotron import (
    CORPUS_COLUMNS,
    METADATA_KEYS,
    QUERY_COLUMNS,
    content_hash,
    read_metadata,
    subset_folders,
)
from embedtrain.data.restore import RECORD, restore_subsets
from embedtrain.data.shards import CORPUS_SCHEMA, FORMAT, MANIFEST, QUERY_SCHEMA, write_sharded
from embedtrain.errors import DataError, EmbedtrainError

DONE = "done.json"
SKIPPED = "skipped_rows.jsonl"


def fingerprint(folder):
    """What a finished subset was built from: file names, sizes and modification times."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(folder).iterdir()) if p.is_file()}


def structural_problems(folder):
    """Missing files and columns: problems that stop a subset before any row is read."""
    problems = []
    for name, columns in (("queries.parquet", QUERY_COLUMNS), ("corpus.parquet", CORPUS_COLUMNS)):
        path = folder / name
        if not path.is_file():
            problems.append(f"{folder.name}: missing {path}")
            continue
        have = parquet.read_schema(path).names
        absent = [c for c in columns if c not in have]
        if absent:
            problems.append(f"{folder.name}: {path} lacks column(s) {', '.join(absent)} (has {', '.join(have)})")
    return problems


def bad_text_rows(column):
    """Row -> reason for null, empty or non-UTF-8 values of a text column (vectorised when clean)."""
    column = column.combine_chunks()
    bad = {}
    if pa.types.is_string(column.type):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            column = column.cast(pa.binary())
    if pa.types.is_binary(column.type):
        decoded = []
        for row, value in enumerate(column.to_pylist()):
            try:
                decoded.append(None if value is None else value.decode("utf-8"))
            except UnicodeDecodeError:
                bad[row] = "text is not valid UTF-8"
                decoded.append("x")
        column = pa.array(decoded, pa.string())
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), True)
    for row in pc.indices_nonzero(empty).to_pylist():
        bad.setdefault(row, "empty text")
    return bad, column


def read_corpus(folder, subset):
    """(table of valid rows, id -> row, problems): bad rows are reported and left out."""
    path = folder / "corpus.parquet"
    table = parquet.read_table(path, CORPUS_COLUMNS)
    bad, text = bad_text_rows(table.column("text"))
    ids = table.column("id").to_pylist()
    problems, keep, id_to_row = [], [], {}
    for row, doc_id in enumerate(ids):
        reason = bad.get(row) or ("duplicate doc id " + repr(doc_id) if doc_id in id_to_row else None)
        if reason:
            problems.append({"subset": subset, "file": str(path), "row": row, "id": doc_id, "reason": reason})
            continue
        id_to_row[doc_id] = len(keep)
        keep.append(row)
    indices = pa.array(keep, pa.int64())
    valid = pa.table({"id": table.column("id").take(indices), "text": text.take(indices)}, schema=CORPUS_SCHEMA)
    return valid, id_to_row, problems


def resolve_queries(folder, subset, corpus_ids, texts_by_corpus):
    """Query rows with doc ids resolved to corpus rows, and the content hash of every positive's
    text (embedtrain.data.shards.QUERY_SCHEMA); problems name subset, file and row. Every pos_doc
    and neg_doc id must resolve. `texts_by_corpus[corpus_id](row)` is the text of a corpus row."""

    path = folder / "queries.parquet"
    rows = parquet.read_table(path, QUERY_COLUMNS).to_pylist()
    resolved, problems, seen = [], [], set()
    for row, q in enumerate(tqdm(rows, desc=f"{subset} queries", unit="q", leave=False, disable=len(rows) < 50_000)):

        def bad(reason, row=row, q=q):
            problems.append(
                {"subset": subset, "file": str(path), "row": row, "question_id": q["question_id"], "reason": reason}
            )

        if q["question_id"] in seen:
            bad(f"duplicate question_id {q['question_id']!r}")
            continue
        seen.add(q["question_id"])
        id_to_row = corpus_ids.get(q["corpus_id"])
        if id_to_row is None:
            bad(f"corpus_id {q['corpus_id']!r} names no corpus in the source")
            continue
        if not isinstance(q["question"], str) or not q["question"].strip():
            bad("empty question")
            continue
        if not q["pos_doc"]:
            bad("empty pos_doc")
            continue
        positive_ids = list(dict.fromkeys(d["id"] for d in q["pos_doc"]))  # stored order, an id once
        negative_ids = [d["id"] for d in q["neg_doc"] or []]
        dangling = [d for d in positive_ids + negative_ids if d not in id_to_row]
        if dangling:
            bad(f"doc id(s) {', '.join(dangling)} not in corpus {q['corpus_id']!r} (missing or bad rows)")
            continue
        positives = [id_to_row[d] for d in positive_ids]
        positive_texts = [texts_by_corpus[q["corpus_id"]](r) for r in positives]
        resolved.append(
            {
                "question_id": q["question_id"],
                "question": q["question"],
                "corpus": q["corpus_id"],
                "positives": positives,
                "positive_hashes": [content_hash(text) for text in positive_texts],
                "negs": [id_to_row[d] for d in negative_ids],
                "length": len(q["question"]) + len(positive_texts[0]),
            }
        )
    return pa.Table.from_pylist(resolved, schema=QUERY_SCHEMA), problems


def prepare_subset(folder, out, corpus_folders, skip_bad_rows, shard_bytes, skipped_before=0):
    """One subset, in its own process. Returns (manifest entry or None, problems). `skipped_before`:
    its bad rows left out before (in conversion or restoration), counted in the entry's skipped_rows."""
    folder, target = Path(folder), Path(out) / Path(folder).name
    meta = read_metadata(folder)
    corpora, corpus_ids, problems = {}, {}, []
    for corpus_id, corpus_folder in corpus_folders.items():
        if corpus_folder == folder or corpus_id == meta["corpus_id"]:
            table, ids, bad = read_corpus(corpus_folder, Path(corpus_folder).name)
            corpora[corpus_id], corpus_ids[corpus_id] = table, ids
            problems += bad if corpus_folder == folder else []
    # queries may name another subset's corpus: its ids are read on demand
    for corpus_id in set(parquet.read_table(folder / "queries.parquet", ["corpus_id"]).column(0).to_pylist()):
        if corpus_id not in corpora and corpus_id in corpus_folders:
            corpora[corpus_id], corpus_ids[corpus_id], _ = read_corpus(corpus_folders[corpus_id], corpus_id)
    texts = {cid: (lambda table: lambda row: table.column("text")[row].as_py())(t) for cid, t in corpora.items()}
    queries, query_problems = resolve_queries(folder, folder.name, corpus_ids, texts)
    problems += query_problems
    if problems and not skip_bad_rows:
        return None, problems
    target.mkdir(parents=True, exist_ok=True)
    entry = {key: meta[key] for key in METADATA_KEYS if key != "ids_only"}
    entry.update(
        task_type=meta.get("task_type", ""),
        num_queries=queries.num_rows,
        num_docs=corpora[meta["corpus_id"]].num_rows,
        skipped_rows=len(problems) + skipped_before,
        corpus_shards=write_sharded(target, "corpus", corpora[meta["corpus_id"]], shard_bytes),
        query_shards=write_sharded(target, "queries", queries, shard_bytes),
    )
    restored = folder / RECORD
    if restored.is_file():
        entry["restored_from"] = json.loads(restored.read_text())["source"]
    (target / DONE).write_text(json.dumps({"entry": entry, "source": fingerprint(folder), "format": FORMAT}, indent=2))
    return entry, problems


SHOWN_BAD_ROWS = 10  # bad rows a failing prepare names; --skip-bad-rows lists every one


def bad_rows_error(problems, out):
    """One line: how many bad rows, the first SHOWN_BAD_ROWS of them (subset, file, row or line,
    reason), and the fix."""
    listing = "; ".join(f"{p['subset']}: {location(p)}: {p['reason']}" for p in problems[:SHOWN_BAD_ROWS])
    more = f"; and {len(problems) - SHOWN_BAD_ROWS} more" if len(problems) > SHOWN_BAD_ROWS else ""
    return DataError(
        f"{len(problems)} bad row(s): {listing}{more}. Fix them, or pass --skip-bad-rows to leave them out "
        f"(each is then listed in {Path(out) / SKIPPED})"
    )


def finished_entry(folder, out):
    done = Path(out) / Path(folder).name / DONE
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("source") == fingerprint(folder) and record.get("format") == FORMAT:
            return record["entry"]
    return None


def prepare(src, out, subsets=None, skip_bad_rows=False, workers=None, shard_mb=256, sources=None, input_format="auto"):
    """Prepare every (or the named) subset of `src` into `out`; returns the manifest.

    `src`: a local folder or file in one of the formats of embedtrain.data.formats, or a Hugging Face
    dataset id (downloaded into, or read from, the Hugging Face cache). `ids_only` subsets are
    restored from their sources (embedtrain.data.restore), looked up under `sources` first.
    """
    out = Path(out)
    created = not out.exists()
    try:
        return prepare_into(out, src, subsets, skip_bad_rows, workers, shard_mb, sources, input_format)
    except EmbedtrainError:
        if created:  # bad input leaves nothing behind; a folder that existed keeps its finished subsets
            shutil.rmtree(out, ignore_errors=True)
        raise


def prepare_into(out, src, subsets, skip_bad_rows, workers, shard_mb, sources, input_format):
    """prepare's work (its arguments): convert, restore, validate and shard, then the manifest."""
    src, origin = resolve_dataset(src, subsets)
    src, converted_problems = to_layout(src, input_format, out / "converted")
    folders = subset_folders(src, subsets)
    names = {f.name for f in folders}
    converted_problems = [p for p in converted_problems if p["subset"] in names]
    metas = {f: read_metadata(f) for f in folders}
    folders, restore_problems = restore_subsets(folders, metas, out / "restored", sources, workers, prepared=out)
    restore_problems = converted_problems + restore_problems
    if restore_problems and not skip_bad_rows:
        raise bad_rows_error(restore_problems, out)
    metas = {f: read_metadata(f) for f in folders}
    problems = [p for f in folders for p in structural_problems(f)]
    if problems:
        raise DataError("cannot prepare:\n  " + "\n  ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    corpus_folders = {m["corpus_id"]: f for f, m in metas.items()}
    entries, todo = {}, []
    for folder in folders:
        entry = finished_entry(folder, out)
        if entry is not None:
            entries[folder.name] = entry
            print(f"[embedtrain] {folder.name}: already prepared from the same files, skipped")
        else:
            todo.append(folder)
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    all_problems = list(restore_problems)
    before = Counter(p.get("subset") for p in restore_problems)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(prepare_subset, f, out, corpus_folders, skip_bad_rows, shard_mb << 20, before[f.name]): f
            for f in todo
        }
        for future in tqdm(futures, desc="subsets", unit="subset", disable=not todo):
            entry, found = future.result()
            all_problems += found
            if entry is not None:
                entries[futures[future].name] = entry
    if all_problems and not skip_bad_rows:
        raise bad_rows_error(all_problems, out)
    if all_problems:
        with open(out / SKIPPED, "a") as f:
            for problem in all_problems:
                f.write(json.dumps(problem) + "\n")
        print(f"[embedtrain] skipped {len(all_problems)} bad row(s); each is listed in {out / SKIPPED}")
    manifest = {
        "format": FORMAT,
        "source": origin,
        "subsets": {f.name: entries[f.name] for f in folders},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    return manifest


def prepare_command(src, out, subsets=(), *args, **kwargs):
    """`embedtrain prepare`: prepare (no `subsets`: all of them; the other arguments as prepare's)
    and a line counting what was prepared."""
    manifest = prepare(src, out, subsets or None, *args, **kwargs)
    total = sum(s["num_queries"] for s in manifest["subsets"].values())
    print(f"prepared {total:,} queries from {len(manifest['subsets'])} subset(s) into {out}", flush=True)
