"""The input formats `embedtrain prepare` reads, each converted into the embed-nemotron folder layout
(embedtrain.data.nemotron) before validation and sharding.

    nemotron     SRC/<Subset>/{dataset_metadata.json, queries.parquet, corpus.parquet}: used as it is.
    jsonl        SRC.jsonl, or SRC/*.jsonl: one subset per file (named by its stem), one record a line:
                 {"query" (or "question"), "pos_doc", "neg_doc" (optional), "instruction" (optional),
                 "question_id" (optional)}; a document is a string or {"text": ...}, and pos_doc /
                 neg_doc hold one document or a list of them.
    corpus-json  NeMo AutoModel's corpus-id JSON: SRC.json or SRC/*.json, each
                 {"corpus": [{"path": ...}], "data": [{"question_id", "question", "corpus_id",
                 "pos_doc", "neg_doc"}]}; a corpus path (relative to the JSON file) holds
                 merlin_metadata.json and parquet files with columns id, text. One subset per corpus.
    beir         SRC/{corpus.jsonl, queries.jsonl, qrels/<split>.tsv}: one subset named by SRC;
                 positives are the qrels rows with score > 0, there are no negatives (`embedtrain mine`).
    datasets     a local copy of a Hugging Face dataset repository in the embed-nemotron layout whose
                 parquet files are read through its dataset card: config <Subset> holds the queries and
                 config <Subset>_corpus the corpus (split train each).

Converted subsets are written to STAGING/<Subset>/ together with converted.json, which records the
size and modification time of every source file a subset was made from; a subset whose sources are
unchanged is not rewritten, so its files keep their modification times and `prepare` skips it.

A bad row of a source (a line that is not JSON, a record without a query or positive, a duplicate id,
a qrels line naming an unknown document, ...) does not stop the conversion: it is left out of the
staged subset and recorded, with file, line (or row, or record) and reason, in STAGING/<Subset>/
bad_rows.json, which `to_layout` returns whether the subset was converted now or before. `prepare`
then treats them as it treats the bad rows it finds itself: it fails listing them, or with
--skip-bad-rows leaves them out and lists each in OUT/skipped_rows.jsonl. Problems that concern a
whole file (not JSON at all, an instruction that differs within a subset, a missing corpus) still
stop the conversion.
"""

import json
import os
import shutil
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from embedtrain.data import parquet
from embedtrain.errors import DataError

FORMATS = ("auto", "nemotron", "jsonl", "corpus-json", "beir", "datasets")
CONVERTED = "converted.json"
BAD_ROWS = "bad_rows.json"
CONVERTER_VERSION = 1  # bump when a conversion changes its output, so staged subsets are rewritten
BATCH_ROWS = 16_384

# The schemas of the embed-nemotron files (as tools/make_demo_data.py writes them).
DOC_REF = pa.struct([("id", pa.string())])
CORPUS_FILE_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
QUERIES_FILE_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("question", pa.string()),
        ("corpus_id", pa.string()),
        ("pos_doc", pa.list_(DOC_REF)),
        ("neg_doc", pa.list_(DOC_REF)),
    ]
)


# --- detection -------------------------------------------------------------------------------------


def metadata_folders(src):
    return sorted(p for p in Path(src).iterdir() if (p / "dataset_metadata.json").is_file())


