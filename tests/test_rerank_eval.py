"""Rerankers in evaluation and mining: `eval --rerank` (two stages side by side), `mine --rerank`
(false negatives dropped), the refusal of a model of the wrong kind, and the in-training evaluation
of a model.kind=reranker run. Checked against direct computations with the exported models."""

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_eval import make_demo_data

from conftest import REPO, embedtrain_cli, run_ranks
from embedtrain.data.nemotron import read_metadata
from embedtrain.errors import EncodeError
from embedtrain.eval import rerank_ranking, rerank_rankings
from embedtrain.inference import BiEncoder, Reranker
from embedtrain.inference.batching import encode_texts
from embedtrain.mine import drop_false_negatives, mine, negatives_column, padded_rows
from embedtrain.retrieval import metrics, search
from embedtrain.train.evaluation import candidate_list

SUBSETS = ("FEVER", "SciFact", "SyntheticClassificationData")
EVAL_QUERIES = 10  # eval.max_queries of the reranker's training run


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_trained):
    """A bi-encoder (the tiny recipe as shipped, the shared fixture) and a reranker (tiny_reranker, 2
    ranks, in-training evaluation at its last step, trained 4 steps) exported, with held-out data in
    the dataset's layout."""
    root = tmp_path_factory.mktemp("rerank_models")
    make_demo_data(root / "heldout", seed=1, queries=30)
    steps = ("--set", "train.max_steps=4", "--set", "logging.every=2")
    reranker_run = run_ranks(
        [REPO / "launch" / "train.py", "--config", "tiny_reranker", "--output-dir", root / "reranker_run", *steps]
        + ["--set", f"eval.path={root / 'heldout'}", "--set", f"eval.max_queries={EVAL_QUERIES}"],
        nproc=2,
        timeout=400,
    )
    export = embedtrain_cli("export", root / "reranker_run", root / "reranker")
    assert export.returncode == 0, export.stderr[-3000:]
    return {
        "bi": tiny_trained / "model",
        "reranker": root / "reranker",
        "heldout": root / "heldout",
        "log": reranker_run.stdout,
    }


def read_subset_texts(folder):
    queries = pq.read_table(folder / "queries.parquet").to_pylist()
    corpus = pq.read_table(folder / "corpus.parquet").to_pydict()
    return queries, dict(zip(corpus["id"], corpus["text"]))


# ---------------------------------------------------------------- pure functions


def test_reranking_by_the_first_stage_scores_gives_the_first_stage():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((50, 8)).astype(np.float32)
    queries = rng.standard_normal((12, 8)).astype(np.float32)
    scores, rows, _ = search(queries, docs, 20)
    ids = [f"d{i}" for i in range(50)]
    rankings = {f"q{q}": [ids[i] for i in row] for q, row in enumerate(rows)}
    qrels = {f"q{q}": {f"d{i}": 1 for i in rng.choice(50, 2, replace=False)} for q in range(12)}
    same = rerank_rankings(rankings, scores[:, :7])  # a fake reranker returning the first-stage score
    assert same == rankings and metrics(same, qrels) == metrics(rankings, qrels)
    flipped = rerank_rankings(rankings, -scores[:, :7])
    for q, ranking in rankings.items():
        assert flipped[q] == ranking[:7][::-1] + ranking[7:]  # the tail keeps its first-stage order
    assert rerank_ranking(["a", "b", "c", "d"], [0.1, 0.9, 0.5]) == ["b", "c", "a", "d"]
    assert rerank_ranking(["a", "b", "c", "d"], [1.0, 1.0, 2.0]) == ["c", "a", "b", "d"]  # ties: first-stage order


def test_a_negative_scored_above_the_lowest_positive_minus_the_margin_is_dropped():
    negatives = np.array([[3, 5, 7], [2, -1, -1], [4, 6, -1]])
    negative_scores = np.array([[0.9, 0.2, 0.5], [5.0, np.nan, np.nan], [1.0, 2.0, np.nan]], np.float32)
    positive_scores = np.array([[0.6, 0.4], [np.nan, np.nan], [1.5, np.nan]], np.float32)
    kept, dropped = drop_false_negatives(negatives, negative_scores, positive_scores, margin=0.1)
    # query 0: 0.4 - 0.1 = 0.3 -> 0.9 and 0.5 go; query 1 has no positive: nothing goes; query 2: 1.4 -> 2.0 goes
    assert kept.tolist() == [[-1, 5, -1], [2, -1, -1], [4, -1, -1]] and dropped == 3
    _, none_dropped = drop_false_negatives(negatives, negative_scores, positive_scores, margin=-10.0)
    assert none_dropped == 0
    import pyarrow as pa

    doc_ids = pa.array([f"d{i}" for i in range(8)])
    column = negatives_column(kept, doc_ids, pa.list_(pa.struct([("id", pa.string())])))
    assert column.to_pylist() == [[{"id": "d5"}], [{"id": "d2"}], [{"id": "d4"}]]
    offsets, rows = np.array([0, 2, 2, 3]), np.array([7, 1, 4])
    assert padded_rows((offsets, rows)).tolist() == [[7, 1], [-1, -1], [4, -1]]


