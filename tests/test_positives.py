"""Several positives per query: prepare keeps them all, data.positive_sampling=cycle alternates them
over epochs (deterministic, resumable from the step alone), and no known positive of a query is
ever its negative, also in a `global` pool across 2 ranks (gradient parity still within 1e-5)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_worker
from embedtrain.config import ConfigError, DataConfig, load_config
from embedtrain.data.collate import Collator
from embedtrain.data.nemotron import DataError, content_hash
from embedtrain.data.prepare import prepare
from embedtrain.data.shards import MANIFEST, QUERY_SCHEMA, PreparedDataset, write_shard
from embedtrain.data.stream import Sampler, StepBatches
from embedtrain.model.encoder import load_tokenizer

SUBSETS = {"Birds": 6, "Rivers": 10}  # queries per subset: epochs of the two subsets differ


def texts_of(subset, i):
    """(question, positive A, positive B, three negatives) of query i of a subset."""
    return (
        f"What is known about {subset.lower()} item {i}?",
        f"{subset} item {i} is the first answer: it was described in the year {1800 + i}.",
        f"A second account of {subset.lower()} item {i} says it was found near town {i}.",
        *[f"{subset} filler passage {i}-{k} about nothing in particular." for k in range(3)],
    )


def write_source(root, second_positive=None):
    """Every query has positives A (d_<i>_a) then B (d_<i>_b); q_0 lists A twice (kept once).
    `second_positive` replaces the B id of Birds q_1 (to make it dangle)."""
    for subset, count in SUBSETS.items():
        folder = root / subset
        folder.mkdir(parents=True)
        corpus, queries = [], []
        for i in range(count):
            question, *docs = texts_of(subset, i)
            ids = [f"d_{i}_a", f"d_{i}_b", *[f"d_{i}_n{k}" for k in range(3)]]
            corpus += [{"id": d, "text": t} for d, t in zip(ids, docs)]
            positives = [ids[0], ids[1]] + ([ids[0]] if i == 0 else [])
            if subset == "Birds" and i == 1 and second_positive:
                positives[1] = second_positive
            queries.append(
                {
                    "question_id": f"q_{i}",
                    "question": question,
                    "corpus_id": subset,
                    "pos_doc": [{"id": d} for d in positives],
                    "neg_doc": [{"id": d} for d in ids[2:]],
                }
            )
        metadata = {"corpus_id": subset, "query_instruction": "Query:", "passage_instruction": "", "ids_only": False}
        (folder / "dataset_metadata.json").write_text(json.dumps(metadata))
        pq.write_table(pa.Table.from_pylist(corpus), folder / "corpus.parquet")
        pq.write_table(pa.Table.from_pylist(queries), folder / "queries.parquet")
    return root


@pytest.fixture(scope="module")
def prepared_folder(tmp_path_factory):
    source = write_source(tmp_path_factory.mktemp("two_positives"))
    out = tmp_path_factory.mktemp("prepared")
    prepare(source, out)
    return out


def known_positives(example):
    """Positive A and B texts of an example's query."""
    return texts_of(example.subset, int(example.question_id[2:]))[1:3]


def test_prepare_keeps_every_positive_with_its_hash(prepared_folder):
    dataset = PreparedDataset(prepared_folder)
    assert dataset.names == list(SUBSETS) and len(dataset) == sum(SUBSETS.values())
    for index in range(len(dataset)):
        first, second = dataset.example(index, 1), dataset.example(index, 1, positive=1)
        a, b = known_positives(first)
        assert (first.passages[0], second.passages[0]) == (a, b)  # q_0's repeated A was kept once
        assert dataset.example(index, 1, positive=2).passages[0] == a  # modulo the number of positives
        assert first.positive_hashes == [content_hash(a), content_hash(b)]
        assert dataset.length(index) == len(first.query) + len(a)


def test_a_dangling_second_positive_is_a_bad_row(tmp_path):
    source = write_source(tmp_path / "src", second_positive="d_missing")
    with pytest.raises(DataError, match="row 1: doc id\\(s\\) d_missing not in corpus 'Birds'"):
        prepare(source, tmp_path / "out")


