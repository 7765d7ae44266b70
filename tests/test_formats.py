"""Input formats (embedtrain.data.formats): one small dataset written in every format prepares into the
same examples; bad input fails with the file and line at fault."""

import json
import os
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedtrain.data.formats import CORPUS_FILE_SCHEMA, QUERIES_FILE_SCHEMA, detect_format
from embedtrain.data.nemotron import DataError
from embedtrain.data.prepare import prepare
from embedtrain.data.shards import PreparedDataset

SUBSET = "FEVER"
INSTRUCTION = "Instruct: Given a claim, retrieve documents that support or refute the claim\nQuery:"
FORMATS = ("nemotron", "jsonl", "corpus-json", "beir", "datasets")
DATASET_CARD = """---
configs:
- config_name: FEVER
  data_files:
  - split: train
    path: FEVER/queries-*.parquet
- config_name: FEVER_corpus
  data_files:
  - split: train
    path: FEVER/corpus-*.parquet
---
# A test copy of a dataset in the embed-nemotron layout, read through this card
"""


def make_dataset():
    """30 documents (the first 6 with a BEIR title, the last 6 named by no query) and 12 queries with
    1 or 2 positives and 3 ranked negatives each."""
    rng = random.Random(0)
    titles = [f"Person {j}" if j < 6 else "" for j in range(30)]
    bodies = [f"passage {j} says that entity {j} was born in town {rng.randint(0, 99)}." for j in range(30)]
    texts = [f"{title} {body}" if title else body for title, body in zip(titles, bodies)]
    queries = []
    for i in range(12):
        positives = [i, i + 12] if i % 3 == 0 else [i]
        negatives = rng.sample([j for j in range(24) if j not in positives], 3)
        queries.append({"id": f"q_{i}", "text": f"Claim {i}: entity {i} was born in a town.", "pos": positives})
        queries[-1]["neg"] = negatives
    return {"titles": titles, "bodies": bodies, "texts": texts, "queries": queries}


DATA = make_dataset()


def doc_id(j):
    return f"d_{j}"


def query_rows(pos_ref=lambda j: {"id": doc_id(j)}):
    return [
        {
            "question_id": q["id"],
            "question": q["text"],
            "corpus_id": SUBSET,
            "pos_doc": [pos_ref(j) for j in q["pos"]],
            "neg_doc": [{"id": doc_id(j)} for j in q["neg"]],
        }
        for q in DATA["queries"]
    ]


def corpus_table():
    return pa.table({"id": [doc_id(j) for j in range(30)], "text": DATA["texts"]}, schema=CORPUS_FILE_SCHEMA)


def nemotron_metadata():
    return {
        "corpus_id": SUBSET,
        "class": "TextQADataset",
        "query_instruction": INSTRUCTION,
        "passage_instruction": "",
        "task_type": "Retrieval",
        "ids_only": False,
    }


def write_nemotron(root):
    folder = root / SUBSET
    folder.mkdir(parents=True)
    (folder / "dataset_metadata.json").write_text(json.dumps(nemotron_metadata()))
    pq.write_table(corpus_table(), folder / "corpus.parquet")
    pq.write_table(pa.Table.from_pylist(query_rows(), schema=QUERIES_FILE_SCHEMA), folder / "queries.parquet")
    return root


def jsonl_records():
    """Every accepted way of writing a document, one per query in turn; the last record has no question_id."""
    texts, records = DATA["texts"], []
    for i, q in enumerate(DATA["queries"]):
        pos, neg = [texts[j] for j in q["pos"]], [texts[j] for j in q["neg"]]
        form = i % 4
        record = {"question_id": q["id"], "query" if form != 1 else "question": q["text"], "instruction": INSTRUCTION}
        if form == 0:
            record.update(pos_doc=pos, neg_doc=neg)
        elif form == 1:
            record.update(pos_doc=[{"text": t} for t in pos], neg_doc=[{"text": t} for t in neg])
        elif form == 2:
            record.update(pos_doc=pos[0] if len(pos) == 1 else pos, neg_doc=[neg[0], {"text": neg[1]}, neg[2]])
        else:
            record.update(pos_doc={"text": pos[0]} if len(pos) == 1 else [{"text": t} for t in pos], neg_doc=neg)
        records.append(record)
    del records[-1]["question_id"]
    return records