def test_the_in_training_candidate_list_keeps_positives_and_is_fixed_per_query():
    ids = candidate_list("q_7", ["p1", "p2", "p1"], ["n1", "p2", "n2", "n1", "n3"], limit=4)
    assert sorted(ids) == ["n1", "n2", "p1", "p2"]  # no repeats, no positive as a negative, capped at 4
    assert ids == candidate_list("q_7", ["p1", "p2"], ["n1", "n2", "n3"], limit=4)
    assert sorted(candidate_list("q_7", ["p1", "p2", "p3"], ["n1"], limit=2)) == ["p1", "p2", "p3"]
    orders = {tuple(candidate_list(f"q_{i}", ["p"], ["a", "b", "c"])) for i in range(20)}
    assert len(orders) > 1 and any(order[0] != "p" for order in orders)  # ties do not favour the positive


# ---------------------------------------------------------------- eval --rerank


def direct_two_stages(bi, reranker_path, folder, top_k):
    """The first-stage and reranked rankings of a subset computed without embedtrain.eval: numpy
    search over the bi-encoder's float16-stored vectors, then the reranker's .score per query."""
    encoder = BiEncoder.from_pretrained(bi)
    query_prompt, document_prompt = encoder.prompt_policy.for_subset(read_metadata(folder))
    queries, corpus = read_subset_texts(folder)
    doc_ids = list(corpus)
    as_stored = lambda texts, prompt: encode_texts(  # noqa: E731
        encoder.module, encoder.tokenizer, [prompt + t for t in texts], 64, encoder.max_seq_length
    ).astype(np.float16)
    scores = (
        as_stored([q["question"] for q in queries], query_prompt).astype(np.float32)
        @ as_stored(list(corpus.values()), document_prompt).astype(np.float32).T
    )
    first = {q["question_id"]: [doc_ids[i] for i in np.argsort(-row, kind="stable")] for q, row in zip(queries, scores)}
    reranker = Reranker.from_pretrained(reranker_path)
    second = {
        q["question_id"]: rerank_ranking(
            first[q["question_id"]], reranker.score(q["question"], [corpus[d] for d in first[q["question_id"]][:top_k]])
        )
        for q in queries
    }
    qrels = {q["question_id"]: {d["id"]: 1 for d in q["pos_doc"]} for q in queries}
    return metrics(first, qrels), metrics(second, qrels)


def test_eval_rerank_reports_both_stages_and_equals_a_direct_computation(models, tmp_path):
    run = embedtrain_cli(
        "eval",
        models["bi"],
        models["heldout"],
        "--rerank",
        models["reranker"],
        "--rerank-top-k",
        "5",
        "--storage",
        "float16",  # as direct_two_stages stores the vectors
        "--output",
        tmp_path / "m.json",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "m.json").read_text())
    assert json.loads(run.stdout) == result
    assert set(result["subsets"]) == set(result["reranked"]["subsets"]) == set(SUBSETS)
    assert result["rerank"] == {"model": str(models["reranker"]), "top_k": 5}
    table = run.stderr[run.stderr.index("nDCG@10") :].splitlines()
    assert table[1].split() == ["subset"] + ["first", "rerank"] * 3
    mean = table[-1].split()
    assert mean[0] == "mean" and [float(x) for x in mean[1:3]] == [
        round(result["mean"]["ndcg@10"], 4),
        round(result["reranked"]["mean"]["ndcg@10"], 4),
    ]
    first, second = direct_two_stages(models["bi"], models["reranker"], models["heldout"] / "FEVER", top_k=5)
    for key in ("ndcg@10", "recall@10", "mrr@10"):
        assert result["subsets"]["FEVER"][key] == pytest.approx(first[key], abs=1e-6), key
        assert result["reranked"]["subsets"]["FEVER"][key] == pytest.approx(second[key], abs=1e-6), key
    assert second != first  # the reranker did reorder something: the check above can fail


def test_a_model_of_the_wrong_kind_is_refused_with_its_kind(models, tmp_path):
    from embedtrain.eval import evaluate

    with pytest.raises(EncodeError, match="MODEL .* is a reranker"):
        evaluate(models["reranker"], models["heldout"])
    with pytest.raises(EncodeError, match="--rerank .* is an embedding model"):
        evaluate(models["bi"], models["heldout"], rerank=models["bi"])
    with pytest.raises(EncodeError, match="MODEL .* is a reranker"):
        mine(models["reranker"], models["heldout"], tmp_path / "a")
    with pytest.raises(EncodeError, match="--rerank .* is an embedding model"):
        mine(models["bi"], models["heldout"], tmp_path / "b", rerank=models["bi"])
    run = embedtrain_cli("eval", models["bi"], models["heldout"], "--rerank", models["bi"])
    assert run.returncode == 2 and "is an embedding model (bi-encoder)" in run.stderr, run.stderr[-2000:]


