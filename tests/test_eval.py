"""Evaluation metrics, hard-negative mining and model merging."""

import importlib.util
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_cli import embedtrain

from conftest import REPO
from embedtrain.eval import evaluate
from embedtrain.merge import MergeError, merge
from embedtrain.mine import mine, mine_rankings
from embedtrain.retrieval import metrics, mrr_at_k, ndcg_at_k, recall_at_k


def make_demo_data(out, seed, queries):
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "tools" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_demo_data(out, seed=seed, queries_per_subset=queries)


def test_metrics_equal_a_hand_computed_case():
    ranking = ["d3", "d1", "d7", "d2"]
    relevance = {"d1": 1, "d2": 2, "d9": 1}
    dcg = 1 / math.log2(3) + 2 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranking, relevance, 10) == pytest.approx(dcg / idcg)
    assert recall_at_k(ranking, relevance, 10) == pytest.approx(2 / 3)
    assert recall_at_k(ranking, relevance, 1) == 0.0
    assert mrr_at_k(ranking, relevance, 10) == pytest.approx(1 / 2)
    both = metrics({"q1": ranking, "q2": ["x", "d5"]}, {"q1": relevance, "q2": {"d5": 1}, "q3": {"d1": 0}})
    assert both["queries"] == 2 and both["mrr@10"] == pytest.approx((1 / 2 + 1 / 2) / 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_trained):
    root = tmp_path_factory.mktemp("models")
    make_demo_data(root / "heldout", seed=1, queries=60)
    return {
        "trained": tiny_trained / "model",  # the tiny recipe as shipped, trained and exported
        "untrained": REPO / "embedtrain" / "assets" / "tiny-llama",
        "heldout": root / "heldout",
    }


def test_trained_model_beats_the_untrained_one_on_held_out_data(models):
    trained = evaluate(models["trained"], models["heldout"])
    untrained = evaluate(models["untrained"], models["heldout"])
    assert set(trained["subsets"]) == {"FEVER", "SciFact", "SyntheticClassificationData"}
    assert trained["mean"]["ndcg@10"] > untrained["mean"]["ndcg@10"] + 0.1, (trained["mean"], untrained["mean"])


def test_eval_reads_beir_layout(models, tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    subset = models["heldout"] / "FEVER"
    corpus = pq.read_table(subset / "corpus.parquet").to_pylist()
    queries = pq.read_table(subset / "queries.parquet").to_pylist()
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d["id"], "title": "", "text": d["text"]}) + "\n" for d in corpus)
    )
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q["question_id"], "text": q["question"]}) + "\n" for q in queries)
    )
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q['question_id']}\t{q['pos_doc'][0]['id']}\t1\n" for q in queries)
    )
    instruction = json.loads((subset / "dataset_metadata.json").read_text())["query_instruction"]
    beir = evaluate(models["trained"], folder, query_prompt=instruction + " ")
    native = evaluate(models["trained"], subset)
    assert beir["mean"]["ndcg@10"] == pytest.approx(native["mean"]["ndcg@10"], abs=1e-6)
    run = embedtrain("eval", models["trained"], folder, "--output", tmp_path / "m.json")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "m.json").read_text())["subsets"]["beir"]["queries"] == 60


def brute_force(query_vectors, doc_vectors, positives, top_k, margin):
    scores = query_vectors @ doc_vectors.T
    result = []
    for q, row in enumerate(scores):
        threshold = margin * min(row[p] for p in positives[q])
        order = [i for i in np.argsort(-row, kind="stable") if i not in positives[q] and row[i] <= threshold]
        result.append(order[:top_k])
    return result