def write_jsonl(root):
    root.mkdir(parents=True)
    lines = [json.dumps(r) for r in jsonl_records()]
    lines.insert(5, "")  # an empty line is skipped but counted: the last record is on line 13
    (root / f"{SUBSET}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_corpus_json(root):
    corpus = root / "corpus" / SUBSET
    corpus.mkdir(parents=True)
    merlin = {"class": "TextQADataset", "corpus_id": SUBSET, "query_instruction": INSTRUCTION, "task_type": "Retrieval"}
    (corpus / "merlin_metadata.json").write_text(json.dumps(merlin))
    table = corpus_table()
    pq.write_table(table.slice(0, 17), corpus / "part-0.parquet")
    pq.write_table(table.slice(17), corpus / "part-1.parquet")
    rows = query_rows(pos_ref=lambda j: doc_id(j) if j % 2 else {"id": doc_id(j)})  # raw ids and {"id"} mixed
    (root / "train.json").write_text(json.dumps({"corpus": [{"path": f"corpus/{SUBSET}"}], "data": rows}))
    return root


def write_beir(root, qrels_lines=None):
    folder = root / SUBSET
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for j in range(30):
            f.write(json.dumps({"_id": doc_id(j), "title": DATA["titles"][j], "text": DATA["bodies"][j]}) + "\n")
    queries = [{"_id": q["id"], "text": q["text"]} for q in DATA["queries"]]
    queries.insert(4, {"_id": "q_unjudged", "text": "A claim no document is judged relevant to."})
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    if qrels_lines is None:
        qrels_lines = [f"{q['id']}\t{doc_id(j)}\t1" for q in DATA["queries"] for j in q["pos"]]
        qrels_lines.insert(3, f"q_unjudged\t{doc_id(29)}\t0")  # score 0: not a positive
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels_lines) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq_0\td_0\t1\n")  # train.tsv wins
    return folder


def write_datasets(root):
    folder = root / SUBSET
    folder.mkdir(parents=True)
    (root / "README.md").write_text(DATASET_CARD)
    (folder / "dataset_metadata.json").write_text(json.dumps(nemotron_metadata()))
    pq.write_table(corpus_table(), folder / "corpus-00000-of-00001.parquet")
    queries = pa.Table.from_pylist(query_rows(pos_ref=doc_id))  # pos_doc as raw ids: list<string>
    assert queries.schema.field("pos_doc").type == pa.list_(pa.string())
    pq.write_table(queries, folder / "queries-00000-of-00001.parquet")
    return root


