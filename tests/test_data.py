"""prepare -> shards -> stream -> collate on data in the real layout."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embedtrain.config import load_config
from embedtrain.data.collate import Collator
from embedtrain.data.nemotron import DataError
from embedtrain.data.prepare import prepare
from embedtrain.data.shards import PreparedDataset
from embedtrain.data.stream import Sampler, StepBatches, rank_micro_batches
from embedtrain.model.encoder import load_tokenizer
from embedtrain.model.packing import pack_rows


@pytest.fixture
def data_copy(tmp_path, demo_data):
    shutil.copytree(demo_data, tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo_data):
    out = tmp_path_factory.mktemp("prepared")
    prepare(demo_data, out)
    return PreparedDataset(out)


def rows(path):
    return pq.read_table(path).to_pylist()


def rewrite(path, table_rows):
    pq.write_table(pa.Table.from_pylist(table_rows, schema=pq.read_schema(path)), path)


def test_round_trip_texts_equal_the_source(prepared, demo_data):
    assert len(prepared) == 1000
    corpora = {n: {r["id"]: r["text"] for r in rows(demo_data / n / "corpus.parquet")} for n in prepared.names}
    assert corpora["FEVER"]["d_17"] != corpora["SciFact"]["d_17"]  # ids repeat across subsets
    index = 0
    for name in prepared.names:
        for query in rows(demo_data / name / "queries.parquet"):
            example = prepared.example(index, hard_negatives=6)
            negatives = [d["id"] for d in query["neg_doc"]]
            expected = [query["pos_doc"][0]["id"]] + [negatives[i % len(negatives)] for i in range(6)]
            assert (example.subset, example.question_id, example.query) == (
                name,
                query["question_id"],
                query["question"],
            )
            assert example.passages == [corpora[name][i] for i in expected]
            index += 1


def test_an_epoch_with_two_ranks_and_two_workers_covers_every_query_once(prepared):
    global_batch, micro, steps = 40, 10, 25  # 25 x 40 = 1000 queries = one epoch
    sampler = Sampler(prepared.subset_sizes(), global_batch, seed=3)
    seen = []
    for rank in range(2):
        batches = StepBatches(
            prepared, sampler, lambda micro_examples: len(micro_examples), rank, 2, micro, 1, 0, steps
        )
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2)
        steps_seen = []
        for step, sizes, examples in loader:
            steps_seen.append(step)
            assert sizes == [micro, micro]
            seen += [(e.subset, e.question_id) for micro_examples in examples for e in micro_examples]
        assert steps_seen == list(range(steps))
    assert len(seen) == len(set(seen)) == 1000


def batches_from(prepared, sampler, rank, world, micro, start, stop):
    stream = StepBatches(prepared, sampler, lambda m: None, rank, world, micro, 0, start, stop)
    return {step: [[e.question_id + e.subset for e in m] for m in examples] for step, _, examples in stream}


@pytest.mark.parametrize("mode", ["proportional", "temperature", "single_subset"])
def test_resume_at_any_step_gives_the_same_stream_also_from_two_ranks_to_one(prepared, mode):
    def sampler():
        return Sampler(prepared.subset_sizes(), 16, seed=5, mode=mode, temperature=2.0)

    uninterrupted = [batches_from(prepared, sampler(), r, 2, 8, 0, 40) for r in range(2)]
    for resume_at in (7, 33):
        resumed_one_rank = batches_from(prepared, sampler(), 0, 1, 16, resume_at, 40)  # a fresh process
        for step in range(resume_at, 40):
            assert resumed_one_rank[step][0] == uninterrupted[0][step][0] + uninterrupted[1][step][0]


def test_weighted_mixing_follows_the_weights(prepared):
    sampler = Sampler(prepared.subset_sizes(), 100, seed=0, mode="temperature", weights=[1.0, 0.0, 1.0])
    subsets = [prepared.locate(i)[0] for step in range(20) for i in sampler.global_batch(step)]
    assert "SciFact" not in subsets
    assert 0.4 < subsets.count("FEVER") / len(subsets) < 0.6
    single = Sampler(prepared.subset_sizes(), 16, seed=0, mode="single_subset")
    for step in range(10):
        assert len({prepared.locate(i)[0] for i in single.global_batch(step)}) == 1


def test_length_bucketing_keeps_the_batch_and_cuts_padding(prepared, tiny_llama):
    config = load_config("tiny", ["data.packing=false"])  # bucketing is for padded batches
    collator = Collator(load_tokenizer(tiny_llama), config.data, prepared.info)
    sampler = Sampler(prepared.subset_sizes(), 64, seed=1)

    def padding_and_ids(bucketing):
        stream = StepBatches(prepared, sampler, collator, 0, 1, 8, 1, 0, 3, length_bucketing=bucketing)
        padded = real = 0
        ids = []
        for _, micro_batches, examples in stream:
            ids.append(sorted(e.question_id + e.subset for m in examples for e in m))
            for batch in micro_batches:
                padded += batch["inputs"].input_ids.numel()
                real += int(batch["inputs"].attention_mask.sum())
        return real / padded, ids

    plain_efficiency, plain_ids = padding_and_ids(False)
    bucketed_efficiency, bucketed_ids = padding_and_ids(True)
    assert bucketed_ids == plain_ids and bucketed_efficiency > plain_efficiency


def test_rerun_skips_finished_subsets(tmp_path, demo_data, capsys):
    prepare(demo_data, tmp_path / "out")
    before = (tmp_path / "out" / "FEVER" / "queries-00000.arrow").stat().st_mtime_ns
    prepare(demo_data, tmp_path / "out")
    assert "FEVER: already prepared from the same files, skipped" in capsys.readouterr().out
    assert (tmp_path / "out" / "FEVER" / "queries-00000.arrow").stat().st_mtime_ns == before


def test_missing_file_and_column_are_named(data_copy, tmp_path):
    (data_copy / "SciFact" / "corpus.parquet").unlink()
    path = data_copy / "FEVER" / "queries.parquet"
    pq.write_table(pq.read_table(path).drop(["neg_doc"]), path)
    with pytest.raises(DataError) as err:
        prepare(data_copy, tmp_path / "out")
    assert "SciFact: missing" in str(err.value) and "SciFact/corpus.parquet" in str(err.value)
    assert "FEVER: " in str(err.value) and "queries.parquet lacks column(s) neg_doc" in str(err.value)


def corrupt_everything(data):
    """One of each kind of bad row, in FEVER."""
    queries = data / "FEVER" / "queries.parquet"
    table_rows = rows(queries)
    table_rows[3]["pos_doc"] = [{"id": "d_99999"}]
    table_rows[5]["pos_doc"] = []
    table_rows[7]["question_id"] = table_rows[6]["question_id"]
    table_rows[2]["question"] = "  "
    rewrite(queries, table_rows)
    corpus = data / "FEVER" / "corpus.parquet"
    table = pq.read_table(corpus)
    texts = [t.encode() for t in table.column("text").to_pylist()]
    texts[10], texts[11] = b"", b"caf\xe9 in latin-1"
    pq.write_table(pa.table({"id": table.column("id"), "text": pa.array(texts, pa.binary())}), corpus)
    return table.column("id")[10].as_py(), table.column("id")[11].as_py()


def test_bad_rows_fail_with_subset_file_and_row(data_copy, tmp_path):
    corrupt_everything(data_copy)
    with pytest.raises(DataError) as err:
        prepare(data_copy, tmp_path / "out")
    message = str(err.value)
    for expected in [
        "queries.parquet row 3: doc id(s) d_99999 not in corpus 'FEVER'",
        "row 5: empty pos_doc",
        "row 7: duplicate question_id",
        "row 2: empty question",
        "corpus.parquet row 10: empty text",
        "corpus.parquet row 11: text is not valid UTF-8",
        "--skip-bad-rows",
    ]:
        assert expected in message, expected
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_skip_bad_rows_reports_every_skipped_row(data_copy, tmp_path):
    empty_id, latin_id = corrupt_everything(data_copy)
    referencing = {
        q["question_id"]
        for q in rows(data_copy / "FEVER" / "queries.parquet")
        if {d["id"] for d in q["pos_doc"] + q["neg_doc"]} & {empty_id, latin_id}
    }
    manifest = prepare(data_copy, tmp_path / "out", skip_bad_rows=True)
    report = [json.loads(line) for line in (tmp_path / "out" / "skipped_rows.jsonl").read_text().splitlines()]
    assert {(r["file"].split("/")[-1], r["row"]) for r in report} >= {
        ("queries.parquet", 2),
        ("queries.parquet", 3),
        ("queries.parquet", 5),
        ("queries.parquet", 7),
        ("corpus.parquet", 10),
        ("corpus.parquet", 11),
    }
    skipped_queries = {r["question_id"] for r in report if "question_id" in r}
    assert referencing <= skipped_queries  # queries whose docs were dropped are reported, not lost
    assert manifest["subsets"]["FEVER"]["num_queries"] == 400 - len(skipped_queries)
    assert manifest["subsets"]["FEVER"]["skipped_rows"] == len(report)


def test_an_ids_only_subset_without_source_config_is_named(data_copy, tmp_path):
    path = data_copy / "SciFact" / "dataset_metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "ids_only": True}))
    with pytest.raises(DataError, match="SciFact: ids_only subset without .*source_config.json"):
        prepare(data_copy, tmp_path / "out")


def test_collate_prompts_and_padding(prepared, tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    assert tokenizer.pad_token == tokenizer.eos_token
    config = load_config("tiny", ["data.packing=false"])
    examples = [prepared.example(i, 2) for i in range(3)]
    batch = Collator(tokenizer, config.data, prepared.info)(examples)
    # one encoder batch: 3 queries, then each query's 3 passages, padded to a multiple of 8
    ids, mask = batch["inputs"].input_ids, batch["inputs"].attention_mask
    assert ids.shape[0] == 3 + 9 and ids.shape[1] % 8 == 0 and not batch["inputs"].packed
    assert batch["num_queries"] == 3
    assert batch["real_tokens"] == int(mask.sum()) and batch["tokens"] == ids.numel()
    instruction = prepared.info["FEVER"]["query_instruction"]
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == f"{instruction} {examples[0].query}"
    config.data.query_prefix, config.data.passage_prefix = "query:", "passage:"
    batch = Collator(tokenizer, config.data, prepared.info)(examples[:1])
    ids = batch["inputs"].input_ids
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == f"query: {examples[0].query}"
    assert tokenizer.decode(ids[1], skip_special_tokens=True) == f"passage: {examples[0].passages[0]}"
    assert batch["positive_hash"].shape == (1, 1) and batch["positive_hash"][0, 0] == batch["passage_hash"][0]


def test_packed_batches_hold_the_same_sequences_with_little_padding(prepared, tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    examples = [prepared.example(i, 3) for i in range(8)]
    padded = Collator(tokenizer, load_config("tiny", ["data.packing=false"]).data, prepared.info)(examples)
    packed = Collator(tokenizer, load_config("tiny").data, prepared.info)(examples)
    flat = packed["inputs"].input_ids.flatten()
    starts, lengths = packed["inputs"].sequence_starts, packed["inputs"].sequence_lengths
    for s in range(padded["inputs"].input_ids.shape[0]):  # sequence s, found by its start, is the padded row s
        real = padded["inputs"].input_ids[s][padded["inputs"].attention_mask[s].bool()]
        assert flat[starts[s] : starts[s] + lengths[s]].tolist() == real.tolist()
        assert (packed["inputs"].token_sequence[starts[s] : starts[s] + lengths[s]] == s).all()
    assert packed["real_tokens"] == padded["real_tokens"]
    # rows of at most 64 tokens; the demo data's narrow lengths (~50 tokens) leave a quarter empty
    assert packed["inputs"].input_ids.shape[1] <= 64 and packed["real_tokens"] / packed["tokens"] > 0.7
    assert packed["real_tokens"] / packed["tokens"] >= padded["real_tokens"] / padded["tokens"]


def test_pack_length_default_follows_the_kernel(prepared, tiny_llama):
    """data.pack_length 0: rows of the max length where a block mask runs (the CPU, eager), one row
    per encoder call where a variable-length kernel runs (CUDA): the same sequences, less padding;
    an explicit pack_length wins over both."""
    from embedtrain.model.attention import packs_in_one_row

    assert packs_in_one_row("sdpa", cuda=True) and packs_in_one_row("flash_attention_2", cuda=True)
    assert not packs_in_one_row("eager", cuda=True) and not packs_in_one_row("sdpa", cuda=False)
    tokenizer = load_tokenizer(tiny_llama)
    examples = [prepared.example(i, 3) for i in range(8)]
    rows = Collator(tokenizer, load_config("tiny").data, prepared.info)(examples)
    one = Collator(tokenizer, load_config("tiny").data, prepared.info, one_row=True)(examples)
    fixed = Collator(tokenizer, load_config("tiny", ["data.pack_length=128"]).data, prepared.info, one_row=True)(
        examples
    )
    assert rows["inputs"].input_ids.shape[0] > 1 and one["inputs"].input_ids.shape[0] == 1
    assert fixed["inputs"].input_ids.shape[1] <= 128 < one["inputs"].input_ids.shape[1]
    assert one["real_tokens"] == rows["real_tokens"] and one["tokens"] < rows["tokens"]
    assert one["tokens"] - one["real_tokens"] < 8  # pad_to_multiple_of 8: at most 7 padding tokens
    flat_one, flat_rows = one["inputs"].input_ids.flatten(), rows["inputs"].input_ids.flatten()
    for s in range(len(examples) * 5):  # every sequence is the same tokens in both layouts
        a, n = one["inputs"].sequence_starts[s], one["inputs"].sequence_lengths[s]
        b = rows["inputs"].sequence_starts[s]
        assert flat_one[a : a + n].tolist() == flat_rows[b : b + n].tolist()


def test_pack_rows_on_long_tailed_lengths():
    """Realistic retrieval lengths (short queries, long-tailed passages, cut at 512) pack into rows
    of 512 (the default: the max length) with under 5 % padding, where padding to the longest
    wastes most of the batch."""
    torch.manual_seed(0)
    queries = torch.randint(15, 45, (16,)).tolist()
    passages = torch.distributions.LogNormal(5.05, 0.65).sample((80,)).clamp(8, 512).int().tolist()
    lengths = queries + passages
    packed = pack_rows([[1] * n for n in lengths], capacity=512, pad_to_multiple_of=8)
    assert packed.attention_mask.gt(0).sum() == sum(lengths)
    assert sum(lengths) / packed.input_ids.numel() > 0.95
    assert sum(lengths) / (len(lengths) * max(lengths)) < 0.5


def test_grad_cache_chunks_are_encoder_batches_of_their_queries(prepared, tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    examples = [prepared.example(i, 3) for i in range(8)]
    batch = Collator(tokenizer, load_config("tiny").data, prepared.info, chunk_size=2)(examples)
    assert [chunk["num_queries"] for chunk in batch["chunks"]] == [2, 2, 2, 2]
    assert [chunk["inputs"].num_sequences for chunk in batch["chunks"]] == [2 + 8] * 4
    assert batch["passage_hash"].shape[0] == 32 and "inputs" not in batch


@pytest.mark.parametrize("accumulation", [1, 2])
def test_global_micro_batches_do_not_depend_on_world_size(accumulation):
    indices = list(range(4 * 3 * accumulation))
    one_rank = rank_micro_batches(indices, 0, 1, 12)
    for world in (2, 4):
        ranks = [rank_micro_batches(indices, r, world, 12 // world) for r in range(world)]
        for m, global_micro in enumerate(one_rank):
            assert sum((ranks[r][m] for r in range(world)), []) == global_micro