def test_mining_respects_the_threshold_never_returns_a_positive_and_stays_in_chunks():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((1000, 16)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    positives = [{int(i)} for i in rng.integers(0, 1000, 37)]
    queries = np.stack([docs[next(iter(p))] + 0.3 * rng.standard_normal(16).astype(np.float32) for p in positives])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rankings, largest = mine_rankings(queries, docs, positives, top_k=10, margin=0.95, query_chunk=8, corpus_chunk=100)
    assert largest == 8 * 100  # the corpus is 10x the chunk; the full 37 x 1000 matrix never exists
    scores = queries @ docs.T
    for q, ranking in enumerate(rankings):
        pos = next(iter(positives[q]))
        assert pos not in ranking
        assert all(scores[q, i] <= 0.95 * scores[q, pos] + 1e-6 for i in ranking)
    assert rankings == brute_force(queries, docs, positives, 10, 0.95)


def test_mine_writes_ranked_negatives_in_the_same_layout(models, tmp_path):
    counts = mine(models["trained"], models["heldout"], tmp_path / "mined", top_k=5, corpus_chunk=64)
    assert counts == {"FEVER": 60, "SciFact": 60, "SyntheticClassificationData": 30}
    rows = pq.read_table(tmp_path / "mined" / "FEVER" / "queries.parquet").to_pylist()
    for row in rows:
        ids = [d["id"] for d in row["neg_doc"]]
        assert len(ids) == 5 and row["pos_doc"][0]["id"] not in ids
    from embedtrain.data.prepare import prepare

    prepare(tmp_path / "mined", tmp_path / "prepared")  # the output is valid training data


def test_merging_a_model_with_itself_returns_it_and_two_give_their_mean(models, tmp_path):
    same = merge(tmp_path / "same", [models["trained"], models["trained"]])
    a = load_file(str(models["trained"] / "model.safetensors"))
    for name, tensor in load_file(str(same / "model.safetensors")).items():
        torch.testing.assert_close(tensor, a[name], rtol=0, atol=1e-7)
    other = tmp_path / "other"
    import shutil

    shutil.copytree(models["trained"], other)
    b = {k: v + 1.0 for k, v in a.items()}
    from safetensors.torch import save_file

    save_file(b, str(other / "model.safetensors"), metadata={"format": "pt"})
    mean = load_file(str(merge(tmp_path / "mean", [models["trained"], other]) / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(mean[name], (a[name] + b[name]) / 2)
    weighted = load_file(
        str(merge(tmp_path / "w", [models["trained"], other], weights=[0.25, 0.75]) / "model.safetensors")
    )
    torch.testing.assert_close(weighted["norm.weight"], 0.25 * a["norm.weight"] + 0.75 * b["norm.weight"])
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(MergeError, match="differs from .* in config.json: num_hidden_layers"):
        merge(tmp_path / "bad", [models["trained"], other])
    run = embedtrain("merge", tmp_path / "bad2", models["trained"], other)
    assert run.returncode == 2 and "num_hidden_layers" in run.stderr


def test_in_training_evaluation_is_rank_sharded_and_equals_offline_eval(models, tmp_path):
    from conftest import run_ranks

    run = run_ranks(
        [
            REPO / "launch" / "train.py",
            "--config",
            "tiny",
            "--output-dir",
            tmp_path / "run",
            "--set",
            "train.max_steps=4",
            "--set",
            f"eval.path={models['heldout']}",
            "--set",
            "eval.every=2",
            "--set",
            "eval.max_queries=20",
        ],
        nproc=2,
        timeout=400,
    )
    import re

    logged = {int(s): float(v) for s, v in re.findall(r"eval at step (\d+): nDCG@10 ([0-9.]+)", run.stdout)}
    assert sorted(logged) == [2, 4]
    assert embedtrain("export", tmp_path / "run", tmp_path / "model").returncode == 0
    heldout = tmp_path / "heldout20"  # the same first 20 queries per subset, offline
    for subset in ("FEVER", "SciFact", "SyntheticClassificationData"):
        (heldout / subset).mkdir(parents=True)
        for name in ("corpus.parquet", "dataset_metadata.json"):
            (heldout / subset / name).write_bytes((models["heldout"] / subset / name).read_bytes())
        table = pq.read_table(models["heldout"] / subset / "queries.parquet")
        pq.write_table(table.slice(0, 20), heldout / subset / "queries.parquet")
    offline = evaluate(tmp_path / "model", heldout)
    assert logged[4] == pytest.approx(offline["mean"]["ndcg@10"], abs=1e-4)


def test_matryoshka_training_retrieves_better_at_a_truncated_dim(models, tmp_path):
    run = embedtrain(
        "train", "--config", "tiny", "--output-dir", tmp_path / "run", "--set", "loss.matryoshka_dims=[8,64]"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert embedtrain("export", tmp_path / "run", tmp_path / "model").returncode == 0
    st_config = json.loads((tmp_path / "model" / "config_sentence_transformers.json").read_text())
    assert st_config["matryoshka_dims"] == [8, 64]
    with_matryoshka = evaluate(tmp_path / "model", models["heldout"], dim=8)["mean"]["ndcg@10"]
    without = evaluate(models["trained"], models["heldout"], dim=8)["mean"]["ndcg@10"]
    assert with_matryoshka > without + 0.05, (with_matryoshka, without)
