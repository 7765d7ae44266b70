"""`embedtrain eval` and `embedtrain mine` of a multi-vector (ColBERT) model (the session's
tiny_colbert export), eval of a sparse (SPLADE) model, and reranking a first stage: exact MaxSim
eval in blocks and exact sparse eval against brute-force rankings, a first stage that hands over
every document against the full eval, BM25 against a hand computation, and mining against brute
force."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_eval import make_demo_data

from conftest import ASSETS, WORKERS, shared_scenarios
from embedtrain.bm25 import bm25_scores, bm25_search
from embedtrain.eval import candidate_scorer, distinct_spans, evaluate, subset_sources
from embedtrain.export_sparse import export_sparse
from embedtrain.inference import MultiVectorEncoder
from embedtrain.inference.multi_vector import maxsim_matrix
from embedtrain.inference.sparse import SparseEncoder
from embedtrain.mine import mine
from embedtrain.model.encoder import load_backbone
from embedtrain.model.sparse import SparseModel, load_lm_head
from embedtrain.prompts import model_policy
from embedtrain.retrieval import ListTexts, metrics
from embedtrain.token_retrieval import ListBlocks, TokenBlocks, maxsim_search

SUBSETS = ("FEVER", "SciFact", "SyntheticClassificationData")
# eval (multi-vector, sparse, over BM25) and mine on 2 ranks, in the session's shared 2-rank launch
shared_scenarios(__name__, 2, "kind_eval_ranks.py", {"kinds": []})


@pytest.fixture(scope="module")
def colbert(tmp_path_factory, tiny_colbert_export):
    """The session's tiny_colbert export (4 steps, query expansion) and a small held-out set (12, 12
    and 6 documents)."""
    root = tmp_path_factory.mktemp("colbert")
    make_demo_data(root / "heldout", seed=1, queries=20)
    return tiny_colbert_export, root / "heldout"


def brute_force_metrics(model_dir, heldout):
    """{subset: metrics} of a MaxSim ranking of every document, from in-memory token embeddings."""
    model = MultiVectorEncoder.from_pretrained(model_dir, device="cpu")
    found = {}
    for subset in SUBSETS:
        query_ids, query_texts, corpus, doc_ids, qrels, prompt = subset_sources(heldout / subset, model.prompt_policy)
        documents = next(corpus.blocks(0, len(corpus), len(corpus)))
        scores = maxsim_matrix(
            model.encode([prompt + q for q in query_texts], is_query=True),
            model.encode(documents, is_query=False),
        )
        ids = doc_ids.to_pylist()
        rankings = {q: [ids[i] for i in np.argsort(-row, kind="stable")] for q, row in zip(query_ids, scores)}
        found[subset] = metrics(rankings, qrels)
    return found


@pytest.fixture(scope="module")
def full_eval(colbert):
    """The multi-vector export's exact eval; batch 4: corpus blocks of 4 documents, 7 queries per
    chunk: query chunks across block boundaries."""
    model_dir, heldout = colbert
    return evaluate(model_dir, heldout, batch_size=4, query_chunk=7, device="cpu")


def test_multi_vector_eval_in_blocks_equals_a_brute_force_maxsim_ranking(colbert, full_eval):
    model_dir, heldout = colbert
    result = full_eval
    expected = brute_force_metrics(model_dir, heldout)
    for subset in SUBSETS:
        for key, value in expected[subset].items():
            assert result["subsets"][subset][key] == pytest.approx(value, abs=1e-9), (subset, key)
    assert 0 < result["mean"]["ndcg@10"] < 1


def test_reranking_a_first_stage_that_returns_every_document_equals_the_full_eval(colbert, full_eval):
    model_dir, heldout = colbert
    full = full_eval
    for first_stage in ("bm25", ASSETS / "tiny-llama"):  # BM25, and a dense export
        reranked = evaluate(model_dir, heldout, device="cpu", first_stage=first_stage, first_stage_k=10**6)
        for subset in SUBSETS:
            assert reranked["subsets"][subset] == pytest.approx(full["subsets"][subset]), (first_stage, subset)
        assert reranked["first_stage"]["model"] == str(first_stage)
    # the BM25 stage's own metrics are those of an in-memory BM25 ranking
    query_ids, query_texts, corpus, doc_ids, qrels, _ = subset_sources(heldout / "FEVER", model_policy(model_dir))
    documents = [text for block in corpus.blocks(0, len(corpus), 64) for text in block]
    scores, ids = bm25_scores(query_texts, documents), doc_ids.to_pylist()
    rankings = {q: [ids[i] for i in np.argsort(-row, kind="stable")] for q, row in zip(query_ids, scores)}
    bm25 = evaluate(model_dir, heldout / "FEVER", device="cpu", first_stage="bm25", first_stage_k=5)
    assert bm25["first_stage"]["subsets"]["FEVER"] == pytest.approx(metrics(rankings, qrels))
    assert bm25["subsets"]["FEVER"]["recall@100"] <= bm25["first_stage"]["subsets"]["FEVER"]["recall@100"]


def test_bm25_equals_a_hand_computation_on_three_documents():
    documents = ["The cat sat.", "cat, CAT and dog", "bird"]  # 3, 4 and 1 words: avgdl 8 / 3
    avgdl, k1, b = 8 / 3, 1.2, 0.75

    def weight(tf, length, df):
        idf = math.log(1 + (3 - df + 0.5) / (df + 0.5))
        return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avgdl))

    expected = np.array(
        [
            [weight(1, 3, 2), weight(2, 4, 2), 0.0],  # "cat": in documents 0 (once) and 1 (twice)
            [0.0, weight(1, 4, 1), weight(1, 1, 1)],  # "dog bird"
            [2 * weight(1, 3, 2) + weight(1, 3, 1), 2 * weight(2, 4, 2), 0.0],  # "cat cat the": repeats count
            [0.0, 0.0, 0.0],  # no shared word
        ]
    )
    queries = ["cat", "Dog bird", "cat cat the", "zebra"]
    np.testing.assert_allclose(bm25_scores(queries, documents), expected, rtol=1e-12)
    scores, rows = bm25_search(queries, ListTexts(documents), k=5, query_chunk=3, block=2)
    assert rows.shape == (4, 3)  # k cut to the corpus; every document is a candidate
    np.testing.assert_allclose(scores, np.take_along_axis(expected, rows, 1), rtol=1e-6)
    assert rows[:3, 0].tolist() == [1, 2, 0]


def test_mine_with_a_multi_vector_model_equals_brute_force_maxsim(colbert, tmp_path):
    model_dir, heldout = colbert
    counts = mine(model_dir, heldout, tmp_path / "mined", top_k=3, margin=0.95, storage="float32", device="cpu")
    assert counts == {"FEVER": 20, "SciFact": 20, "SyntheticClassificationData": 10}
    model = MultiVectorEncoder.from_pretrained(model_dir, device="cpu")
    for subset in SUBSETS:
        query_ids, query_texts, corpus, doc_ids, qrels, prompt = subset_sources(heldout / subset, model.prompt_policy)
        documents = next(corpus.blocks(0, len(corpus), len(corpus)))
        scores = maxsim_matrix(
            model.encode([prompt + q for q in query_texts], is_query=True), model.encode(documents, is_query=False)
        )
        ids = doc_ids.to_pylist()
        mined = pq.read_table(tmp_path / "mined" / subset / "queries.parquet").to_pylist()
        for row, question_id, score in zip(mined, query_ids, scores):
            positives = {ids.index(d) for d in qrels[question_id]}
            ceiling = 0.95 * min(score[p] for p in positives)
            order = [i for i in np.argsort(-score, kind="stable") if i not in positives and score[i] <= ceiling]
            assert [d["id"] for d in row["neg_doc"]] == [ids[i] for i in order[:3]], (subset, question_id)


def test_sparse_eval_equals_a_brute_force_dot_product_ranking_and_reports_non_zeros(colbert, tmp_path):
    _, heldout = colbert
    backbone = load_backbone(ASSETS / "tiny-llama")
    module = SparseModel(backbone, load_lm_head(ASSETS / "tiny-llama", backbone)).eval()
    export_sparse(module, ASSETS / "tiny-llama", tmp_path / "sparse")
    result = evaluate(tmp_path / "sparse", heldout, batch_size=4, device="cpu")
    model = SparseEncoder.from_pretrained(tmp_path / "sparse", device="cpu")
    nonzeros = {}
    for subset in SUBSETS:
        query_ids, query_texts, corpus, doc_ids, qrels, prompt = subset_sources(heldout / subset, model.prompt_policy)
        queries = model.encode([prompt + q for q in query_texts], is_query=True)
        docs = model.encode(next(corpus.blocks(0, len(corpus), len(corpus))))
        scores = queries.dense(model.width) @ docs.dense(model.width).T
        ids = doc_ids.to_pylist()
        rankings = {q: [ids[i] for i in np.argsort(-row, kind="stable")] for q, row in zip(query_ids, scores)}
        found = result["subsets"][subset]
        assert {k: found[k] for k in metrics(rankings, qrels)} == pytest.approx(metrics(rankings, qrels))
        assert found["query_nonzeros"] == pytest.approx(np.diff(queries.offsets).mean())
        assert found["document_nonzeros"] == pytest.approx(np.diff(docs.offsets).mean())
        nonzeros[subset] = found["document_nonzeros"]
    assert result["mean"]["document_nonzeros"] == pytest.approx(np.mean(list(nonzeros.values())))
    reranked = evaluate(tmp_path / "sparse", heldout / "FEVER", device="cpu", first_stage="bm25", first_stage_k=10**6)
    full = {k: v for k, v in result["subsets"]["FEVER"].items() if "nonzeros" not in k}
    assert reranked["subsets"]["FEVER"] == pytest.approx(full)


def test_maxsim_search_in_blocks_with_exclusions_and_ceilings_equals_brute_force(tmp_path):
    generator = np.random.default_rng(0)
    documents = [generator.standard_normal((n, 8)).astype(np.float32) for n in (3, 1, 7, 2, 5, 4, 6, 2, 3)]
    queries = [generator.standard_normal((n, 8)).astype(np.float32) for n in (2, 4, 3, 1, 2)]
    brute = maxsim_matrix(queries, documents)
    excluded = [[0, 4], [], [8], [1, 2, 3], [5]]
    offsets = np.cumsum([0] + [len(e) for e in excluded])
    exclude = (offsets, np.array([d for e in excluded for d in e], np.int64))
    ordered = np.sort(brute, axis=1)
    ceilings = ((ordered[:, 4] + ordered[:, 5]) / 2).astype(np.float32)  # between two scores, not on one
    stored = encode_stub(tmp_path / "docs", documents, block=4)
    for docs in (ListBlocks(documents, block=2), stored):
        for max_elements in (1, 30, 2**26):  # one document per block ... all at once
            scores, rows = maxsim_search(
                ListBlocks(queries, block=3), docs, 4, exclude, ceilings, query_chunk=2, max_elements=max_elements
            )
            for q, (row, found) in enumerate(zip(rows, scores)):
                allowed = [d for d in np.argsort(-brute[q], kind="stable") if d not in excluded[q]]
                allowed = [d for d in allowed if brute[q, d] <= ceilings[q]][:4]
                assert row[row >= 0].tolist() == allowed and (row[len(allowed) :] == -1).all()
                np.testing.assert_allclose(found[: len(allowed)], brute[q, allowed], rtol=1e-6)
    assert [a.tolist() for a in stored.take([8, 0, 4])] == [documents[i].tolist() for i in (8, 0, 4)]
    assert [a.tolist() for a in stored.texts(3, 6)] == [documents[i].tolist() for i in (3, 4, 5)]


def encode_stub(path, arrays, block):
    """TokenBlocks written as encode_to_blocks writes them, from given arrays."""
    blocks = TokenBlocks.create(path, len(arrays), arrays[0].shape[1], block)
    for start in range(0, len(arrays), block):
        blocks.write(start, arrays[start : start + block])
    return TokenBlocks.open(path)


def test_candidate_runs_bounded_by_distinct_passages_score_as_one_run():
    """eval.candidate_scorer: runs of queries cut at `max_candidates` distinct passages (each passage
    encoded once per run) give the scores of one run over everything, NaN where a row is -1."""
    rng = np.random.default_rng(0)
    vectors = {f"q{i}": rng.normal(size=4) for i in range(9)} | {f"p{j}": rng.normal(size=4) for j in range(12)}
    rows = rng.integers(-1, 12, size=(9, 5))
    texts = {j: f"p{j}" for j in range(12)}
    encoded = []

    def pair_scores(queries, passages, index):
        encoded.append(len(passages))
        table = np.array([[vectors[q] @ vectors[p] for p in passages] for q in queries], np.float32)
        out = np.take_along_axis(table, np.maximum(index, 0), axis=1)
        return np.where(index >= 0, out, np.nan)

    queries = np.array([f"q{i}" for i in range(9)])
    whole = candidate_scorer(pair_scores, max_candidates=100)(queries, rows, texts)
    assert encoded == [len(np.unique(rows[rows >= 0]))]
    expected = np.array(
        [[vectors[q] @ vectors[f"p{r}"] if r >= 0 else np.nan for r in row] for q, row in zip(queries, rows)]
    )
    np.testing.assert_allclose(whole, expected, rtol=1e-6)
    for limit in (1, 4, 7):
        encoded.clear()
        spans = distinct_spans(rows, limit)
        assert [start for start, _ in spans] == [0, *[stop for _, stop in spans[:-1]]] and spans[-1][1] == len(rows)
        for start, stop in spans:  # within the bound, unless one query alone has more
            part = rows[start:stop]
            assert len(np.unique(part[part >= 0])) <= limit or stop - start == 1
        np.testing.assert_array_equal(candidate_scorer(pair_scores, limit)(queries, rows, texts), whole)
        assert len(encoded) == len(spans)


def test_eval_and_mine_of_multi_vector_and_sparse_models_on_two_ranks_equal_one_process(scenario_launch, tmp_path):
    """tests/workers/kind_eval_ranks.py on 2 ranks (each encoding and scoring a share of every subset)
    against the same calls in this process, on the same models and data: equal metrics, non-zero
    counts, first-stage metrics, mined counts and mined negatives."""
    two = scenario_launch(__name__, 2)["kinds"]
    assert two["world"] == 2
    spec = importlib.util.spec_from_file_location("kind_eval_ranks", WORKERS / "kind_eval_ranks.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    one = json.loads(json.dumps(worker.evaluations(Path(two["root"]), tmp_path)))
    assert one.keys() == {"multi_vector", "sparse", "first_stage", "mined", "negatives"}
    for key, value in one.items():
        assert two[key] == value, key
    assert any(negatives for rows in one["negatives"].values() for negatives in rows)
