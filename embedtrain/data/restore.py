"""Restoring the text of `ids_only` subsets of embed-nemotron-dataset-v1 from their original sources.

An `ids_only` subset does not redistribute its text: its `question` column holds `q_<i>` and its
corpus ids are `d_<i>`, where i is the 0-based row position in a public source named by the
subset's `source_config.json` (format of NVIDIA's dataset, as read by NeMo AutoModel's data
preparation):

    {"loader_config": "mteb", "source_repo": "mteb/..."}
        q_i = column `text` of row i of config `queries`, split `queries`;
        d_i = column `text` of row i of config `corpus`, split `corpus` (numbered independently).
    {"loader_config": "column", "source_repo": "...", "split": "train", "subset": <config or absent>,
     "query_column": "...", "document_column": "..."}
        one table: row i gives q_i from query_column and d_i from document_column.

`pos_doc` / `neg_doc` ids are corpus ids and stay as they are. A source is read, in order, from
SOURCES/<owner>/<name> (a local copy loadable by `datasets.load_dataset`, e.g. parquet files with a
dataset card declaring the configs), else from the Hugging Face Hub through `datasets` (its cache
honoured, HF_DATASETS_OFFLINE / HF_HUB_OFFLINE respected).

Sources are streamed in row order (memory grows with the rows a subset uses, not with the source).
No revision is pinned by the dataset, so a reordered or edited source would silently shift every
id: the rows used are fingerprinted (row number and text of each, in row order), the fingerprint is
recorded in the manifest, and a later restoration that finds another fingerprint stops.

The restored subset is written to STAGING/<Subset>/ in the embed-nemotron layout (with
restored.json), and prepared from there like a subset that carries its text.
"""

import hashlib
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from embedtrain.data import parquet
from embedtrain.data.formats import atomic_json, atomic_parquet
from embedtrain.errors import DataError

SOURCE_CONFIG = "source_config.json"
RECORD = "restored.json"
LOADERS = ("mteb", "column")
BATCH_ROWS = 16_384
ID_PATTERN = {"q": re.compile(r"q_(\d+)"), "d": re.compile(r"d_(\d+)")}


def read_source_config(folder):
    path = Path(folder) / SOURCE_CONFIG
    if not path.is_file():
        raise DataError(f"{Path(folder).name}: ids_only subset without {path}: its text cannot be restored")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{Path(folder).name}: {path} is not valid JSON: {err}") from err
    required = ["loader_config", "source_repo"]
    if config.get("loader_config") == "column":
        required += ["split", "query_column", "document_column"]
    absent = [k for k in required if not config.get(k)]
    if absent:
        raise DataError(f"{Path(folder).name}: {path} lacks key(s) {', '.join(absent)}")
    if config["loader_config"] not in LOADERS:
        raise DataError(
            f"{Path(folder).name}: {path}: loader_config {config['loader_config']!r} is not one of {', '.join(LOADERS)}"
        )
    return config


def tables_of(config):
    """The source tables of a source config: [(config name, split, {column: "q" or "d"})]."""
    if config["loader_config"] == "mteb":
        return [("queries", "queries", {"text": "q"}), ("corpus", "corpus", {"text": "d"})]
    return [(config.get("subset"), config["split"], {config["query_column"]: "q", config["document_column"]: "d"})]


def source_location(repo, sources):
    """A local copy under `sources` if there is one, else the Hub id itself."""
    if sources is not None:
        local = Path(sources) / repo
        if local.is_dir():
            return str(local.resolve()), True
    return repo, False


class ParquetTable:
    """The parquet files of one config/split of a local copy, read one row group at a time (peak
    memory is one row group, whatever the source's size)."""

    def __init__(self, files):
        self.files = [Path(f) for f in files]
        self.column_names = parquet.read_schema(self.files[0]).names if self.files else []

    def batches(self, columns):
        for path in self.files:
            reader = parquet.open_file(path)
            for group in range(reader.metadata.num_row_groups):
                with parquet.reading(path):
                    batch = reader.read_row_group(group, columns=list(columns))
                yield batch
                pa.default_memory_pool().release_unused()  # else the allocator keeps old row groups' pages


def table_batches(table, columns):
    """Arrow tables of `columns`, in row order."""
    if isinstance(table, ParquetTable):
        return table.batches(columns)
    return table.select_columns(list(columns)).with_format("arrow").iter(batch_size=BATCH_ROWS)


