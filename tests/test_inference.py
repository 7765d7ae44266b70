"""Inference: the Python API equals `embedtrain encode` and sentence-transformers, honours device
and dtype; retrieval's building blocks stream and shard correctly; mine and eval on 2 ranks give
exactly what 1 rank gives, and the memory-mapped eval equals exact in-memory search."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_cli import embedtrain
from test_eval import make_demo_data
from test_export import cosines, encode_cli

from conftest import REPO, run_ranks, worker_env
from embedtrain.data.nemotron import DataError

QUERIES = ["Shilin Linlofo is a chemist.", "Which material did Dorbra Ostmorven use?", "river copper north"]
DOCUMENTS = [
    "Dorbra Ostmorven (born 1948 in Bergen) is an architect best known for works made of copper.",
    "A short one.",
]


@pytest.fixture(scope="module")
def exported(tiny_export, tmp_path_factory):
    """A briefly trained tiny model (its export carries instruction prompts) and a held-out set."""
    root = tmp_path_factory.mktemp("inference")
    (root / "model").symlink_to(tiny_export)
    make_demo_data(root / "heldout", seed=1, queries=60)
    return root


def test_from_pretrained_encode_equals_cli_and_sentence_transformers(exported, tmp_path):
    from sentence_transformers import SentenceTransformer

    import embedtrain

    model = embedtrain.BiEncoder.from_pretrained(exported / "model")
    assert isinstance(model, embedtrain.inference.BiEncoder) and not model.module.training
    queries = model.encode(QUERIES, prompt="query")
    documents = model.encode(DOCUMENTS, prompt="document", batch_size=1)
    assert queries.dtype == np.float32 and queries.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    cli = encode_cli(exported / "model", QUERIES, tmp_path, "q", "--prompt", "query")
    assert cosines(queries, cli).min() >= 0.99999
    st = SentenceTransformer(str(exported / "model"), trust_remote_code=True, device="cpu")
    assert cosines(queries, st.encode_query(QUERIES)).min() >= 0.99999
    assert cosines(documents, st.encode_document(DOCUMENTS)).min() >= 0.99999
    # a literal prompt is put in front as it is; no prompt is no prompt; one string gives one vector
    literal = model.encode(QUERIES, prompt="query: ")
    np.testing.assert_allclose(literal, model.encode(["query: " + q for q in QUERIES]), atol=1e-6)
    assert np.abs(literal - queries).max() > 1e-3
    np.testing.assert_allclose(model.encode(QUERIES[0], prompt="query"), queries[0], atol=1e-6)
    raw = model.encode(QUERIES, prompt="query", normalize=False, dim=16)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 1e-3
    np.testing.assert_allclose(
        raw / np.linalg.norm(raw, axis=1, keepdims=True), model.encode(QUERIES, prompt="query", dim=16), atol=1e-5
    )


def test_device_and_dtype_are_honoured(exported, tmp_path):
    from embedtrain import BiEncoder
    from embedtrain.errors import EncodeError

    full = BiEncoder.from_pretrained(exported / "model", device="cpu", dtype="float32")
    half = BiEncoder.from_pretrained(exported / "model", device="cpu", dtype="bfloat16")
    auto = BiEncoder.from_pretrained(exported / "model")
    assert next(half.module.parameters()).dtype == torch.bfloat16 and half.device.type == "cpu"
    expected_auto = (torch.bfloat16, "cuda") if torch.cuda.is_available() else (torch.float32, "cpu")
    assert (next(auto.module.parameters()).dtype, auto.device.type) == expected_auto
    reference = full.encode(DOCUMENTS + QUERIES, prompt="query")
    low = half.encode(DOCUMENTS + QUERIES, prompt="query")
    assert low.dtype == np.float32 and cosines(low, reference).min() >= 0.99
    cli = encode_cli(
        exported / "model", QUERIES, tmp_path, "bf16", "--prompt", "query", "--dtype", "bfloat16", "--device", "cpu"
    )
    np.testing.assert_allclose(cli, half.encode(QUERIES, prompt="query"), atol=1e-6)
    if torch.cuda.is_available():
        gpu = BiEncoder.from_pretrained(exported / "model", device="cuda", dtype="float32")
        assert cosines(gpu.encode(DOCUMENTS + QUERIES, prompt="query"), reference).min() >= 0.99999
    else:
        with pytest.raises(EncodeError, match="--device cuda: CUDA is not available"):
            BiEncoder.from_pretrained(exported / "model", device="cuda")
    with pytest.raises(EncodeError, match="--dtype int8"):
        BiEncoder.from_pretrained(exported / "model", dtype="int8")
    refused = embedtrain(
        "encode",
        exported / "model",
        "--input",
        tmp_path / "bf16.txt",
        "--output",
        tmp_path / "x.npy",
        "--device",
        "gpu",
    )
    assert refused.returncode == 2 and "--device" in refused.stderr


def test_import_embedtrain_stays_cheap():
    code = "import sys, embedtrain; print('torch' in sys.modules, 'transformers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=worker_env(), capture_output=True, text=True)
    assert run.stdout.split() == ["False", "False"], run.stderr


def test_parquet_texts_stream_across_row_groups_from_any_offset(tmp_path):
    from embedtrain.retrieval import ParquetTexts, block_rows, rank_range

    texts = [f"text {i}" for i in range(53)]
    pq.write_table(
        pa.table({"id": [str(i) for i in range(53)], "text": texts}), tmp_path / "c.parquet", row_group_size=7
    )
    source = ParquetTexts(tmp_path / "c.parquet", "text", prompt="p: ")
    assert len(source) == 53
    for start, stop, size in [(0, 53, 10), (14, 40, 5), (20, 21, 8), (49, 53, 100)]:
        blocks = list(source.blocks(start, stop, size))
        assert [len(b) for b in blocks] == [min(size, stop - b0) for b0 in range(start, stop, size)]
        assert sum(blocks, []) == ["p: " + t for t in texts[start:stop]]
    # rank shares: contiguous, whole blocks, covering every row once, for any number of ranks
    for n, world in [(53, 2), (53, 5), (3, 4), (0, 2), (100_000, 8)]:
        size = block_rows(n, 8)
        shares = [rank_range(n, size, r, world) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        assert all(start % size == 0 for start, _ in shares)
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet row 1: text is null"):
        list(ParquetTexts(tmp_path / "bad.parquet", "text").blocks(0, 3, 2))


def test_matrix_file_and_positive_lookup(tmp_path):
    from embedtrain.retrieval import MatrixFile, doc_lists

    matrix = MatrixFile.create(tmp_path / "m", (10, 4))
    values = np.arange(40, dtype=np.float32).reshape(10, 4) / 7
    matrix.write(6, values[6:])
    matrix.write(0, values[:6])
    again = MatrixFile.open(tmp_path / "m")
    assert again.shape == (10, 4) and again.dtype == np.float16
    np.testing.assert_array_equal(again.read(2, 9), values[2:9].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(again.take([7, 1, 7]), values[[7, 1, 7]].astype(np.float16).astype(np.float32))
    assert (tmp_path / "m").stat().st_size == 10 * 4 * 2
    doc_ids = pa.array(["d0", "d1", "d2", "d3"])
    pos = pa.array([[{"id": "d2"}], [], None, [{"id": "d0"}, {"id": "d3"}]], pa.list_(pa.struct([("id", pa.string())])))
    offsets, rows = doc_lists(pos, doc_ids, lambda q: f"row {q}")
    assert offsets.tolist() == [0, 1, 1, 1, 3] and rows.tolist() == [2, 0, 3]
    with pytest.raises(DataError, match=r"row 1: id 'd9' is not in the corpus"):
        doc_lists(pa.array([[{"id": "d1"}], [{"id": "d0"}, {"id": "d9"}]], pos.type), doc_ids, lambda q: f"row {q}")


def brute_force_rankings(query_vectors, doc_vectors, doc_ids, k=100):
    scores = query_vectors @ doc_vectors.T
    return [[doc_ids[i] for i in np.argsort(-row, kind="stable")[:k]] for row in scores]


def test_memory_mapped_eval_equals_exact_in_memory_metrics(exported):
    from embedtrain.data.nemotron import read_metadata, subset_folders
    from embedtrain.eval import evaluate
    from embedtrain.inference import BiEncoder
    from embedtrain.inference.batching import encode_texts
    from embedtrain.retrieval import metrics, read_subset

    model = BiEncoder.from_pretrained(exported / "model")
    encoder, tokenizer, policy, max_length = model.module, model.tokenizer, model.prompt_policy, model.max_seq_length
    result = evaluate(exported / "model", exported / "heldout", corpus_chunk=16, query_chunk=8)
    for folder in subset_folders(exported / "heldout"):
        queries, corpus, qrels, meta = read_subset(folder)
        query_prompt, document_prompt = policy.for_subset(read_metadata(folder))
        doc_ids, query_ids = list(corpus), list(queries)
        docs = encode_texts(encoder, tokenizer, [document_prompt + corpus[d] for d in doc_ids], 64, max_length)
        query_vectors = encode_texts(encoder, tokenizer, [query_prompt + queries[q] for q in query_ids], 64, max_length)
        exact = metrics(dict(zip(query_ids, brute_force_rankings(query_vectors, docs, doc_ids))), qrels)
        for key, value in exact.items():
            assert result["subsets"][folder.name][key] == pytest.approx(value, abs=1e-6), (folder.name, key)


def cli_ranks(nproc, *args, timeout=300):
    return run_ranks(["-m", "embedtrain.cli", *args], nproc=nproc, timeout=timeout)


def test_mine_and_eval_on_two_ranks_equal_one_rank(exported, tmp_path):
    """Small blocks and chunks so that both ranks encode and score a share of every subset."""
    model, data = exported / "model", exported / "heldout"
    options = ["--top-k", "5", "--batch-size", "4", "--query-chunk", "8", "--corpus-chunk", "16"]
    cli_ranks(1, "mine", model, data, tmp_path / "one", *options)
    two = cli_ranks(2, "mine", model, data, tmp_path / "two", *options)
    assert "mined 150 queries in 3 subset(s)" in two.stdout
    for subset in ("FEVER", "SciFact", "SyntheticClassificationData"):
        one_table = pq.read_table(tmp_path / "one" / subset / "queries.parquet")
        two_table = pq.read_table(tmp_path / "two" / subset / "queries.parquet")
        assert two_table.equals(one_table), subset
        assert any(len(negatives) for negatives in two_table.column("neg_doc").to_pylist())
        for name in ("mining.json", "corpus.parquet", "dataset_metadata.json"):
            assert (tmp_path / "two" / subset / name).read_bytes() == (tmp_path / "one" / subset / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["FEVER", "SciFact", "SyntheticClassificationData"]

    cli_ranks(1, "eval", model, data, "--output", tmp_path / "one.json", "--batch-size", "4", "--query-chunk", "8")
    cli_ranks(
        2,
        "eval",
        model,
        data,
        "--output",
        tmp_path / "two.json",
        "--batch-size",
        "4",
        "--query-chunk",
        "8",
        "--work-dir",
        tmp_path / "work",
    )
    assert json.loads((tmp_path / "two.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