WRITERS = {
    "nemotron": write_nemotron,
    "jsonl": write_jsonl,
    "corpus-json": write_corpus_json,
    "beir": write_beir,
    "datasets": write_datasets,
}


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    """`datasets` reads only local files and caches under tmp_path, also when imported before this test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "datasets" in sys.modules:
        config = sys.modules["datasets"].config
        monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
        for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(config, flag):
                monkeypatch.setattr(config, flag, True)
    return tmp_path / "hf"


def shard_positive_texts(prepared, index):
    """Texts of every positive a query shard row lists: the `positives` column where prepare writes one,
    else `pos` (the first positive only)."""
    name, row = prepared.locate(index)
    batch, offset = prepared.queries[name].locate(row)
    corpus = prepared.corpora[batch.column("corpus")[offset].as_py()]
    column = "positives" if "positives" in batch.schema.names else "pos"
    rows = batch.column(column)[offset].as_py()
    return column, [corpus.value(r, "text") for r in (rows if isinstance(rows, list) else [rows])]


@pytest.mark.parametrize("input_format", FORMATS)
def test_every_format_prepares_into_the_same_examples(tmp_path, offline_hf, capsys, input_format):
    src = WRITERS[input_format](tmp_path / "src")
    assert detect_format(src) == input_format
    out = tmp_path / "out"
    manifest = prepare(src, out)

    beir = input_format == "beir"
    assert list(manifest["subsets"]) == [SUBSET]
    assert manifest["subsets"][SUBSET]["query_instruction"] == ("" if beir else INSTRUCTION)
    prepared = PreparedDataset(out)
    texts, queries = DATA["texts"], DATA["queries"]
    assert len(prepared) == len(queries)
    for index, q in enumerate(queries):
        example = prepared.example(index, 0 if beir else 3)
        assert example.query == q["text"]
        # passages: the first positive, then the 3 negatives in their ranked order (none for BEIR)
        assert example.passages == [texts[q["pos"][0]]] + ([] if beir else [texts[j] for j in q["neg"]])
        expected_id = f"{SUBSET}:13" if input_format == "jsonl" and index == 11 else q["id"]
        assert example.question_id == expected_id

    # --- all positives --------------------------------------------------------------------------------
    # Converted sources keep every positive in pos_doc, in order.
    if input_format != "nemotron":
        staged = out / "converted" / SUBSET
        corpus = dict(zip(*pq.read_table(staged / "corpus.parquet").to_pydict().values()))
        rows = pq.read_table(staged / "queries.parquet").to_pylist()
        staged_positives = [[corpus[d["id"]] for d in r["pos_doc"]] for r in rows]
        assert staged_positives == [[texts[j] for j in q["pos"]] for q in queries]
    # The query shards: every positive once prepare writes a `positives` column; until then `pos`, the first.
    for index, q in enumerate(queries):
        column, found = shard_positive_texts(prepared, index)
        assert found == [texts[j] for j in (q["pos"] if column == "positives" else q["pos"][:1])], column

    if beir:
        assert "1 of 13 queries" in capsys.readouterr().out
    if input_format == "datasets":
        assert (offline_hf / "datasets").is_dir()  # datasets' cache went where HF_HOME points


def test_detect_format_of_single_files_and_of_an_unknown_folder(tmp_path):
    assert detect_format(write_jsonl(tmp_path / "j") / f"{SUBSET}.jsonl") == "jsonl"
    assert detect_format(write_corpus_json(tmp_path / "c") / "train.json") == "corpus-json"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="dataset_metadata.json.*corpus.jsonl.*jsonl.*json"):
        detect_format(tmp_path / "other")


def test_rerun_keeps_unchanged_conversions_and_redoes_changed_ones(tmp_path, capsys):
    src, out = write_jsonl(tmp_path / "src"), tmp_path / "out"
    prepare(src, out)
    staged = out / "converted" / SUBSET
    stamps = {p.name: p.stat().st_mtime_ns for p in staged.iterdir()}
    capsys.readouterr()
    prepare(src, out)
    assert {p.name: p.stat().st_mtime_ns for p in staged.iterdir()} == stamps
    assert "already prepared" in capsys.readouterr().out
    extra = {"query": "A new claim.", "pos_doc": "A new passage.", "instruction": INSTRUCTION}
    with open(src / f"{SUBSET}.jsonl", "a") as f:
        f.write(json.dumps(extra) + "\n")
    prepare(src, out)
    assert len(PreparedDataset(out)) == 13
    assert "already prepared" not in capsys.readouterr().out


def test_bad_json_line_names_file_and_line(tmp_path):
    src = write_jsonl(tmp_path / "src")
    path = src / f"{SUBSET}.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-1]  # line 3 loses its closing brace
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path} line 3: not a valid JSON line"):
        prepare(src, tmp_path / "out")


def test_missing_pos_doc_names_file_and_line(tmp_path):
    path = tmp_path / "src.jsonl"
    path.write_text(json.dumps({"query": "q", "pos_doc": "p"}) + "\n" + json.dumps({"query": "q2"}) + "\n")
    with pytest.raises(DataError, match=rf"{path} line 2: no pos_doc"):
        prepare(path, tmp_path / "out")


def test_differing_instructions_ask_to_split_the_file(tmp_path):
    src = write_jsonl(tmp_path / "src")
    path = src / f"{SUBSET}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps({"query": "q", "pos_doc": "p", "instruction": "Instruct: something else\nQuery:"}) + "\n")
    with pytest.raises(DataError, match=rf"(?s){path} line 14: instruction .* line 1.*split the file"):
        prepare(src, tmp_path / "out")


def test_beir_qrels_naming_an_unknown_doc_name_the_tsv_and_line(tmp_path):
    folder = write_beir(tmp_path / "src", qrels_lines=["q_0\td_0\t1", "q_1\td_404\t1"])
    with pytest.raises(DataError, match=rf"{folder / 'qrels' / 'train.tsv'} line 3: corpus-id 'd_404'"):
        prepare(folder, tmp_path / "out")


def test_beir_without_train_split_lists_the_splits(tmp_path):
    folder = write_beir(tmp_path / "src")
    (folder / "qrels" / "train.tsv").rename(folder / "qrels" / "dev.tsv")
    with pytest.raises(DataError, match="found: dev, test"):
        prepare(folder, tmp_path / "out")
    os.remove(folder / "qrels" / "test.tsv")
    prepare(folder, tmp_path / "out")  # the only split is taken
    assert len(PreparedDataset(tmp_path / "out")) == 12


def test_corpus_json_unknown_corpus_id_names_file_and_record(tmp_path):
    src = write_corpus_json(tmp_path / "src")
    document = json.loads((src / "train.json").read_text())
    document["data"][3]["corpus_id"] = "SciFact"
    (src / "train.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match=rf"{src / 'train.json'}: data\[3\]: corpus_id 'SciFact'"):
        prepare(src, tmp_path / "out")
