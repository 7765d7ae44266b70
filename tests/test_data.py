"""The dataset reader, collation and the (step, rank) batch order."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedtrain.config import load_config
from embedtrain.data.collate import Collator, load_tokenizer
from embedtrain.data.nemotron import DataError, load_examples
from embedtrain.data.stream import StepStream, global_batch


@pytest.fixture
def data_copy(tmp_path, demo_data):
    shutil.copytree(demo_data, tmp_path / "data")
    return tmp_path / "data"


def rows(path):
    return pq.read_table(path).to_pylist()


def rewrite(path, table_rows, schema=None):
    pq.write_table(pa.Table.from_pylist(table_rows, schema=schema or pq.read_schema(path)), path)


def test_examples_resolve_texts_through_their_own_corpus(demo_data):
    examples, subsets = load_examples(demo_data, hard_negatives=4)
    assert set(subsets) == {"FEVER", "SciFact", "SyntheticClassificationData"}
    corpora = {name: {r["id"]: r["text"] for r in rows(demo_data / name / "corpus.parquet")} for name in subsets}
    assert corpora["FEVER"]["d_17"] != corpora["SciFact"]["d_17"]  # ids repeat across subsets
    by_subset = {}
    for example in examples:
        by_subset.setdefault(example.subset, []).append(example)
    for name in subsets:
        for query, example in zip(rows(demo_data / name / "queries.parquet"), by_subset[name]):
            negatives = [d["id"] for d in query["neg_doc"]]
            expected_ids = [query["pos_doc"][0]["id"]] + [negatives[i % len(negatives)] for i in range(4)]
            assert example.query == query["question"]
            assert example.passages == [corpora[name][i] for i in expected_ids]


def test_selecting_subsets(demo_data):
    examples, subsets = load_examples(demo_data, ["SciFact"], hard_negatives=1)
    assert set(subsets) == {"SciFact"} and {e.subset for e in examples} == {"SciFact"}
    with pytest.raises(DataError, match="data.subsets: MSMARCO not found"):
        load_examples(demo_data, ["MSMARCO"])


def test_missing_file_is_named(data_copy):
    (data_copy / "SciFact" / "corpus.parquet").unlink()
    with pytest.raises(DataError, match="SciFact: missing .*SciFact/corpus.parquet"):
        load_examples(data_copy)


def test_missing_column_is_named(data_copy):
    path = data_copy / "FEVER" / "queries.parquet"
    pq.write_table(pq.read_table(path).drop(["neg_doc"]), path)
    with pytest.raises(DataError, match="FEVER: .*queries.parquet lacks column\\(s\\) neg_doc"):
        load_examples(data_copy)


@pytest.mark.parametrize("corrupt, message", [
    (lambda r: r[3].update(pos_doc=[{"id": "d_99999"}]), "row 3: doc id\\(s\\) d_99999 not in corpus 'FEVER'"),
    (lambda r: r[5].update(pos_doc=[]), "row 5: empty pos_doc"),
    (lambda r: r[7].update(question_id=r[6]["question_id"]), "row 7: duplicate question_id"),
    (lambda r: r[2].update(question="  "), "row 2: empty question"),
])
def test_bad_rows_are_named(data_copy, corrupt, message):
    path = data_copy / "FEVER" / "queries.parquet"
    table_rows = rows(path)
    corrupt(table_rows)
    rewrite(path, table_rows)
    with pytest.raises(DataError, match=message):
        load_examples(data_copy)


def test_ids_only_subsets_are_listed(data_copy):
    path = data_copy / "SciFact" / "dataset_metadata.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "ids_only": True}))
    with pytest.raises(DataError, match="ids_only=true .*: SciFact"):
        load_examples(data_copy)


def test_collate_prompts_and_padding(demo_data, tiny_llama):
    examples, subsets = load_examples(demo_data, ["FEVER"], hard_negatives=2)
    tokenizer = load_tokenizer(tiny_llama)
    assert tokenizer.pad_token == tokenizer.eos_token
    config = load_config("tiny")
    batch = Collator(tokenizer, config.data, subsets)(examples[:3])
    assert batch["query_ids"].shape[0] == 3 and batch["passage_ids"].shape[0] == 9
    assert batch["query_ids"].shape[1] % 8 == 0 and batch["passage_ids"].shape[1] % 8 == 0
    instruction = subsets["FEVER"].query_instruction
    first_query = tokenizer.decode(batch["query_ids"][0], skip_special_tokens=True)
    assert first_query == f"{instruction} {examples[0].query}"
    config.data.query_prefix, config.data.passage_prefix = "query:", "passage:"
    batch = Collator(tokenizer, config.data, subsets)(examples[:1])
    assert tokenizer.decode(batch["query_ids"][0], skip_special_tokens=True) == f"query: {examples[0].query}"
    assert tokenizer.decode(batch["passage_ids"][0], skip_special_tokens=True) == f"passage: {examples[0].passages[0]}"
    assert batch["positive_hash"][0] == batch["passage_hash"][0]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_batch_order_does_not_depend_on_world_size(accumulation):
    examples = list(range(50))
    micro = 3
    for step in range(6):
        one_rank = StepStream(examples, 4 * micro * accumulation, 4 * micro, 7, 0, 1).micro_batches(step)
        for world in (2, 4):
            ranks = [StepStream(examples, 4 * micro * accumulation, 4 * micro // world, 7, r, world).micro_batches(step)
                     for r in range(world)]
            for m, global_micro in enumerate(one_rank):
                assert sum((ranks[r][m] for r in range(world)), []) == global_micro


def test_epochs_cover_every_example_once():
    seen = sum((global_batch(10, 5, 3, step) for step in range(2)), [])
    assert sorted(seen) == list(range(10))
    assert global_batch(10, 5, 3, 2) != global_batch(10, 5, 3, 0)  # a new permutation next epoch