def draws(dataset, mode, positive_sampling, steps, start=0, world=1):
    """{step: [(question_id, subset, passages), ...]} for the whole global batch (ranks joined)."""
    sampler = Sampler(dataset.subset_sizes(), 4, seed=11, mode=mode)
    ranks = [
        StepBatches(dataset, sampler, None, r, world, 4 // world, 2, start, steps, positive_sampling=positive_sampling)
        for r in range(world)
    ]
    return {
        step: [(e.question_id, e.subset, e.passages) for r in ranks for e in r.examples(step)[0]]
        for step in range(start, steps)
    }


@pytest.mark.parametrize("mode", ["proportional", "temperature", "single_subset"])
def test_cycle_alternates_the_positives_over_epochs_and_first_keeps_the_first(prepared_folder, mode):
    dataset = PreparedDataset(prepared_folder)
    sampler = Sampler(dataset.subset_sizes(), 4, seed=11, mode=mode)
    cycled, first = draws(dataset, mode, "cycle", 24), draws(dataset, mode, "first", 24)
    epochs_seen = {}
    for step in range(24):
        indices, epochs = sampler.global_batch_epochs(step)
        for index, epoch, drawn, drawn_first in zip(indices, epochs, cycled[step], first[step]):
            example = dataset.example(index, 0)
            a, b = known_positives(example)
            assert drawn[:2] == drawn_first[:2] == (example.question_id, example.subset)
            assert drawn[2][0] == (a, b)[epoch % 2]  # positive A in even epochs, B in odd ones
            assert drawn_first[2][0] == a
            epochs_seen.setdefault(index, []).append(epoch)
    # the epoch is the number of earlier draws of that query (the order within one batch aside)
    assert all(sorted(e) == list(range(len(e))) for e in epochs_seen.values())
    assert max(len(e) for e in epochs_seen.values()) >= 3
    if mode == "proportional":  # one pass over all 16 queries every 4 steps: A, B, A, ... for each
        assert all(e == list(range(len(e))) for e in epochs_seen.values())
        assert all(len(e) == 6 for e in epochs_seen.values())


def test_cycle_is_deterministic_and_resumes_from_the_step_alone(prepared_folder):
    uninterrupted = draws(PreparedDataset(prepared_folder), "temperature", "cycle", 30, world=2)
    assert uninterrupted == draws(PreparedDataset(prepared_folder), "temperature", "cycle", 30, world=2)
    for resume_at in (5, 17):  # a fresh process, on one rank instead of two
        resumed = draws(PreparedDataset(prepared_folder), "temperature", "cycle", 30, start=resume_at)
        assert resumed == {step: uninterrupted[step] for step in range(resume_at, 30)}


def test_the_collator_lists_every_known_positive_target_first(prepared_folder, tiny_llama):
    dataset = PreparedDataset(prepared_folder)
    config = load_config("tiny", ["data.positive_sampling=cycle"])
    collator = Collator(load_tokenizer(tiny_llama), config.data, dataset.info)
    sampler = Sampler(dataset.subset_sizes(), 4, seed=11)
    stream = StepBatches(dataset, sampler, collator, 0, 1, 4, 2, 4, 5, positive_sampling="cycle")  # step 4: epoch 1
    (step, (batch,), (examples,)) = next(iter(stream))
    assert step == 4 and batch["positive_hash"].shape == (4, 2)
    for q, example in enumerate(examples):
        a, b = known_positives(example)
        assert batch["positive_hash"][q].tolist() == [content_hash(b), content_hash(a)]
        assert batch["positive_hash"][q, 0] == batch["passage_hash"][q * 3]
    assert StepBatches(dataset, sampler, lambda m: m, 0, 1, 4, 2, 0, 1).positive_sampling == "first"
    with pytest.raises(ValueError, match="data.positive_sampling"):
        StepBatches(dataset, sampler, None, 0, 1, 4, 2, 0, 1, positive_sampling="random")


def test_positive_sampling_is_a_checked_config_key():
    assert DataConfig().positive_sampling == "first"
    with pytest.raises(ConfigError, match="data.positive_sampling: 'random' is not one of first, cycle"):
        load_config("tiny", ["data.positive_sampling=random"])


def test_shards_of_the_previous_format_are_refused(prepared_folder, tmp_path):
    manifest = json.loads((prepared_folder / MANIFEST).read_text())
    old = tmp_path / "v1"
    old.mkdir()
    (old / MANIFEST).write_text(json.dumps({**manifest, "format": "embedtrain-shards-v1"}))
    with pytest.raises(DataError, match="'embedtrain-shards-v1', expected 'embedtrain-shards-v2'.*embedtrain prepare"):
        PreparedDataset(old)
    # v1 query shards under a v2 manifest (a subset that a rerun of prepare did not rebuild)
    mixed = tmp_path / "mixed"
    (mixed / "Birds").mkdir(parents=True)
    v1_schema = pa.schema([f for f in QUERY_SCHEMA if f.name not in ("positives", "positive_hashes")])
    v1_schema = v1_schema.insert(3, pa.field("pos", pa.int64()))
    row = {"question_id": "q_0", "question": "?", "corpus": "Birds", "pos": 0, "negs": [], "length": 1}
    entry = write_shard(mixed / "Birds" / "queries-00000.arrow", pa.Table.from_pylist([row], schema=v1_schema))
    birds = {**manifest["subsets"]["Birds"], "query_shards": [entry], "corpus_shards": []}
    (mixed / MANIFEST).write_text(json.dumps({**manifest, "subsets": {"Birds": birds}}))
    with pytest.raises(DataError, match="queries-00000.arrow: columns .*'pos'.*embedtrain prepare"):
        PreparedDataset(mixed).length(0)


def test_sibling_positives_are_never_negatives_in_a_two_rank_global_pool(tmp_path):
    """Two positives per query, cycled (step 1 is epoch 1: every target is positive B); each query's
    other positive lies in the other queries' groups, on both ranks. The W-rank gradient equals the
    1-rank gradient, no known positive is left as a negative, and the old rule (mask copies of the
    target only) would have left some."""
    result, _ = run_worker(
        "grad_parity.py", tmp_path / "r.json", "--negatives", "global", "--two-positives", "--step", "1", nproc=2
    )
    assert abs(result["ds_loss"] - result["ref_loss"]) <= 1e-5 * abs(result["ref_loss"]), result
    assert result["max_rel_error"] < 1e-5, result
    assert result["second_positive_targets"] == result["queries"] == 4, result
    assert result["unmasked_positives"] == 0 and result["positives_on_other_ranks"] > 0, result
    assert result["unmasked_with_target_hash_only"] > 0, result