def open_table(subset, repo, location, local, name, split):
    """(table, revision) of one source table; errors name the subset and the source.

    A local copy is read from its files as its dataset card declares them (parquet row group by
    row group; other formats streamed by datasets): datasets' cache of a local folder is not
    invalidated when the files change, so it could serve rows of an older copy. A Hub source is
    read through the Hugging Face cache, keyed by the commit it resolved to (the revision recorded).
    """
    import datasets

    what = f"{subset}: source {repo} (config {name or 'default'}, split {split}, from {location})"
    try:
        builder = datasets.load_dataset_builder(location, name=name)
        if local:
            files = (builder.config.data_files or {}).get(split)
            if files is None:
                raise ValueError(f"no split {split!r} (has {', '.join(builder.config.data_files or {})})")
            if files and all(str(f).endswith(".parquet") for f in files):
                return ParquetTable(files), None
            return datasets.load_dataset(location, name=name, split=split, streaming=True), None
        builder.download_and_prepare()
        return builder.as_dataset(split=split), builder.hash
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "this source is unreadable"
        hint = "" if local else "; offline without a cached copy? pass a local copy with --sources"
        raise DataError(f"{what} could not be loaded: {type(err).__name__}: {err}{hint}") from err


def parse_ids(values, kind):
    """Row positions named by `q_<i>` / `d_<i>` ids (-1 where a value is not of that form)."""
    pattern = ID_PATTERN[kind]
    rows = np.full(len(values), -1, dtype=np.int64)
    for position, value in enumerate(values):
        match = pattern.fullmatch(value) if isinstance(value, str) else None
        if match:
            rows[position] = int(match.group(1))
    return rows


class Requests:
    """The source rows one side (queries or documents) of a subset needs, and where each one goes."""

    def __init__(self, kind, rows, file, labels):
        self.kind, self.rows, self.file, self.labels = kind, rows, file, labels
        self.texts = [None] * len(rows)
        self.order = np.argsort(rows, kind="stable")
        self.sorted_rows = rows[self.order]

    def fill(self, start, column):
        """Take the texts of rows [start, start + len(column)) that are requested."""
        lo, hi = np.searchsorted(self.sorted_rows, [start, start + len(column)])
        if lo == hi:
            return []
        wanted = self.sorted_rows[lo:hi]
        values = column.take(pa.array(wanted - start)).to_pylist()
        for position, value in zip(self.order[lo:hi], values):
            self.texts[position] = value
        return list(zip(wanted.tolist(), values))


def stream_table(table, columns, requests, digest, progress):
    """Stream `table` once in row order, filling every request and hashing the rows used; returns
    its number of rows."""
    start = 0
    for batch in table_batches(table, columns):
        for column, kind in columns.items():
            used = requests[kind].fill(start, batch.column(column))
            previous = None
            for row, text in used:
                if row != previous:  # a row named twice is hashed once
                    digest.update(f"{kind}{row}\x1f".encode())
                    digest.update((text or "").encode("utf-8"))
                    digest.update(b"\x1e")
                    previous = row
        start += batch.num_rows
        progress.update(batch.num_rows)
    return start


def restore_subset(folder, staging, sources=None, recorded=()):
    """Restore one ids_only subset into STAGING/<Subset>; returns (staged folder, problems).

    `recorded`: [(source record, where)] of earlier runs; a different fingerprint stops the run
    before anything is written."""
    folder, target = Path(folder), Path(staging) / Path(folder).name
    subset = folder.name
    config = read_source_config(folder)
    location, local = source_location(config["source_repo"], sources)
    queries_path, corpus_path = folder / "queries.parquet", folder / "corpus.parquet"
    queries = parquet.read_table(queries_path)
    corpus = parquet.read_table(corpus_path)
    requests = {
        "q": Requests("q", parse_ids(queries.column("question").to_pylist(), "q"), queries_path, "question"),
        "d": Requests("d", parse_ids(corpus.column("id").to_pylist(), "d"), corpus_path, "id"),
    }
    problems = []
    for kind, request in requests.items():
        table = queries if kind == "q" else corpus
        for row in np.flatnonzero(request.rows < 0).tolist():
            problems.append(
                problem(subset, request.file, row, table, f"{request.labels} is not of the form {kind}_<row>")
            )
    digest = hashlib.blake2b(digest_size=16)
    record = {
        "repo": config["source_repo"],
        "loader_config": config["loader_config"],
        "location": location if local else "huggingface-hub",
        "tables": [],
    }
    for name, split, columns in tables_of(config):
        table, revision = open_table(subset, config["source_repo"], location, local, name, split)
        record["revision"] = revision
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DataError(
                f"{subset}: source {config['source_repo']} (config {name or 'default'}, split {split}) lacks "
                f"column(s) {', '.join(missing)} (has {', '.join(table.column_names)})"
            )
        kinds = set(columns.values())
        with tqdm(desc=f"{subset} {name or split}", unit="row", leave=False, delay=10) as progress:
            num_rows = stream_table(table, columns, requests, digest, progress)
        for kind in kinds:
            request, own = requests[kind], queries if kind == "q" else corpus
            outside = np.flatnonzero(request.rows >= num_rows).tolist()
            for row in outside:
                problems.append(
                    problem(
                        subset,
                        request.file,
                        row,
                        own,
                        f"{kind}_{request.rows[row]} is outside the source's {num_rows} rows "
                        f"({config['source_repo']}, config {name or 'default'}, split {split})",
                    )
                )
            for row, text in enumerate(request.texts):
                if 0 <= request.rows[row] < num_rows and (not isinstance(text, str) or not text.strip()):
                    problems.append(
                        problem(
                            subset,
                            request.file,
                            row,
                            own,
                            f"restored text of {kind}_{request.rows[row]} is empty "
                            f"({config['source_repo']}, config {name or 'default'}, split {split})",
                        )
                    )
        record["tables"].append(
            {
                "config": name,
                "split": split,
                "columns": columns,
                "rows": num_rows,
                "used": int(sum(np.count_nonzero(requests[k].rows >= 0) for k in kinds)),
            }
        )
    record["fingerprint"] = digest.hexdigest()
    for previous, where in recorded:
        check_unchanged(subset, record, previous, where)
    bad = {(p["file"], p["row"]) for p in problems}
    write_restored(folder, target, queries, corpus, requests, bad, record)
    return target, problems


