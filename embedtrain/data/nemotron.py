"""Reader of the nvidia/embed-nemotron-dataset-v1 layout: one folder per subset holding
dataset_metadata.json, queries.parquet and corpus.parquet. Every problem is reported with the
subset, file and row at fault; nothing is dropped silently."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

METADATA_KEYS = ("corpus_id", "query_instruction", "passage_instruction", "ids_only")
QUERY_COLUMNS = ("question_id", "question", "corpus_id", "pos_doc", "neg_doc")
CORPUS_COLUMNS = ("id", "text")


class DataError(ValueError):
    """Bad dataset input; the message names the subset, file, column or row."""


@dataclass
class SubsetInfo:
    name: str
    folder: Path
    corpus_id: str
    query_instruction: str
    passage_instruction: str
    task_type: str


@dataclass
class Example:
    """One training example: a query and its passages (positive first, then k hard negatives)."""

    subset: str
    query: str
    passages: list[str]


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
        raise DataError(f"data.subsets: {', '.join(missing)} not found under {root}; "
                        f"available: {', '.join(p.name for p in found)}")
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


def read_table(path, columns, subset):
    if not path.is_file():
        raise DataError(f"{subset}: missing {path}")
    schema_names = pq.read_schema(path).names
    absent = [c for c in columns if c not in schema_names]
    if absent:
        raise DataError(f"{subset}: {path} lacks column(s) {', '.join(absent)} (has {', '.join(schema_names)})")
    return pq.read_table(path, columns=list(columns)).to_pylist()


def check_text(text, subset, path, row, column):
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{subset}: {path} row {row}: empty {column}")
    return text


def load_subsets(root, names=None):
    """Subset metadata for every selected folder; stops with the list of ids_only subsets, whose
    text is not redistributed and has to be rebuilt from its source first (`embedtrain prepare`)."""
    infos, ids_only = [], []
    for folder in subset_folders(root, names):
        meta = read_metadata(folder)
        if meta["ids_only"]:
            ids_only.append(folder.name)
            continue
        infos.append(SubsetInfo(folder.name, folder, meta["corpus_id"], meta["query_instruction"] or "",
                                meta["passage_instruction"] or "", meta.get("task_type", "")))
    if ids_only:
        raise DataError(f"subsets with ids_only=true need their text rebuilt from the original source first: "
                        f"{', '.join(ids_only)} (exclude them with data.subsets or run `embedtrain prepare`)")
    return infos


def load_examples(root, names=None, hard_negatives=4):
    """Every query of the selected subsets with its texts resolved: positive = pos_doc[0],
    negatives = the first k of neg_doc in stored (ranked) order, cycled when fewer than k."""
    infos = load_subsets(root, names)
    corpora = {}
    for info in infos:
        path = info.folder / "corpus.parquet"
        rows = read_table(path, CORPUS_COLUMNS, info.name)
        corpora[info.corpus_id] = {r["id"]: check_text(r["text"], info.name, path, i, "text")
                                   for i, r in enumerate(rows)}
    examples = []
    for info in infos:
        path = info.folder / "queries.parquet"
        seen = set()
        for row, q in enumerate(read_table(path, QUERY_COLUMNS, info.name)):
            where = f"{info.name}: {path} row {row}"
            if q["question_id"] in seen:
                raise DataError(f"{where}: duplicate question_id {q['question_id']!r}")
            seen.add(q["question_id"])
            corpus = corpora.get(q["corpus_id"])
            if corpus is None:
                raise DataError(f"{where}: corpus_id {q['corpus_id']!r} names no loaded corpus")
            if not q["pos_doc"]:
                raise DataError(f"{where}: empty pos_doc")
            doc_ids = [q["pos_doc"][0]["id"]]
            negatives = [d["id"] for d in q["neg_doc"] or []]
            if hard_negatives:
                if not negatives:
                    raise DataError(f"{where}: empty neg_doc but loss.hard_negatives={hard_negatives}")
                doc_ids += [negatives[i % len(negatives)] for i in range(hard_negatives)]
            dangling = [d for d in doc_ids if d not in corpus]
            if dangling:
                raise DataError(f"{where}: doc id(s) {', '.join(dangling)} not in corpus {q['corpus_id']!r}")
            query = check_text(q["question"], info.name, path, row, "question")
            examples.append(Example(info.name, query, [corpus[d] for d in doc_ids]))
    return examples, {info.name: info for info in infos}