# ---------------------------------------------------------------- mine --rerank


def test_mine_rerank_drops_exactly_the_negatives_scored_above_the_positive(models, tmp_path):
    """On two ranks with small chunks (both ranks score), against the reranker's own scores of the
    negatives mined without --rerank; the margin is set from those scores so that some go, not all,
    and a margin of the wrong sign would keep other ones."""
    plain_counts = mine(models["bi"], models["heldout"], tmp_path / "plain", top_k=5, corpus_chunk=64)
    assert json.loads((tmp_path / "plain" / "FEVER" / "mining.json").read_text()).keys() == {"model", "top_k", "margin"}
    reranker = Reranker.from_pretrained(models["reranker"])
    mined = {}  # subset -> [(question id, negatives, negative scores, lowest positive score)]
    for subset in SUBSETS:
        queries, corpus = read_subset_texts(tmp_path / "plain" / subset)
        mined[subset] = []
        for q in queries:
            negatives, positives = [d["id"] for d in q["neg_doc"]], [d["id"] for d in q["pos_doc"]]
            scores = reranker.score(q["question"], [corpus[d] for d in negatives + positives])
            mined[subset].append(
                (q["question_id"], negatives, scores[: len(negatives)], scores[len(negatives) :].min())
            )
    gaps = np.concatenate([lowest - scores for rows in mined.values() for _, _, scores, lowest in rows])
    # > 0, some negatives within it of the positive, and halfway between two gaps (no borderline score)
    positive_gaps = np.unique(gaps[gaps > 0])
    middle = len(positive_gaps) // 2
    margin = round(float(positive_gaps[middle - 1 : middle + 1].mean()), 6)

    args = ["-m", "embedtrain.cli", "mine", models["bi"], models["heldout"], tmp_path / "two", "--top-k", "5"]
    options = ["--corpus-chunk", "64", "--query-chunk", "8", "--rerank", models["reranker"], "--rerank-margin", margin]
    two = run_ranks([*args, *options], nproc=2)
    total_dropped = total_scored = 0
    for subset in SUBSETS:
        after = pq.read_table(tmp_path / "two" / subset / "queries.parquet").to_pylist()
        assert len(after) == plain_counts[subset]
        dropped = 0
        for (question_id, negatives, scores, lowest), row in zip(mined[subset], after):
            assert row["question_id"] == question_id
            assert not any(abs(scores - (lowest - margin)) < 1e-5)  # no borderline case
            expected = [d for d, score in zip(negatives, scores) if score <= lowest - margin]
            assert [d["id"] for d in row["neg_doc"]] == expected, question_id
            dropped += len(negatives) - len(expected)
            total_scored += len(negatives)
        manifest = json.loads((tmp_path / "two" / subset / "mining.json").read_text())
        assert manifest["rerank_dropped"] == dropped and manifest["rerank_scored"] == sum(
            len(n) for _, n, _, _ in mined[subset]
        )
        assert manifest["rerank_margin"] == margin
        total_dropped += dropped
    assert 0 < total_dropped < total_scored
    assert f"the reranker dropped {total_dropped:,} of {total_scored:,} mined negatives" in two.stdout


# ---------------------------------------------------------------- in-training evaluation of a reranker


def test_in_training_reranker_eval_runs_at_the_last_step_and_equals_the_exported_model(models):
    logged = re.findall(
        r"eval at step (\d+): nDCG@10 ([0-9.]+)  Recall@10 ([0-9.]+)  MRR@10 ([0-9.]+)  \(reranking", models["log"]
    )
    assert [int(step) for step, *_ in logged] == [4], models["log"][-3000:]
    reranker = Reranker.from_pretrained(models["reranker"])
    per_subset = []
    for subset in SUBSETS:
        queries, corpus = read_subset_texts(models["heldout"] / subset)
        rankings, qrels = {}, {}
        for q in queries[:EVAL_QUERIES]:
            positives = [d["id"] for d in q["pos_doc"]]
            ids = candidate_list(q["question_id"], positives, [d["id"] for d in q["neg_doc"]])
            scores = reranker.score(q["question"], [corpus[d] for d in ids])
            rankings[q["question_id"]] = [ids[i] for i in np.argsort(-scores, kind="stable")]
            qrels[q["question_id"]] = {d: 1 for d in positives}
        per_subset.append(metrics(rankings, qrels))
    _, ndcg, recall, mrr = logged[0]
    for key, value in (("ndcg@10", ndcg), ("recall@10", recall), ("mrr@10", mrr)):
        assert float(value) == pytest.approx(np.mean([m[key] for m in per_subset]), abs=2e-4), key
