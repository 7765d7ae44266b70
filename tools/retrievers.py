"""Dense, multi-vector (ColBERT) and sparse (SPLADE) tiny retrievers side by side, on the CPU.

    python tools/retrievers.py /tmp/retrievers [--steps 100] [--heldout-queries 1000]

What it does, with the commands a user runs (each printed before it runs):
1. trains the three tiny recipes (`tiny`, `tiny_colbert`, `tiny_sparse`: the same random tiny Llama,
   demo data, batch and steps) and exports each;
2. writes held-out data from another seed (tools/make_demo_data.py --seed 1: unseen entities);
3. `embedtrain eval` of each export on it, and the multi-vector model reranking the dense model's
   top 100 (`embedtrain eval COLBERT --first-stage DENSE --first-stage-k 100`);
4. in this process, per model, on the held-out FEVER corpus: the index size per document as
   `embedtrain encode` stores it (dense: float32 vectors; multi-vector: float32 token vectors;
   sparse: CSR int64 ids + float32 weights), the mean non-zeros of sparse vectors, and the CPU
   latency of one query (encode + exact search over that corpus, median of --latency-queries runs).

It prints a markdown table (the one in docs/benchmarks.md) and writes OUT/retrievers.json.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"dense": "tiny", "multi-vector": "tiny_colbert", "sparse": "tiny_sparse"}
LATENCY_SUBSET = "FEVER"


def run(*command):
    """Run one command as a user would, echoing it; stop on failure."""
    print("$ " + " ".join(str(part) for part in command), flush=True)
    subprocess.run([str(part) for part in command], check=True)


def embedtrain(*args):
    run(sys.executable, "-m", "embedtrain.cli", *args)


def train_and_export(out, steps):
    """{kind: export folder} of the three tiny recipes, trained `steps` steps each (kept when present)."""
    exports = {}
    for kind, recipe in RECIPES.items():
        exported = out / "exported" / recipe
        if not (exported / "config.json").is_file():
            started = time.perf_counter()
            embedtrain(
                "train", "--config", recipe, "--output-dir", out / "runs" / recipe, "--set", f"train.max_steps={steps}"
            )
            embedtrain("export", out / "runs" / recipe, exported)
            print(f"{recipe}: trained and exported in {time.perf_counter() - started:.0f} s", flush=True)
        exports[kind] = exported
    return exports


def evaluations(out, exports, heldout):
    """{row name: eval result JSON}: each model alone, and the multi-vector model over dense's top 100."""
    results = {}
    for kind, exported in exports.items():
        path = out / "metrics" / f"{kind}.json"
        embedtrain("eval", exported, heldout, "--output", path)
        results[kind] = json.loads(path.read_text())
    path = out / "metrics" / "multi-vector-over-dense.json"
    embedtrain(
        "eval", exports["multi-vector"], heldout, "--first-stage", exports["dense"], "--first-stage-k", 100,
        "--output", path,
    )  # fmt: skip
    results["multi-vector over dense top 100"] = json.loads(path.read_text())
    return results


def corpus_and_queries(heldout, count):
    folder = heldout / LATENCY_SUBSET
    corpus = pq.read_table(folder / "corpus.parquet", columns=["text"]).column("text").to_pylist()
    queries = pq.read_table(folder / "queries.parquet", columns=["question"]).column("question").to_pylist()
    return corpus, queries[:count]


def median_ms(search, queries):
    """The median wall time of search(query) over the queries, in milliseconds (one warm-up first)."""
    search(queries[0])
    times = []
    for query in queries:
        started = time.perf_counter()
        search(query)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def dense_costs(exported, corpus, queries):
    from embedtrain import BiEncoder

    model = BiEncoder.from_pretrained(exported, device="cpu")
    docs = torch.from_numpy(np.asarray(model.encode(corpus, prompt="document"), dtype=np.float32))

    def search(query):
        vector = torch.from_numpy(np.asarray(model.encode([query], prompt="query"), dtype=np.float32))
        return torch.topk(vector @ docs.T, 10)

    return {"bytes_per_doc": docs.shape[1] * 4, "latency_ms": median_ms(search, queries)}


def multi_vector_costs(exported, corpus, queries):
    from embedtrain import MultiVectorEncoder
    from embedtrain.inference.token_index import flatten

    model = MultiVectorEncoder.from_pretrained(exported, device="cpu")
    flat, offsets = flatten(model.encode_document(corpus))

    def search(query):
        return model.search([query], flat, offsets, k=10)

    tokens = (offsets[1:] - offsets[:-1]).astype(np.float64)
    return {
        "bytes_per_doc": float(tokens.mean()) * flat.shape[1] * 4,
        "vectors_per_doc": float(tokens.mean()),
        "latency_ms": median_ms(search, queries),
    }


def sparse_costs(exported, corpus, queries):
    from embedtrain import SparseEncoder
    from embedtrain.inference import sparse_index

    model = SparseEncoder.from_pretrained(exported, device="cpu")
    docs = model.encode(corpus, prompt="document")
    index = sparse_index.build_index(docs, model.width)

    def search(query):
        return sparse_index.search(index, model.encode([query], prompt="query"), 10)

    query_vectors = model.encode(queries, prompt="query")
    return {
        "bytes_per_doc": float(sparse_index.mean_nonzeros(docs)) * (8 + 4),
        "nonzeros_per_doc": float(sparse_index.mean_nonzeros(docs)),
        "nonzeros_per_query": float(sparse_index.mean_nonzeros(query_vectors)),
        "latency_ms": median_ms(search, queries),
    }


COSTS = {"dense": dense_costs, "multi-vector": multi_vector_costs, "sparse": sparse_costs}


def table(results, costs):
    lines = [
        "| model | nDCG@10 (mean) | Recall@100 | index bytes per document | vectors or non-zeros per document "
        "| non-zeros per query | one query on the CPU (encode + search), ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        mean = result["mean"]  # with --first-stage: the reordered lists' (first_stage holds the first stage's)
        cost = costs.get(name, {})
        per_doc = cost.get("vectors_per_doc", cost.get("nonzeros_per_doc", 1 if name == "dense" else None))
        cells = [
            f"{mean['ndcg@10']:.3f}",
            f"{mean['recall@100']:.3f}",
            f"{cost['bytes_per_doc']:,.0f}" if cost else "",
            f"{per_doc:.1f}" if per_doc is not None else "",
            f"{cost['nonzeros_per_query']:.1f}" if "nonzeros_per_query" in cost else "",
            f"{cost['latency_ms']:.1f}" if cost else "",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=100, help="training steps of each tiny recipe")
    parser.add_argument(
        "--heldout-queries", type=int, default=1000, help="held-out queries per subset (FEVER: about 550 documents)"
    )
    parser.add_argument("--latency-queries", type=int, default=50)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    exports = train_and_export(args.out, args.steps)
    heldout = args.out / "heldout"
    if not heldout.is_dir():
        run(
            sys.executable, REPO / "tools" / "make_demo_data.py", heldout,
            "--seed", 1, "--queries-per-subset", args.heldout_queries,
        )  # fmt: skip
    results = evaluations(args.out, exports, heldout)
    corpus, queries = corpus_and_queries(heldout, args.latency_queries)
    costs = {kind: COSTS[kind](exports[kind], corpus, queries) for kind in exports}
    report = {"steps": args.steps, "results": results, "costs": costs, "latency_corpus": len(corpus)}
    (args.out / "retrievers.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(results, costs))
    print(f"(latency: one query at a time over the {len(corpus)} documents of held-out {LATENCY_SUBSET})")


if __name__ == "__main__":
    main()