def detect_format(src):
    """The format of `src` (one of FORMATS other than "auto"), from the files it holds."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if src.is_dir():
        subsets = metadata_folders(src)
        if subsets:
            with_queries = all((p / "queries.parquet").is_file() for p in subsets)
            # without a dataset card a missing queries.parquet is the layout's own error, reported by prepare
            return "nemotron" if with_queries or not (src / "README.md").is_file() else "datasets"
        if (src / "corpus.jsonl").is_file() and (src / "queries.jsonl").is_file():
            return "beir"
        if any(src.glob("*.jsonl")):
            return "jsonl"
        if any(src.glob("*.json")):
            return "corpus-json"
    elif src.suffix == ".jsonl":
        return "jsonl"
    elif src.suffix == ".json":
        return "corpus-json"
    raise DataError(
        f"{src}: cannot tell its input format. Looked for: subset folders holding dataset_metadata.json "
        "(nemotron, or datasets with a README.md dataset card); corpus.jsonl + queries.jsonl + qrels/ (beir); "
        "a .jsonl file or a folder of them (jsonl); a .json file or a folder of them (corpus-json). "
        f"Pass --format, one of {', '.join(FORMATS[1:])}"
    )


def to_layout(src, input_format, staging):
    """(a folder in the embed-nemotron layout holding `src`'s data, the bad rows left out of it);
    `staging` is where conversions go. A bad row is a dict with subset, file, reason and where it is:
    line (1-based, JSON lines and tsv), row (0-based, parquet) or record (index into a JSON list)."""
    src = Path(src)
    if input_format not in FORMATS:
        raise DataError(f"input format {input_format!r} is not one of {', '.join(FORMATS)}")
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    input_format = detect_format(src) if input_format == "auto" else input_format
    if input_format == "nemotron":
        return src, []
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    converters = {
        "jsonl": convert_jsonl,
        "corpus-json": convert_corpus_json,
        "beir": convert_beir,
        "datasets": convert_datasets,
    }
    subsets = converters[input_format](src, staging)
    drop_stale_subsets(staging, subsets)
    return staging, [problem for subset in subsets for problem in json.loads((staging / subset / BAD_ROWS).read_text())]


class BadRow(Exception):
    """One row of a source that cannot be converted; the converter records it and goes on."""


def bad_row(subset, path, reason, **where):
    """A bad row's record: `where` is line=N, row=N or record=N."""
    return {"subset": subset, "file": str(path), **where, "reason": reason}


def location(problem):
    """'FILE line N' (or 'FILE row N', or 'FILE: data[N]' for corpus-json records) of a bad row."""
    for key, form in (("line", " line {}"), ("row", " row {}"), ("record", ": data[{}]")):
        if key in problem:
            return problem["file"] + form.format(problem[key])
    return problem["file"]


# --- staging -----------------------------------------------------------------------------------------


def source_record(input_format, paths, **options):
    """What a staged subset is made from: the format, its options and every source file's size and mtime."""
    files = {}
    for path in sorted({Path(p).resolve() for p in paths}):
        stat = path.stat()
        files[str(path)] = [stat.st_size, stat.st_mtime_ns]
    return {"version": CONVERTER_VERSION, "format": input_format, "options": options, "sources": files}


def is_current(target, record):
    try:
        return json.loads((target / CONVERTED).read_text()) == record
    except (OSError, json.JSONDecodeError):
        return False


def atomic_json(path, value):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def atomic_parquet(path, schema, tables):
    """Write an iterable of tables with `schema` into one parquet file, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for table in tables:
            writer.write_table(table)
    os.replace(tmp, path)


def stage_subset(staging, subset, record, write):
    """STAGING/<subset>, written by `write(target, bad) -> metadata` unless it was staged from the
    same sources; `write` appends the bad rows it left out to the list `bad` (saved in BAD_ROWS)."""
    if not subset or "/" in subset or subset.startswith("."):
        raise DataError(f"{subset!r} (from {', '.join(record['sources'])}) cannot name a subset folder")
    target = Path(staging) / subset
    if is_current(target, record):
        return subset
    target.mkdir(parents=True, exist_ok=True)
    (target / CONVERTED).unlink(missing_ok=True)  # a run that stops half-way leaves no valid record
    bad = []
    meta = write(target, bad)
    atomic_json(target / BAD_ROWS, bad)
    atomic_json(target / "dataset_metadata.json", meta)
    atomic_json(target / CONVERTED, record)
    return subset


def drop_stale_subsets(staging, subsets):
    """Converted subsets whose source is gone would otherwise be prepared again."""
    for folder in Path(staging).iterdir():
        if folder.name not in subsets and (folder / CONVERTED).is_file():
            shutil.rmtree(folder)


def write_queries(target, rows):
    """queries.parquet from row dicts (a missing neg_doc is an empty list)."""
    table = pa.Table.from_pylist([{"neg_doc": [], **row} for row in rows], schema=QUERIES_FILE_SCHEMA)
    atomic_parquet(target / "queries.parquet", QUERIES_FILE_SCHEMA, [table])


def metadata(corpus_id, query_instruction="", passage_instruction="", task_type=""):
    return {
        "corpus_id": corpus_id,
        "class": "TextQADataset",
        "query_instruction": query_instruction or "",
        "passage_instruction": passage_instruction or "",
        "task_type": task_type or "",
        "ids_only": False,
    }


def doc_refs(ids):
    return [{"id": doc_id} for doc_id in ids]


def id_of(value):
    """A document reference: {"id": ...} or the raw id."""
    value = value.get("id") if isinstance(value, dict) else value
    return None if value is None else str(value)


def id_list(values):
    values = [] if values is None else values
    values = [values] if isinstance(values, (str, int, dict)) else values
    return [id_of(v) for v in values]


def jsonl_lines(path, subset, bad):
    """(line number, parsed record) for every non-empty line; a line of bad UTF-8 or JSON is added
    to the list `bad` and left out."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
                if line:
                    yield number, json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                bad.append(bad_row(subset, path, f"not a valid JSON line: {err}", line=number))


def input_files(src, suffix):
    src = Path(src)
    files = [src] if src.is_file() else sorted(src.glob("*" + suffix))
    if not files:
        raise DataError(f"{src}: no {suffix} file(s) in it")
    return files


def no_rows_error(path, bad):
    """A source with no good row: not a subset, whatever --skip-bad-rows says."""
    if not bad:
        return DataError(f"{path}: no records")
    first = "; ".join(f"{location(p)}: {p['reason']}" for p in bad[:3])
    return DataError(f"{path}: no valid records, all {len(bad)} are bad (first: {first}); fix the file")


# --- jsonl -------------------------------------------------------------------------------------------


def convert_jsonl(src, staging):
    subsets = []
    for path in input_files(src, ".jsonl"):
        record = source_record("jsonl", [path])
        subsets.append(stage_subset(staging, path.stem, record, partial(write_jsonl, path)))
    return subsets


def documents_of(value, key):
    """The texts of pos_doc / neg_doc: a string, {"text": ...}, or a list of those."""
    values = value if isinstance(value, list) else [value]
    texts = []
    for item in values:
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            raise BadRow(
                f"{key} must hold non-empty documents: a string, a list of strings or objects with a text, got {item!r}"
            )
        texts.append(text)
    return texts


def jsonl_query(record, path, number, question_ids):
    """(question_id, query, instruction, {pos_doc: texts, neg_doc: texts}) of one JSONL record."""
    if not isinstance(record, dict):
        raise BadRow(f"expected a JSON object, got {type(record).__name__}")
    query = record.get("query", record.get("question"))
    if not isinstance(query, str) or not query.strip():
        raise BadRow("no query (a non-empty string under 'query' or 'question')")
    if record.get("pos_doc") in (None, [], ""):
        raise BadRow("no pos_doc")
    question_id = str(record.get("question_id", f"{path.stem}:{number}"))
    if question_id in question_ids:
        raise BadRow(f"duplicate question_id {question_id!r}")
    texts = {key: documents_of(record[key], key) if record.get(key) not in (None, []) else [] for key in DOC_KEYS}
    return question_id, query, record.get("instruction") or "", texts


DOC_KEYS = ("pos_doc", "neg_doc")


def write_jsonl(path, target, bad):
    doc_ids, queries, question_ids = {}, [], set()
    instruction = first_line = None
    for number, record in jsonl_lines(path, path.stem, bad):
        try:
            question_id, query, this_instruction, texts = jsonl_query(record, path, number, question_ids)
        except BadRow as err:
            bad.append(bad_row(path.stem, path, str(err), line=number))
            continue
        if first_line is None:
            instruction, first_line = this_instruction, number
        elif this_instruction != instruction:
            raise DataError(
                f"{path} line {number}: instruction {this_instruction!r} differs from {instruction!r} of line "
                f"{first_line}; an instruction applies to a whole subset, so split the file into one file per "
                "instruction"
            )
        question_ids.add(question_id)
        refs = {key: doc_refs(doc_ids.setdefault(text, f"d_{len(doc_ids)}") for text in texts[key]) for key in DOC_KEYS}
        queries.append({"question_id": question_id, "question": query, "corpus_id": path.stem, **refs})
    if first_line is None:
        raise no_rows_error(path, bad)
    corpus = {"id": list(doc_ids.values()), "text": list(doc_ids)}
    atomic_parquet(target / "corpus.parquet", CORPUS_FILE_SCHEMA, [pa.table(corpus, schema=CORPUS_FILE_SCHEMA)])
    write_queries(target, queries)
    return metadata(path.stem, instruction)


# --- corpus-json (NeMo AutoModel) --------------------------------------------------------------------


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from err


def read_corpus_folder(folder, named_in):
    """merlin_metadata.json of a corpus folder, checked."""
    path = folder / "merlin_metadata.json"
    if not path.is_file():
        raise DataError(f"{named_in}: corpus path {folder} has no merlin_metadata.json")
    meta = read_json(path)
    if not isinstance(meta, dict) or not meta.get("corpus_id"):
        raise DataError(f"{path}: no corpus_id")
    if meta.get("class", "TextQADataset") != "TextQADataset":
        raise DataError(f"{path}: class {meta['class']!r} is not supported (only TextQADataset)")
    return meta


def convert_corpus_json(src, staging):
    files = input_files(src, ".json")
    corpora, queries, bad = {}, {}, {}  # corpus_id -> (folder, metadata) / [query rows] / [bad rows]
    for path in files:
        document = read_json(path)
        if not isinstance(document, dict) or "corpus" not in document or "data" not in document:
            raise DataError(f"{path}: expected an object with 'corpus' and 'data'")
        entries = document["corpus"] if isinstance(document["corpus"], list) else [document["corpus"]]
        known = []  # this file's corpus_ids, in order
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not entry.get("path"):
                raise DataError(f"{path}: corpus[{index}] has no path")
            folder = (path.parent / entry["path"]).resolve()
            meta = read_corpus_folder(folder, f"{path}: corpus[{index}]")
            corpus_id = str(meta["corpus_id"])
            if corpus_id in corpora and corpora[corpus_id][0] != folder:
                raise DataError(f"{path}: corpus[{index}]: corpus_id {corpus_id!r} is also {corpora[corpus_id][0]}")
            corpora[corpus_id] = (folder, meta)
            known.append(corpus_id)
        if not known:
            raise DataError(f"{path}: 'corpus' lists no corpus")
        for index, record in enumerate(document["data"]):
            try:
                row = corpus_json_query(record, known, f"{path.stem}:{index}")
            except BadRow as err:  # kept with its record's corpus, else with the file's first corpus
                owner = str(record.get("corpus_id")) if isinstance(record, dict) else None
                owner = owner if owner in known else known[0]
                bad.setdefault(owner, []).append(bad_row(owner, path, str(err), record=index))
                continue
            queries.setdefault(row["corpus_id"], []).append(row)
    subsets = []
    for corpus_id, (folder, meta) in corpora.items():
        parquet_files = sorted(folder.glob("*.parquet"))
        if not parquet_files:
            raise DataError(f"{folder}: corpus {corpus_id!r} has no parquet file")
        record = source_record("corpus-json", [*files, folder / "merlin_metadata.json", *parquet_files])
        write = partial(write_corpus_json, meta, parquet_files, queries.get(corpus_id, []), bad.get(corpus_id, []))
        subsets.append(stage_subset(staging, corpus_id, record, write))
    return subsets


def write_corpus_json(meta, parquet_files, rows, bad_rows, target, bad):
    bad.extend(bad_rows)
    atomic_parquet(target / "corpus.parquet", CORPUS_FILE_SCHEMA, corpus_batches(parquet_files))
    write_queries(target, rows)
    keys = ("query_instruction", "passage_instruction", "task_type")
    return metadata(str(meta["corpus_id"]), *(meta.get(k) for k in keys))


def corpus_json_query(record, known, default_id):
    """The query row of one record of a corpus-json file's data (BadRow if it is not one)."""
    if not isinstance(record, dict):
        raise BadRow(f"expected an object, got {type(record).__name__}")
    if str(record.get("corpus_id")) not in known:
        raise BadRow(f"corpus_id {record.get('corpus_id')!r} is not one of this file's corpora")
    if not isinstance(record.get("question"), str):
        raise BadRow("no question")
    positives = id_list(record.get("pos_doc"))
    negatives = id_list(record.get("neg_doc"))
    if not positives or None in positives + negatives:
        raise BadRow("pos_doc / neg_doc must be lists of ids or of {'id': ...}, pos_doc non-empty")
    return {
        "question_id": str(record.get("question_id", default_id)),
        "question": record["question"],
        "corpus_id": str(record["corpus_id"]),
        "pos_doc": doc_refs(positives),
        "neg_doc": doc_refs(negatives),
    }


def corpus_batches(parquet_files):
    """The id and text columns of every file, batch by batch, as strings."""
    for path in parquet_files:
        reader = parquet.open_file(path)
        absent = [c for c in ("id", "text") if c not in reader.schema_arrow.names]
        if absent:
            raise DataError(f"{path} lacks column(s) {', '.join(absent)} (has {', '.join(reader.schema_arrow.names)})")
        for batch in parquet.iter_batches(reader, path, batch_size=BATCH_ROWS, columns=["id", "text"]):
            yield pa.Table.from_batches([batch]).cast(CORPUS_FILE_SCHEMA)


# --- BEIR --------------------------------------------------------------------------------------------


def beir_split(src):
    """qrels/train.tsv if there is one, else the only tsv there."""
    splits = sorted(p.stem for p in (src / "qrels").glob("*.tsv"))
    if "train" in splits:
        return src / "qrels" / "train.tsv"
    if len(splits) != 1:
        found = ", ".join(splits) if splits else "none"
        raise DataError(
            f"{src / 'qrels'}: expected train.tsv or exactly one split, found: {found}; "
            "leave only the split to train on there"
        )
    return src / "qrels" / f"{splits[0]}.tsv"


def convert_beir(src, staging):
    """One subset named by the folder. A document's text is title + " " + text when the title is not
    empty (the BEIR convention for dense retrievers), else its text. Positives are the qrels rows with
    score > 0; there are no negatives (mine them with `embedtrain mine`)."""
    src = Path(src).resolve()
    missing = [name for name in ("corpus.jsonl", "queries.jsonl") if not (src / name).is_file()]
    if missing:
        raise DataError(f"{src}: not a BEIR folder, missing {', '.join(missing)}")
    qrels = beir_split(src)
    record = source_record("beir", [src / "corpus.jsonl", src / "queries.jsonl", qrels], split=qrels.stem)
    return [stage_subset(staging, src.name, record, partial(write_beir, src, qrels))]


def beir_records(path, fields, subset, bad, seen):
    """(line number, record) of the good lines of a BEIR jsonl file: objects with `fields` whose
    _id is not in the set `seen` (it collects them); the other lines go to the list `bad`."""
    for number, record in jsonl_lines(path, subset, bad):
        if not isinstance(record, dict) or any(record.get(key) is None for key in fields):
            bad.append(bad_row(subset, path, f"expected an object with {', '.join(fields)}", line=number))
        elif str(record["_id"]) in seen:
            bad.append(bad_row(subset, path, f"duplicate _id {record['_id']!r}", line=number))
        else:
            seen.add(str(record["_id"]))
            yield number, record


def beir_corpus_batches(path, doc_ids, subset, bad):
    """Corpus rows, streamed in batches; `doc_ids` collects every id."""
    ids, texts = [], []
    for _, record in beir_records(path, ("_id", "text"), subset, bad, doc_ids):
        doc_id, title = str(record["_id"]), record.get("title") or ""
        ids.append(doc_id)
        texts.append(f"{title} {record['text']}" if title.strip() else record["text"])
        if len(ids) == BATCH_ROWS:
            yield pa.table({"id": ids, "text": texts}, schema=CORPUS_FILE_SCHEMA)
            ids, texts = [], []
    yield pa.table({"id": ids, "text": texts}, schema=CORPUS_FILE_SCHEMA)


def read_qrels(path, query_ids, doc_ids, subset, bad):
    """query id -> positive doc ids in qrels order (score > 0); bad lines go to the list `bad`."""
    positives = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n\r").split("\t")
            if not line.strip() or (number == 1 and fields[0] == "query-id"):
                continue
            try:
                query_id, doc_id, score = fields[0], fields[1], float(fields[2])
            except (IndexError, ValueError):
                bad.append(bad_row(subset, path, "expected query-id<TAB>corpus-id<TAB>score", line=number))
                continue
            if query_id not in query_ids:
                bad.append(bad_row(subset, path, f"query-id {query_id!r} is not in queries.jsonl", line=number))
            elif doc_id not in doc_ids:
                bad.append(bad_row(subset, path, f"corpus-id {doc_id!r} is not in corpus.jsonl", line=number))
            elif score > 0 and doc_id not in positives.setdefault(query_id, []):
                positives[query_id].append(doc_id)
    return positives


def write_beir(src, qrels, target, bad):
    doc_ids, name = set(), src.name
    batches = beir_corpus_batches(src / "corpus.jsonl", doc_ids, name, bad)
    atomic_parquet(target / "corpus.parquet", CORPUS_FILE_SCHEMA, batches)
    queries = {}
    for _, record in beir_records(src / "queries.jsonl", ("_id", "text"), name, bad, set()):
        queries[str(record["_id"])] = record["text"]
    positives = read_qrels(qrels, queries, doc_ids, name, bad)
    rows = [
        {"question_id": qid, "question": text, "corpus_id": src.name, "pos_doc": doc_refs(positives[qid])}
        for qid, text in queries.items()
        if positives.get(qid)
    ]
    if not rows and bad:
        raise no_rows_error(src, bad)
    if len(rows) < len(queries):
        print(
            f"[embedtrain] {src.name}: {len(queries) - len(rows)} of {len(queries)} queries in "
            f"{src / 'queries.jsonl'} have no positive in {qrels} and are left out"
        )
    write_queries(target, rows)
    return metadata(src.name, task_type="Retrieval")


# --- Hugging Face datasets repository -----------------------------------------------------------------


def convert_datasets(src, staging):
    """Subsets whose queries.parquet is present are copied; the others are read through the dataset card:
    config <Subset> (queries) and <Subset>_corpus (corpus), split train. The subset's own metadata is
    kept (an ids_only subset stays ids_only, with its source_config.json, for restoration)."""
    src = Path(src).resolve()
    folders = metadata_folders(src)
    if not folders:
        raise DataError(f"{src}: no subset folders (none holds dataset_metadata.json)")
    subsets = []
    for folder in folders:
        extras = [folder / name for name in ("dataset_metadata.json", "source_config.json")]
        extras = [p for p in extras if p.is_file()]
        if (folder / "queries.parquet").is_file():
            files = [p for p in (folder / "queries.parquet", folder / "corpus.parquet") if p.is_file()]
            record = source_record("datasets", files + extras)
            write = partial(copy_subset, folder, extras, files)
        else:
            data_files = [p for name in (folder.name, folder.name + "_corpus") for p in config_files(src, name)]
            record = source_record("datasets", [src / "README.md", *data_files, *extras])
            write = partial(load_subset, src, folder, extras)
        subsets.append(stage_subset(staging, folder.name, record, write))
    return subsets


def subset_metadata(folder, extras, target):
    """The subset's own dataset_metadata.json (defaults filled in); other metadata files are copied."""
    for path in extras:
        if path.name != "dataset_metadata.json":
            shutil.copy2(path, target / path.name)
    meta = read_json(folder / "dataset_metadata.json")
    return {**metadata(folder.name), **meta}


def copy_subset(folder, extras, files, target, bad):
    """A subset already in the layout (a missing corpus.parquet, and its bad rows, are reported by prepare)."""
    for path in files:
        tmp = target / (path.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target / path.name)
    return subset_metadata(folder, extras, target)


def load_config(src, name):
    """Config `name`, split train, of the dataset repository `src`, streamed from its files (datasets'
    cache of a local folder is keyed by config name, not by the files' contents, so a non-streamed
    load could serve rows of an older copy)."""
    import datasets

    try:
        return datasets.load_dataset(str(src), name, split="train", streaming=True)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "not readable as declared"
        raise DataError(
            f"{src}: config {name!r} (split train) could not be loaded: {type(err).__name__}: {err}; "
            f"its dataset card {src / 'README.md'} must declare configs <Subset> and <Subset>_corpus"
        ) from err


def config_files(src, name):
    """The local data files of config `name` (for the staging record)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(src), name)
    except Exception as err:  # noqa: BLE001 - as in load_config
        raise DataError(
            f"{src}: config {name!r} is not declared by {src / 'README.md'}: {type(err).__name__}: {err}"
        ) from err
    return [Path(p) for files in (builder.config.data_files or {}).values() for p in files if Path(p).is_file()]


def arrow_batches(dataset, columns, where):
    absent = [c for c in columns if c not in dataset.column_names]
    if absent:
        raise DataError(f"{where} lacks column(s) {', '.join(absent)} (has {', '.join(dataset.column_names)})")
    yield from dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=BATCH_ROWS)


def load_subset(src, folder, extras, target, bad):
    meta = subset_metadata(folder, extras, target)
    name = folder.name
    corpus = load_config(src, name + "_corpus")
    batches = arrow_batches(corpus, ("id", "text"), f"{src}: config {name}_corpus")
    atomic_parquet(target / "corpus.parquet", CORPUS_FILE_SCHEMA, (b.cast(CORPUS_FILE_SCHEMA) for b in batches))
    queries = load_config(src, name)
    columns = ("question_id", "question", "corpus_id", "pos_doc", "neg_doc")

    def rows():
        start = 0
        for batch in arrow_batches(queries, columns, f"{src}: config {name}"):
            records, good = batch.to_pylist(), []
            for offset, record in enumerate(records):
                refs = [id_list(record[key]) for key in ("pos_doc", "neg_doc")]
                if None in refs[0] + refs[1]:
                    reason = "pos_doc / neg_doc must hold ids or {'id': ...}"
                    bad.append(bad_row(name, f"{src}: config {name}", reason, row=start + offset))
                    continue
                record.update(pos_doc=doc_refs(refs[0]), neg_doc=doc_refs(refs[1]))
                good.append(record)
            start += len(records)
            yield pa.Table.from_pylist(good, schema=QUERIES_FILE_SCHEMA)

    atomic_parquet(target / "queries.parquet", QUERIES_FILE_SCHEMA, rows())
    return meta