def problem(subset, file, row, table, reason):
    key = "question_id" if "question_id" in table.column_names else "id"
    return {"subset": subset, "file": str(file), "row": row, key: table.column(key)[row].as_py(), "reason": reason}


def write_restored(folder, target, queries, corpus, requests, bad, record):
    """The restored subset in the embed-nemotron layout; files are left untouched (same mtimes, so
    prepare skips the subset) when the same source rows were restored before."""
    previous = read_record(target)
    original = source_files(folder)
    if previous and previous["original"] == original and previous["source"]["fingerprint"] == record["fingerprint"]:
        return
    target.mkdir(parents=True, exist_ok=True)
    keep_q = [r for r in range(queries.num_rows) if (str(requests["q"].file), r) not in bad]
    keep_d = [r for r in range(corpus.num_rows) if (str(requests["d"].file), r) not in bad]
    restored_queries = queries.set_column(
        queries.schema.get_field_index("question"), "question", pa.array(requests["q"].texts, pa.string())
    ).take(pa.array(keep_q, pa.int64()))
    restored_corpus = pa.table({"id": corpus.column("id"), "text": pa.array(requests["d"].texts, pa.string())}).take(
        pa.array(keep_d, pa.int64())
    )
    meta = json.loads((folder / "dataset_metadata.json").read_text())
    meta["ids_only"] = False
    for name, content in (("queries.parquet", restored_queries), ("corpus.parquet", restored_corpus)):
        atomic_parquet(target / name, content.schema, [content])
    atomic_json(target / "dataset_metadata.json", meta)
    atomic_json(target / RECORD, {"original": original, "source": record})


def source_files(folder):
    return {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir()) if p.is_file()}


def read_record(target):
    path = Path(target) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def origin(record):
    return record["location"] + (f"@{record['revision']}" if record.get("revision") else "")


def check_unchanged(subset, record, recorded, where):
    if recorded["fingerprint"] != record["fingerprint"]:
        raise DataError(
            f"{subset}: source {record['repo']} changed since {where} was prepared from it (fingerprint of the "
            f"rows used {recorded['fingerprint']} from {origin(recorded)}, now {record['fingerprint']} from "
            f"{origin(record)}): its rows were reordered or edited, so "
            "q_/d_ ids would name other texts. Restore from the recorded revision (a local copy with --sources), "
            "or prepare into a new output folder."
        )


def recorded_sources(subset, staging, prepared):
    """What earlier runs restored this subset from: [(source record, where it is recorded)]."""
    found = []
    staged = read_record(Path(staging) / subset)
    if staged:
        found.append((staged["source"], Path(staging) / subset))
    done = Path(prepared) / subset / "done.json" if prepared else None
    if done is not None and done.is_file():
        entry = json.loads(done.read_text()).get("entry", {})
        if entry.get("restored_from"):
            found.append((entry["restored_from"], Path(prepared)))
    return found


def restore_subsets(folders, metas, staging, sources=None, workers=None, prepared=None):
    """(folders with every ids_only one replaced by its restored copy, problems).

    `prepared`: the output folder: sources are checked against the records of earlier runs there.
    """
    todo = [f for f in folders if metas[f]["ids_only"]]
    if not todo:
        return list(folders), []
    missing = [
        f"{f.name}: ids_only subset without {f / SOURCE_CONFIG}" for f in todo if not (f / SOURCE_CONFIG).is_file()
    ]
    if missing:
        raise DataError("cannot restore:\n  " + "\n  ".join(missing))
    restored, problems = {}, []
    with ProcessPoolExecutor(max_workers=workers or min(len(todo), os.cpu_count() or 1)) as pool:
        futures = {
            pool.submit(restore_subset, f, staging, sources, recorded_sources(f.name, staging, prepared)): f
            for f in todo
        }
        for future in tqdm(futures, desc="restore", unit="subset"):
            target, found = future.result()
            restored[futures[future]] = target
            problems += found
    return [restored.get(f, f) for f in folders], problems
